"""DiffusionNFTTrainer: DiffusionNFT on the decoder's DiT, the encoder frozen (DESIGN.md §4b)."""

import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from uae_hf import DiffusionNFTConfig, DiffusionNFTTrainer, FlowGRPOTrainer, load_uae_pipeline
from uae_hf.sample_data import skimage_photos
from uae_hf.decoders import SD3Family
from uae_hf.trainer.diffusion_nft_trainer import TRAINING_NOISE_STREAM, adaptive_flow_loss, diffusion_nft_loss

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@pytest.fixture()
def config(make_config, tmp_path):
    def make(**overrides):
        own = dict(output_dir=str(tmp_path / "run"), decoder_num_inference_steps=4)
        return make_config("generation_nft", **own | overrides)

    return make


def make(fresh_pipe, args):
    return DiffusionNFTTrainer(model=fresh_pipe.vlm, decoder=fresh_pipe, args=args, train_dataset=skimage_photos(64),
                               processing_class=fresh_pipe.processor)


def lora_gradients(trainer) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_gradient_at_the_old_policy_is_the_advantage_weighted_flow_matching_gradient(fresh_pipe, config, beta):
    """At θ = θ_old, the NFT loss's gradient equals that of Σ A·L(v_θ) (adaptive flow loss), whatever β."""
    trainer = make(fresh_pipe, config(nft_beta=beta, reference_weight=0.0, timestep_fraction=0.5))
    model = trainer.model
    with fresh_pipe.masked_attention():
        trainer._window = (0, 0)
        rollout = trainer._rollout(list(skimage_photos(64).select(range(1))))
        advantages = rollout["advantages"]
        assert rollout["trajectory"].latents.shape[1] == 1  # only the clean latents are kept
        assert advantages.abs().max() > 0.1  # a real signal to weight by
        model.zero_grad()
        trainer.update(model, rollout, fresh=True)
        got = lora_gradients(trainer)

        model.zero_grad()
        trajectory, steps = rollout["trajectory"], trainer._trained_steps()
        x0 = trajectory.latents[:, -1]
        generators = trainer._generators(TRAINING_NOISE_STREAM, len(x0))
        indices = trainer.trained_timesteps(len(x0))  # each sample its own timesteps
        assert len({tuple(row) for row in indices.tolist()}) > 1
        for position in range(len(steps)):
            t = trajectory.sigmas[indices[:, position]].view(-1, 1, 1, 1)
            noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators])
            x_t = (1 - t) * x0 + t * noise
            v = SD3Family(fresh_pipe).velocity(model, x_t, trajectory.timesteps[indices[:, position]],
                                               rollout["conditioning"], 1.0)
            expected_loss = (advantages.double() * adaptive_flow_loss(v, x_t, x0, t)).mean()
            (expected_loss.float() / len(steps)).backward()
        expected = lora_gradients(trainer)
    assert got.keys() == expected.keys()
    scale = max(float(g.abs().max()) for g in expected.values())
    assert scale > 0
    assert all(torch.allclose(got[name], expected[name], atol=1e-5 * scale, rtol=1e-4) for name in got)


def test_loss_gradient_sign_follows_the_advantage():
    """Away from the formula's special point too: a positive advantage pulls v_θ towards ε - x0, a negative one
    pushes it away (the negative branch is what keeps DiffusionNFT from collapsing)."""
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    t = 0.6
    x_t = (1 - t) * x0 + t * noise
    v_old = (noise - x0) + 0.3 * torch.randn(2, 4, 8, 8, generator=generator)
    v = v_old.clone().requires_grad_(True)
    advantages = torch.tensor([2.0, -2.0])
    loss = diffusion_nft_loss(v, v_old, x_t, x0, t, 0.5 + advantages / 10, beta=1.0, scale=5.0).sum()
    loss.backward()
    towards_target = -((noise - x0) - v_old)  # the direction of steepest increase of the error
    alignment = (v.grad * towards_target).flatten(1).sum(1)
    assert alignment[0] > 0 and alignment[1] < 0


def test_old_policy_follows_its_schedule(fresh_pipe, config):
    args = config(max_steps=4, learning_rate=5e-2, old_policy_decay_rate=0.2, old_policy_decay_max=0.3,
                  old_policy_hold_steps=1)
    assert [args.old_policy_decay(step) for step in (1, 2, 3, 4)] == [0.0, 0.2, pytest.approx(0.3), 0.3]
    trainer = make(fresh_pipe, args)
    live = lambda: {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}  # noqa: E731
    expected = live()
    assert all(torch.equal(trainer.old_policy.weights[n], expected[n]) for n in expected)  # starts as θ

    class Follow(TrainerCallback):  # runs after the trainer's own step-end callback: the old policy already moved
        def on_step_end(self, args, state, control, **kwargs):
            eta = args.old_policy_decay(state.global_step)
            for name, value in live().items():
                expected[name] = eta * expected[name] + (1 - eta) * value

    trainer.add_callback(Follow())
    trainer.train()
    old = trainer.old_policy.weights
    assert all(torch.allclose(old[n], expected[n], atol=1e-6) for n in expected)
    now = live()
    assert any(not torch.allclose(old[n], now[n]) for n in now)  # it lags behind the trained weights


def test_each_sample_trains_on_its_own_random_timesteps(fresh_pipe, config):
    """As the reference: int(T·timestep_fraction) of the T timesteps per sample, drawn without replacement, so a
    micro-batch mixes timesteps and the last timestep trains too (with probability 0.9 at T = 10)."""
    trainer = make(fresh_pipe, config(decoder_num_inference_steps=10))
    trainer._window = (0, 0)
    indices = trainer.trained_timesteps(400)
    assert indices.shape == (400, 9)
    assert all(len(set(row)) == 9 and set(row) <= set(range(10)) for row in indices.tolist())
    counts = torch.bincount(indices.flatten(), minlength=10) / 400
    assert counts.min() > 0.8 and counts.max() <= 1.0  # each timestep, the last included, in ~90% of samples
    assert len(set(indices[:, 0].tolist())) == 10  # one position mixes every timestep across samples


def test_rollouts_are_sampled_by_the_old_policy(fresh_pipe, config):
    """The reference samples with its "old" adapter: the rollouts follow θ_old, not the trained weights."""
    trainer = make(fresh_pipe, config())
    rows = list(skimage_photos(64).select(range(1)))
    trained = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    moved = {n: w + 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
             for n, w in trainer.old_policy.weights.items()}

    def rollout():
        trainer._window = (0, 0)
        return trainer._rollout(rows)["trajectory"].latents

    with fresh_pipe.masked_attention():
        at_start = rollout()
        trainer.old_policy.weights = {n: w.clone() for n, w in moved.items()}
        from_old = rollout()
        with torch.no_grad():
            for name, parameter in trained.items():
                parameter.copy_(moved[name])
        both_moved = rollout()
        with torch.no_grad():
            for parameter in trained.values():
                parameter.add_(0.05)
        only_live_moved = rollout()
    assert not torch.allclose(from_old, at_start)
    assert torch.equal(from_old, both_moved) and torch.equal(from_old, only_live_moved)


def test_rollouts_give_the_dit_integer_timesteps_as_the_reference(fresh_pipe, config, monkeypatch):
    """DiffusionNFT's sampler gives its DiT ⌊1000σ⌋; the trajectory keeps the scheduler's own timesteps."""
    trainer = make(fresh_pipe, config())
    seen, forward = [], fresh_pipe.transformer.forward

    def recording(*args, **kwargs):
        seen.append(kwargs["timestep"].clone())
        return forward(*args, **kwargs)

    monkeypatch.setattr(fresh_pipe.transformer, "forward", recording)
    with fresh_pipe.masked_attention():
        trainer._window = (0, 0)
        trajectory = trainer._rollout(list(skimage_photos(64).select(range(1))))["trajectory"]
    expected = (trajectory.sigmas[:-1].float() * 1000).long()
    assert [int(timestep[0]) for timestep in seen] == expected.tolist()
    assert all(not timestep.is_floating_point() for timestep in seen)
    assert not torch.equal(trajectory.timesteps, trajectory.timesteps.floor())  # the schedule's are not integers


def test_the_ema_is_on_by_default_and_blends_every_step_as_the_reference(fresh_pipe, config, monkeypatch):
    """DiffusionNFT's EMA: decay 0.9, blended after every optimizer step s with decay min(0.9, (1 + s) / (10 + s))."""
    assert (DiffusionNFTConfig.ema_decay, DiffusionNFTConfig.ema_update_interval) == (0.9, 1)
    trainer = make(fresh_pipe, config(max_steps=3, learning_rate=5e-2))
    live = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    ema = {n: w.clone() for n, w in trainer.ema.weights.items()}
    history = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            history.append((state.global_step, {n: p.detach().clone() for n, p in live.items()},
                            {n: w.clone() for n, w in trainer.ema.weights.items()}))

    trainer.add_callback(Record())
    trainer.train()
    assert [step for step, _, _ in history] == [1, 2, 3]
    for step, weights, blended in history:
        decay = (1 + step) / (10 + step)
        ema = {n: decay * ema[n] + (1 - decay) * weights[n] for n in ema}
        for name in ema:
            torch.testing.assert_close(blended[name], ema[name], rtol=1e-5, atol=1e-7)


def test_evaluate_scores_the_saved_ema_as_a_fresh_pipeline_loading_it_does(fresh_pipe, config, tiny_dir, tmp_path,
                                                                           monkeypatch):
    """With the EMA on (the default), `save_model` writes the EMA; the logged `eval_*` numbers are that saved LoRA's,
    as a fresh pipeline that loads it scores it (DiffusionNFT's reference evaluates its EMA too)."""
    photos = skimage_photos(64)
    train, held_out = photos.select(range(4)), photos.select(range(4, 6))
    trainer = DiffusionNFTTrainer(model=fresh_pipe.vlm, decoder=fresh_pipe, train_dataset=train, eval_dataset=held_out,
                                  args=config(max_steps=2, learning_rate=5e-2, eval_strategy="steps", eval_steps=2),
                                  processing_class=fresh_pipe.processor)
    trainer.train()
    logged = next(record for record in trainer.state.log_history if "eval_reward" in record)
    assert logged["step"] == 2
    trainer.save_model(str(tmp_path / "lora"))
    live_weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="image"):  # fails inside the swap: the live weights are back all the same
        trainer.evaluate(held_out.rename_column("image", "picture"))
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, live_weights[name]), name

    fresh = load_uae_pipeline(tiny_dir / "decoder", tiny_dir / "encoder", tiny_dir / "projector")
    fresh.load_lora_weights(tmp_path / "lora", weight_name=LORA_WEIGHT_NAME)
    fresh.fuse_lora()  # the saved LoRA is the DiT's own now; the scoring trainer's new LoRA starts at zero
    fresh.unload_lora_weights()
    scorer = DiffusionNFTTrainer(model=fresh.vlm, decoder=fresh, train_dataset=train, eval_dataset=held_out,
                                 args=config(output_dir=str(tmp_path / "scorer")), processing_class=fresh.processor)
    saved = scorer.evaluate()
    with monkeypatch.context() as patch:  # the live weights, for scale: what evaluate() scored before
        patch.setattr(trainer, "ema", None)
        live = trainer.evaluate()
    for name in ("eval_reward", "eval_reconstruction/clip"):
        assert logged[name] == pytest.approx(saved[name], abs=1e-6), name
    assert abs(live["eval_reward"] - saved["eval_reward"]) > 1e-4


def test_trains_the_dit_lora_and_saves_it_as_diffusers_loads_it(fresh_pipe, config, tiny_dir, tmp_path):
    trainer = make(fresh_pipe, config(max_steps=2, learning_rate=5e-2, ema_decay=None))
    assert not isinstance(trainer, FlowGRPOTrainer) and trainer.model is fresh_pipe.transformer
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora" in n for n in changed)
    record = next(r for r in trainer.state.log_history if "nft/optimality_mean" in r)
    assert {"reward", "loss", "kl", "nft/velocity_to_old", "timing/rollout_s", "reconstruction/clip"} <= set(record)
    assert record["trained_steps"] == 3  # the first int(4 * 0.99) steps of the rollout's schedule
    assert 0 <= record["nft/optimality_mean"] <= 1
    # per_device_train_batch_size counts samples, as in TRL's GRPO: 4 = one image × a group of 4
    assert len(trainer.last_batch.rewards) == 4 and len(set(trainer.last_batch.captions)) == 1

    trainer.save_model(str(tmp_path / "lora"))
    trainer.create_model_card(model_name="nft-lora")
    card = (tmp_path / "run" / "README.md").read_text()
    assert "DiffusionNFT" in card and "DiffusionNFTTrainer" in card
    saved = load_file(tmp_path / "lora" / LORA_WEIGHT_NAME)
    fresh = load_uae_pipeline(tiny_dir / "decoder", tiny_dir / "encoder", tiny_dir / "projector")
    fresh.load_lora_weights(tmp_path / "lora", weight_name=LORA_WEIGHT_NAME)
    def by_layer(module):  # parameter name without the adapter's name ("default" here, "default_0" once loaded)
        return {re.sub(r"\.default(_0)?\.", ".", n): p.detach() for n, p in module.named_parameters() if "lora" in n}

    loaded, trained = by_layer(fresh.transformer), by_layer(trainer.model)
    assert loaded.keys() == trained.keys() and len(loaded) == len(saved) > 0
    assert all(torch.equal(loaded[n], trained[n]) for n in trained)


def test_rollouts_are_unguided_deterministic_ode_samples(fresh_pipe, config, monkeypatch):
    """The clean latents of a rollout depend on neither the step-noise stream (no SDE noise) nor the guidance scale
    (no CFG): only on the initial noise."""
    import uae_hf.trainer.decoder_rl_trainer as rl

    trainer = make(fresh_pipe, config())
    rows = list(skimage_photos(64).select(range(1)))
    with fresh_pipe.masked_attention():
        trainer._window = (0, 0)
        first = trainer._rollout(rows)["trajectory"].latents
        trainer.args.decoder_guidance_scale = 9.0
        monkeypatch.setattr(rl, "STEP_NOISE_STREAM", 99)
        second = trainer._rollout(rows)["trajectory"].latents
        monkeypatch.setattr(rl, "SAMPLE_NOISE_STREAM", 98)
        third = trainer._rollout(rows)["trajectory"].latents
    assert torch.equal(first, second)
    assert not torch.allclose(first, third)  # while the initial noise does matter


def test_rollouts_sample_with_the_reference_s_second_order_solver_by_default(fresh_pipe, config):
    trainer = make(fresh_pipe, config())
    assert trainer.rollout_settings() == (0.0, "dpm2", 1.0)
    trainer.args.rollout_solver = "euler"
    assert trainer.rollout_settings() == (0.0, "sde", 1.0)  # the SDE step at noise level 0 is Euler's step


def test_bad_configurations(make_config):
    with pytest.raises(ValueError, match="rollout_solver"):
        make_config("generation_nft", rollout_solver="heun")
    with pytest.raises(ValueError, match="nft_beta"):
        make_config("generation_nft", nft_beta=0.0)
    with pytest.raises(ValueError, match="old policy schedule"):
        make_config("generation_nft", old_policy_decay_max=1.0)
    with pytest.raises(ValueError, match="reference_weight"):
        make_config("generation_nft", reference_weight=-1.0)
