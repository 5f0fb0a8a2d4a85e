"""FlowGRPOTrainer: Flow-GRPO on the decoder's DiT, the encoder frozen."""

import pytest
import torch
from safetensors.torch import load_file
from trl import GRPOTrainer

from uae_hf import FlowGRPOTrainer, UnifiedGRPOTrainer, load_uae_pipeline
from uae_hf.sample_data import skimage_photos

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@pytest.fixture()
def config(make_config, tmp_path):
    def make(**overrides):
        own = dict(output_dir=str(tmp_path / "run"), decoder_num_inference_steps=4, decoder_guidance_scale=4.5)
        return make_config("generation", **own | overrides)

    return make


def make(fresh_pipe, args, dataset=None):
    return FlowGRPOTrainer(model=fresh_pipe.vlm, decoder=fresh_pipe, args=args,
                           train_dataset=dataset if dataset is not None else skimage_photos(64),
                           processing_class=fresh_pipe.processor)


def test_flow_grpo_trains_the_dit(fresh_pipe, config):
    trainer = make(fresh_pipe, config(beta=0.04, num_iterations=2, max_steps=4))
    # its own Trainer, not a GRPOTrainer: TRL's GRPO trains a language model, this trains the decoder's DiT
    assert isinstance(trainer, FlowGRPOTrainer) and not isinstance(trainer, (GRPOTrainer, UnifiedGRPOTrainer))
    assert trainer.model is fresh_pipe.transformer
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in name for name in trainable)
    assert not any(p.requires_grad for p in fresh_pipe.vlm.parameters())
    trainer.train()
    logs = [record for record in trainer.state.log_history if "ratio/mean" in record]
    first, second = logs[0], logs[1]
    # first update on a fresh rollout: the recomputed log-probs match the sampled ones exactly
    assert first["ratio/mean"] == 1.0 and first["ratio/max_deviation"] == 0.0 and first["kl"] == 0.0
    # second update on the same rollout (num_iterations=2): off-policy, so ratios move and get clipped
    assert second["ratio/max_deviation"] > 0 and second["ratio/clip_fraction"] > 0 and second["kl"] > 0
    assert {"timing/rollout_s", "timing/reward_s", "timing/update_s", "reconstruction/clip"} <= set(first)
    assert first["trained_steps"] == 3  # int(4 * 0.99)
    # the built-in health checks saw an on-policy first update and rewards that vary within groups
    assert first["ratio/first_update_max_deviation"] == 0.0 and "ratio/first_update_max_deviation" not in second
    assert first["reward/groups_without_variation"] == 0.0 and not trainer.health.warned


def test_timestep_window_restricts_the_trained_steps(fresh_pipe, config):
    # the first int(T * fraction) steps of the window, as many as it holds
    trainer = make(fresh_pipe, config(decoder_num_inference_steps=10, timestep_fraction=0.5, timestep_window="2:6"))
    assert trainer._trained_steps() == [2, 3, 4, 5]
    trainer.args.timestep_window = "4:10"
    assert trainer._trained_steps() == [4, 5, 6, 7, 8]
    trainer.args.timestep_window = None
    assert trainer._trained_steps() == [0, 1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.outcome
def test_an_update_climbs_its_objective_and_only_the_lora_changes(fresh_pipe, config, monkeypatch):
    """What a Flow-GRPO step must do, whatever the seed: after one optimizer step on a rollout, the advantage-weighted
    log-probability of that rollout's transitions has risen (to first order the change is the gradient times the
    step, which an AdamW step makes positive), and no weight but the LoRA's has moved.

    (An end-to-end "the reward rises in 40 steps" test stood here; on the twins, whose random CLIP scores every
    reconstruction within ±0.002, it passed on 3 of 8 seeds before the trainer split, so it measured luck.)"""
    from uae_hf.sampling import flow_step
    from uae_hf.decoders import SD3Family

    base = {name: p.detach().clone() for name, p in fresh_pipe.transformer.named_parameters()}
    args = config(max_steps=1, per_device_train_batch_size=8, num_generations=8, decoder_num_inference_steps=6,
                  timestep_fraction=1.0, learning_rate=1e-4, beta=0.0)
    trainer = make(fresh_pipe, args, skimage_photos(64).select([0]))
    rollouts = []
    sample = trainer._sample
    monkeypatch.setattr(trainer, "_sample", lambda rows: rollouts.append(sample(rows)) or rollouts[-1])
    trainer.train()
    (rollout,) = rollouts
    trajectory, advantages = rollout["trajectory"], rollout["advantages"]
    assert bool((advantages != 0).any())
    with torch.no_grad(), fresh_pipe.masked_attention():
        changes = []
        for index in range(6):
            v = SD3Family(fresh_pipe).velocity(fresh_pipe.transformer, trajectory.latents[:, index], trajectory.timesteps[index],
                                               rollout["conditioning"], args.decoder_guidance_scale)
            step = flow_step("sde", v, trajectory.latents[:, index], trajectory.sigmas, index, args.sde_noise_level,
                             prev_sample=trajectory.latents[:, index + 1])
            changes.append(step.log_prob - trajectory.log_probs[:, index])
    change = torch.stack(changes, dim=1)  # (samples, steps): log-prob after the update minus before
    assert float((advantages[:, None] * change).sum()) > 0, change
    assert float(change.abs().max()) > 0  # the update moved the policy at all
    for name, parameter in fresh_pipe.transformer.named_parameters():
        original = name.replace(".base_layer", "")
        if "lora" not in name:
            assert torch.equal(parameter, base[original]), name


def test_saved_lora_reproduces_the_trained_decoder(fresh_pipe, config, tiny_dir, tmp_path):
    trainer = make(fresh_pipe, config(max_steps=3, learning_rate=5e-2))
    trainer.train()
    out = tmp_path / "lora"
    trainer.save_model(str(out))
    trainer.args.output_dir = str(out)
    trainer.create_model_card()
    assert (out / LORA_WEIGHT_NAME).exists()
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "load_lora_weights" in card and "flow-grpo" in card

    def sample(pipe):
        return pipe.generate(["a cup on a table"], generator=[torch.Generator().manual_seed(7)], height=64, width=64,
                             num_inference_steps=4, output_type="np").images

    trained = sample(fresh_pipe)
    fresh = load_uae_pipeline(tiny_dir / "decoder", tiny_dir / "encoder", tiny_dir / "projector")
    fresh.set_progress_bar_config(disable=True)
    base = sample(fresh)
    fresh.load_lora_weights(out, weight_name=LORA_WEIGHT_NAME)
    assert fresh.transformer.peft_config["default_0"].lora_alpha == 16
    assert (trained != base).any()
    assert torch.equal(torch.from_numpy(sample(fresh)), torch.from_numpy(trained))


def test_ema_weights_are_what_gets_saved(fresh_pipe, config, tmp_path):
    trainer = make(fresh_pipe, config(max_steps=3, ema_decay=0.5, ema_update_interval=1, learning_rate=5e-2))
    trainer.train()
    trainer.save_model(str(tmp_path / "ema"))
    saved = load_file(tmp_path / "ema" / LORA_WEIGHT_NAME)
    live = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    name = next(iter(live))
    key = next(key for key in saved if name.replace(".default", "").split("transformer_blocks")[-1] in key)
    assert torch.allclose(saved[key], trainer.ema.weights[name]) and not torch.allclose(saved[key], live[name])


def test_bad_configurations(fresh_pipe, config):
    with pytest.raises(ValueError, match="num_generations"):
        config(per_device_train_batch_size=6)
    with pytest.raises(ValueError, match="timestep_window"):
        config(timestep_window="5:2")
    with pytest.raises(TypeError, match="reward_funcs"):  # the reward is the reconstruction's, by construction
        FlowGRPOTrainer(model=fresh_pipe.vlm, decoder=fresh_pipe, args=config(), train_dataset=skimage_photos(32),
                        reward_funcs=[lambda **kwargs: [0.0]])
    with pytest.raises(ValueError, match=r"must be a multiple of 2 \(num_iterations\)"):
        config(num_iterations=2, save_strategy="steps", save_steps=3)
    config(num_iterations=2, save_strategy="steps", save_steps=4)  # between rollouts: fine
