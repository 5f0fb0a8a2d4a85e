"""FlowGRPOTrainer against the reference implementation's behaviour (DESIGN.md §4): rollouts per micro-batch and
per μ-block, the frozen reference's placement and precision, the KL's scale, per-micro-batch noise, eval-mode
sampling, global-std advantages, the first 9 of 10 steps trained, zero-advantage samples left out, the EMA's interval
and warm-up, the optional detached unconditional branch, and the SD3.5 recipe's settings."""

from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from transformers import TrainerCallback

from uae_hf import FlowGRPOTrainer
from uae_hf.sample_data import skimage_photos
from uae_hf.decoders import SD3Family
from uae_hf.decoders.sd3 import SD3_LORA_TARGETS


@pytest.fixture()
def config(make_config, tmp_path):
    def make(**overrides):
        own = {"output_dir": str(tmp_path / "run"), "decoder_num_inference_steps": 4, "decoder_guidance_scale": 4.5}
        return make_config("generation", **own | overrides)

    return make


def make(fresh_pipe, args, peft_config=None):
    return FlowGRPOTrainer(model=fresh_pipe.vlm, decoder=fresh_pipe, args=args, train_dataset=skimage_photos(64),
                           processing_class=fresh_pipe.processor, peft_config=peft_config)


class _Tracked(dict):
    """A rollout that notes the optimizer step of each update that trains on it."""

    def __init__(self, rollout, trainer, uses):
        super().__init__(rollout)
        self.trainer, self.uses = trainer, uses

    def __getitem__(self, key):
        if key == "trajectory":
            self.uses.append(self.trainer.state.global_step)
        return super().__getitem__(key)


def test_each_micro_batch_gets_its_own_rollout_for_num_iterations_steps(fresh_pipe, config, monkeypatch):
    # one image per micro-batch, 2 micro-batches per step, each window's rollouts serve 2 optimizer steps
    trainer = make(fresh_pipe, config(gradient_accumulation_steps=2, num_iterations=2, max_steps=4))
    micro_batches, sampled, uses = [], [], []
    sample, step = trainer._sample, trainer.training_step

    def tracked_sample(rows):
        sampled.append([row["name"] for row in rows])
        uses.append([])
        return _Tracked(sample(rows), trainer, uses[-1])

    def tracked_step(model, inputs, *args, **kwargs):
        micro_batches.append([row["name"] for row in inputs])
        return step(model, inputs, *args, **kwargs)

    monkeypatch.setattr(trainer, "_sample", tracked_sample)
    monkeypatch.setattr(trainer, "training_step", tracked_step)
    trainer.train()
    assert len(micro_batches) == 8
    # sampled once per (window position, μ-block): both micro-batches of steps 0 and 2, none dropped in between
    assert sampled == [micro_batches[0], micro_batches[1], micro_batches[4], micro_batches[5]]
    # each rollout trains exactly num_iterations=2 optimizer steps, once per step
    assert uses == [[0, 1], [0, 1], [2, 3], [2, 3]]


def test_micro_batches_of_a_step_draw_different_noise(fresh_pipe, config, monkeypatch):
    trainer = make(fresh_pipe, config(gradient_accumulation_steps=2, max_steps=1))
    latents, prepare = [], fresh_pipe.prepare_latents
    monkeypatch.setattr(fresh_pipe, "prepare_latents", lambda *a, **k: latents.append(prepare(*a, **k)) or latents[-1])
    trainer.train()
    first, second = latents
    assert not torch.equal(first, second)


def test_frozen_reference_follows_the_trained_dit_and_starts_at_zero_kl(fresh_pipe, config):
    trainer = make(fresh_pipe, config(decoder_full_finetune=True, beta=0.04, max_steps=1, bf16=True))
    assert trainer.reference.device == trainer.model.device == trainer.accelerator.device
    trainer.train()
    (first,) = [record for record in trainer.state.log_history if "kl" in record]
    assert first["kl"] == 0.0 and first["ratio/max_deviation"] == 0.0


def test_kl_is_flow_grpo_s_mean_distance_over_two_std_t_squared(fresh_pipe, config, monkeypatch):
    a, shift = 0.7, 0.1
    trainer = make(fresh_pipe, config(beta=1.0, max_steps=1, timestep_fraction=1.0, sde_noise_level=a))
    real = SD3Family.velocity

    def velocity(*args, **kwargs):  # the reference's (gradient-free) velocity, moved by a known constant
        v = real(*args, **kwargs)
        return v if torch.is_grad_enabled() else v + shift

    monkeypatch.setattr(SD3Family, "velocity", velocity)
    trainer.train()
    (logged,) = [record["kl"] for record in trainer.state.log_history if "kl" in record]
    sigmas = SD3Family(fresh_pipe).schedule(4, 64, 64, "cpu")[1].double().tolist()
    expected = []
    for index in range(4):
        sigma, sigma_next = sigmas[index], sigmas[index + 1]
        std_t = a * (sigma / (1 - (sigmas[1] if sigma >= 1 else sigma))) ** 0.5
        mean_shift = shift * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * (sigma_next - sigma)
        expected.append(mean_shift**2 / (2 * std_t**2))  # no |dt| in the denominator
    assert logged == pytest.approx(sum(expected) / 4, rel=1e-3)


def test_rollouts_sample_in_eval_mode_and_dropout_can_be_disabled(fresh_pipe, config):
    lora = LoraConfig(r=8, lora_alpha=16, init_lora_weights="gaussian", target_modules=list(SD3_LORA_TARGETS),
                      lora_dropout=0.5)
    trainer = make(fresh_pipe, config(max_steps=3, learning_rate=5e-2, disable_dropout=True), lora)
    modes = []  # (gradients enabled, training) of every DiT call
    handle = fresh_pipe.transformer.register_forward_pre_hook(
        lambda module, args: modes.append((torch.is_grad_enabled(), module.training)))
    try:
        trainer.train()
    finally:
        handle.remove()
    assert {training for grad, training in modes if not grad} == {False}  # rollouts (beta=0: no reference calls)
    assert {training for grad, training in modes if grad} == {True}  # updates
    first_updates = [record["ratio/first_update_max_deviation"] for record in trainer.state.log_history
                     if "ratio/first_update_max_deviation" in record]
    # after the first step the LoRA's B is non-zero, so a dropout mask would move the recomputed log-probs
    assert first_updates == [0.0, 0.0, 0.0]


def test_checkpoints_fall_between_mu_blocks_with_accumulation(config):
    # the window's rollouts serve num_iterations optimizer steps, so checkpoints go every multiple of μ steps
    with pytest.raises(ValueError, match="num_iterations × gradient_accumulation_steps"):
        config(gradient_accumulation_steps=2, num_iterations=2, save_strategy="steps", save_steps=3)
    config(gradient_accumulation_steps=2, num_iterations=2, save_strategy="steps", save_steps=2)


def test_default_advantages_are_the_group_mean_over_the_global_std_clipped(fresh_pipe, config):
    """Flow-GRPO's SD3 recipes (`sample.global_std=True`): `(r - mean of the group) / (std of every reward + 1e-4)`,
    clipped to ±5. One group of 8 with an outlier among 8 flat groups: its centred reward is ~7 global stds."""
    trainer = make(fresh_pipe, config(per_device_train_batch_size=8, num_generations=8))
    assert trainer.args.scale_rewards == "batch" and trainer.args.advantage_clip == 5.0
    rewards = torch.full((64,), 0.25)
    rewards[3] = 1.25
    rewards[8:16] = torch.linspace(0.0, 0.5, 8)
    advantages = trainer._advantages(rewards, rewards)
    grouped = rewards.double().view(8, 8)
    expected = (grouped - grouped.mean(dim=1, keepdim=True)) / (rewards.double().std(correction=0) + 1e-4)
    assert float(expected.max()) > 5  # the outlier is clipped
    torch.testing.assert_close(advantages, expected.clamp(-5, 5).view(-1), rtol=1e-6, atol=1e-7)
    assert bool((advantages[16:] == 0).all()) and float(advantages[3]) == 5.0


def test_the_global_std_spans_every_micro_batch_of_the_optimizer_step(fresh_pipe, config, monkeypatch):
    """With gradient accumulation the whole step is sampled first: each sample's advantage is its group-centred reward
    over the population std of the rewards of every micro-batch of the step (the reference's global std), not of its
    own micro-batch alone."""
    trainer = make(fresh_pipe, config(gradient_accumulation_steps=2, max_steps=1))
    group = trainer.args.num_generations
    rollouts, rewards, sample = [], [], trainer._sample

    def tracked_sample(rows):
        rollouts.append(sample(rows))
        rewards.append(rollouts[-1]["rewards"].clone())
        return rollouts[-1]

    monkeypatch.setattr(trainer, "_sample", tracked_sample)
    trainer.train()
    assert len(rollouts) == 2
    step_std = torch.cat(rewards).double().std(correction=0)
    assert not torch.allclose(rewards[0].double().std(correction=0), step_std, rtol=1e-3)  # the two stds differ here
    for rollout, own in zip(rollouts, rewards):
        grouped = own.double().view(-1, group)
        expected = (grouped - grouped.mean(dim=1, keepdim=True)) / (step_std + 1e-4)
        torch.testing.assert_close(rollout["advantages"], expected.clamp(-5, 5).view(-1), rtol=1e-6, atol=1e-7)


def test_the_global_std_is_the_population_std_as_in_flow_grpo(fresh_pipe, config):
    trainer = make(fresh_pipe, config(per_device_train_batch_size=8, num_generations=8))
    rewards = torch.linspace(0.0, 1.0, 16)
    advantages = trainer._advantages(rewards, rewards)
    grouped = rewards.double().view(2, 8)
    expected = (grouped - grouped.mean(dim=1, keepdim=True)) / (rewards.double().std(correction=0) + 1e-4)
    torch.testing.assert_close(advantages, expected.clamp(-5, 5).view(-1), rtol=1e-6, atol=1e-7)


def test_a_group_of_equal_rewards_gets_exactly_zero_advantage(fresh_pipe, config):
    """In float64, as the references compute advantages: in float32 a group's mean can miss its equal rewards by an
    ulp, and the zero-advantage filter would then train on a group that carries no signal."""
    trainer = make(fresh_pipe, config(per_device_train_batch_size=24, num_generations=24))
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        rewards = torch.rand(4, generator=generator).repeat_interleave(24)  # four flat groups of 24
        rewards[:24] = torch.rand(24, generator=generator)  # and one with a signal, for a non-trivial std
        advantages = trainer._advantages(rewards, rewards)
        assert advantages.dtype == torch.float64
        assert bool((advantages[24:] == 0).all())


def test_the_first_nine_of_ten_steps_train(fresh_pipe, config, monkeypatch):
    """`int(10 · 0.99) = 9`: steps 0-8, every update (they were drawn at random before); a window's first N."""
    trainer = make(fresh_pipe, config(decoder_num_inference_steps=10, timestep_fraction=0.99, max_steps=1))
    assert trainer._trained_steps() == list(range(9))
    trained, real = [], SD3Family.velocity

    def velocity(family, model, latents, timestep, *args, **kwargs):
        if torch.is_grad_enabled():
            trained.append(float(timestep))
        return real(family, model, latents, timestep, *args, **kwargs)

    monkeypatch.setattr(SD3Family, "velocity", velocity)
    trainer.train()
    timesteps = SD3Family(fresh_pipe).schedule(10, 64, 64, "cpu")[0]
    assert trained == timesteps[:9].tolist()
    trainer.args.timestep_window, trainer.args.timestep_fraction = "3:10", 0.5
    assert trainer._trained_steps() == [3, 4, 5, 6, 7]


@pytest.mark.parametrize("filtered", [True, False])
def test_samples_with_zero_advantage_are_left_out_of_the_update(fresh_pipe, config, monkeypatch, filtered):
    """Flow-GRPO drops the samples whose advantage is 0 before training; here the micro-batch's first group scores
    the same for every sample, so with the filter the DiT's update calls see the other groups' samples only."""
    trainer = make(fresh_pipe, config(max_steps=1, beta=0.04, filter_zero_advantages=filtered,
                                    per_device_train_batch_size=8))
    real, samples = trainer.reconstruction_reward.similarities, []

    def similarities(*args, **kwargs):
        rewards, metrics = real(*args, **kwargs)
        rewards = rewards.clone()
        rewards[: trainer.args.num_generations] = 0.5
        samples.append(len(rewards))
        return rewards, metrics

    monkeypatch.setattr(trainer.reconstruction_reward, "similarities", similarities)
    rows = []  # the batch of every DiT call with gradients (the update's)
    handle = fresh_pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(len(kwargs["hidden_states"])) if torch.is_grad_enabled() else None,
        with_kwargs=True)
    try:
        trainer.train()
    finally:
        handle.remove()
    (logged,) = [record for record in trainer.state.log_history if "advantages/filtered_fraction" in record]
    (total,) = samples
    kept = total - trainer.args.num_generations if filtered else total
    assert rows and set(rows) == {2 * kept}  # CFG: conditional and unconditional rows
    assert logged["advantages/filtered_fraction"] == pytest.approx((total - kept) / total)
    assert logged["ratio/max_deviation"] == 0.0 and logged["kl"] == 0.0  # still on-policy on the kept samples


def test_the_ema_blends_every_eighth_step_with_the_warmed_up_decay(fresh_pipe, config, monkeypatch):
    """Flow-GRPO's EMA (decay 0.9, every 8 steps) after its optimizer step s (counted from 1): it blends when
    (s + 1) % 8 == 0, with decay `min(0.9, (1 + s) / (10 + s))`, i.e. 8/17 at step 7 and 16/25 at step 15."""
    trainer = make(fresh_pipe, config(max_steps=17, ema_decay=0.9, ema_update_interval=8))
    live = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}

    def training_step(model, inputs, num_items_in_batch=None):  # any gradient will do: only the EMA is under test
        loss = sum((p * (index % 3 - 1)).sum() for index, p in enumerate(live.values()))
        trainer.accelerator.backward(loss)
        return loss.detach()

    history = []  # (step, live weights, EMA weights) after each optimizer step

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            history.append((state.global_step, {n: p.detach().clone() for n, p in live.items()},
                            {n: w.clone() for n, w in trainer.ema.weights.items()}))

    monkeypatch.setattr(trainer, "training_step", training_step)
    ema = {name: w.clone() for name, w in trainer.ema.weights.items()}
    trainer.add_callback(Record())  # after the trainer's own, so it sees the blended EMA
    trainer.train()
    assert [step for step, _, _ in history] == list(range(1, 18))
    for step, weights, blended in history:
        if (step + 1) % 8 == 0:
            decay = min(0.9, (1 + step) / (10 + step))
            ema = {name: decay * ema[name] + (1 - decay) * weights[name] for name in ema}
        for name in ema:
            torch.testing.assert_close(blended[name], ema[name], rtol=1e-5, atol=1e-7)
    first = next(iter(ema))
    assert not torch.equal(history[6][2][first], history[5][2][first])  # moved at step 7
    assert torch.equal(history[7][2][first], history[6][2][first])  # not at step 8


def test_the_update_detaches_the_unconditional_branch_when_asked(fresh_pipe, config, monkeypatch):
    """Off by default, as in Flow-GRPO's SD3 script (its update backpropagates through both CFG branches)."""
    assert config().detach_unconditional is False
    trainer = make(fresh_pipe, config(max_steps=1, detach_unconditional=True))
    calls, real = [], SD3Family.velocity

    def velocity(*args, **kwargs):
        if torch.is_grad_enabled():  # the updates' calls (the rollouts' sample without gradients)
            calls.append((True, kwargs.get("detach_unconditional", False)))
        return real(*args, **kwargs)

    monkeypatch.setattr(SD3Family, "velocity", velocity)
    trainer.train()
    assert calls and set(calls) == {(True, True)}


def test_class_defaults_are_flow_grpo_s_optimizer_settings():
    from uae_hf import FlowGRPOConfig

    args = FlowGRPOConfig(output_dir="unused")
    assert (args.weight_decay, args.lr_scheduler_type, args.learning_rate) == (1e-4, "constant", 3e-4)


def test_the_sd3_5_recipe_has_flow_grpo_s_settings():
    """examples/recipes/generation_sd3.5.yaml against Flow-GRPO's SD3.5 recipes (config/base.py + geneval_sd3)."""
    from trl import ModelConfig, TrlParser

    from uae_hf import FlowGRPOConfig
    from uae_hf.trainer.train_script import UnifiedScriptArguments

    recipe = Path(__file__).parents[2] / "examples" / "recipes" / "generation_sd3.5.yaml"
    parser = TrlParser((UnifiedScriptArguments, FlowGRPOConfig, ModelConfig))
    _, args, _ = parser.parse_args_and_config(["--config", str(recipe), "--use_cpu", "true", "--bf16", "false"])
    assert (args.learning_rate, args.lr_scheduler_type, args.weight_decay, args.max_grad_norm) == (
        3e-4, "constant", 1e-4, 1.0)
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.9, 0.999, 1e-8)
    assert (args.ema_decay, args.ema_update_interval) == (0.9, 8)
    assert (args.beta, args.flow_clip_range, args.advantage_clip, args.scale_rewards) == (0.04, 1e-4, 5.0, "batch")
    assert args.num_generations == 24 and args.filter_zero_advantages and not args.detach_unconditional
    # one optimizer step on one GPU: 24 images x 24 reconstructions, as the reference's (576 samples)
    assert args.per_device_train_batch_size // args.num_generations * args.gradient_accumulation_steps == 24
    assert (args.decoder_num_inference_steps, args.timestep_fraction, args.decoder_guidance_scale) == (10, 0.99, 4.5)
    assert (args.sde_method, args.sde_noise_level, args.decoder_height, args.decoder_width) == ("sde", 0.7, 512, 512)
    assert (args.decoder_lora_r, args.decoder_lora_alpha, args.same_noise_in_group) == (32, 64, False)
