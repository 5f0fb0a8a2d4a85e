"""FlowGRPOTrainer against the reference implementation's behaviour (DESIGN.md §4): rollouts per micro-batch and
per μ-block, the frozen reference's placement and precision, the KL's scale, per-micro-batch noise, eval-mode
sampling."""

import pytest
import torch
from peft import LoraConfig

from uae_hf import FlowGRPOTrainer
from uae_hf.sample_data import skimage_photos
from uae_hf.sampling import schedule
from uae_hf.trainer import flow_grpo_trainer
from uae_hf.trainer.decoder_training_config import DIT_LORA_TARGETS


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
    rollout, step = trainer._rollout, trainer.training_step

    def tracked_rollout(rows):
        sampled.append([row["name"] for row in rows])
        uses.append([])
        return _Tracked(rollout(rows), trainer, uses[-1])

    def tracked_step(model, inputs, *args, **kwargs):
        micro_batches.append([row["name"] for row in inputs])
        return step(model, inputs, *args, **kwargs)

    monkeypatch.setattr(trainer, "_rollout", tracked_rollout)
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
    real = flow_grpo_trainer.velocity

    def velocity(*args, **kwargs):  # the reference's (gradient-free) velocity, moved by a known constant
        v = real(*args, **kwargs)
        return v if torch.is_grad_enabled() else v + shift

    monkeypatch.setattr(flow_grpo_trainer, "velocity", velocity)
    trainer.train()
    (logged,) = [record["kl"] for record in trainer.state.log_history if "kl" in record]
    sigmas = schedule(fresh_pipe, 4, 64, 64, "cpu")[1].double().tolist()
    expected = []
    for index in range(4):
        sigma, sigma_next = sigmas[index], sigmas[index + 1]
        std_t = a * (sigma / (1 - (sigmas[1] if sigma >= 1 else sigma))) ** 0.5
        mean_shift = shift * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * (sigma_next - sigma)
        expected.append(mean_shift**2 / (2 * std_t**2))  # no |dt| in the denominator
    assert logged == pytest.approx(sum(expected) / 4, rel=1e-3)


def test_rollouts_sample_in_eval_mode_and_dropout_can_be_disabled(fresh_pipe, config):
    lora = LoraConfig(r=8, lora_alpha=16, init_lora_weights="gaussian", target_modules=DIT_LORA_TARGETS,
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
