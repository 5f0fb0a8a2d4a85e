"""DiffusionNFTTrainer: DiffusionNFT on the decoder's DiT, the encoder frozen (DESIGN.md §4b)."""

import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from uae_hf import DiffusionNFTTrainer, FlowGRPOTrainer, load_uae_pipeline
from uae_hf.sample_data import skimage_photos
from uae_hf.sampling.flow_sde import velocity
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
        for index in steps:
            t = trajectory.sigmas[index]
            noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators])
            x_t = (1 - t) * x0 + t * noise
            v = velocity(model, x_t, trajectory.timesteps[index], rollout["conditioning"], 1.0)
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


def test_trains_the_dit_lora_and_saves_it_as_diffusers_loads_it(fresh_pipe, config, tiny_dir, tmp_path):
    trainer = make(fresh_pipe, config(max_steps=2, learning_rate=5e-2))
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
