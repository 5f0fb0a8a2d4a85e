"""FLUX.1 behind the decoder protocol, on its offline twin (FLUX.1-dev-like: the guidance embedding): our sampler
against `FluxPipeline.__call__`, the SDE step's log-prob, bf16 sampling, both stage-3 objectives and the stage-2
reward with the stock pipeline as the decoder (its recipes through `uae-hf train`: test_decoder_families.py)."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file
from trainer.tiny_trainer_configs import tiny_config
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from uae_hf import DiffusionNFTTrainer, FlowGRPOTrainer, UnifiedGRPOTrainer
from uae_hf.decoders import FluxFamily, decoder_family
from uae_hf.images import decoded_images
from uae_hf.sample_data import skimage_photos
from uae_hf.sampling.flow_sde import flow_step, sample_trajectory

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
CAPTIONS = ["A close-up of a grey cat with green eyes.", "Text in the image reads \"OPEN 24 HOURS\" above a door."]
HEIGHT, WIDTH, STEPS, GUIDANCE = 32, 64, 3, 3.5  # not square: packing and position ids keep rows and columns apart


def twin(tiny_dir, **kwargs) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(tiny_dir / "decoders" / "flux1", **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(count: int = len(CAPTIONS)) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(100 + index) for index in range(count)]


def uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.int16)


@pytest.fixture(scope="module")
def flux(tiny_dir):
    return twin(tiny_dir)


def test_our_sampler_draws_what_the_stock_pipeline_draws(flux):
    family = decoder_family(flux)
    assert isinstance(family, FluxFamily) and family.transformer.config.guidance_embeds
    stock = flux(CAPTIONS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                 generator=generators(), output_type="np").images
    stock_timesteps, stock_sigmas = flux.scheduler.timesteps.clone(), flux.scheduler.sigmas.clone()
    stock_latents = flux(CAPTIONS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                         generator=generators(), output_type="latent").images
    stock_latents = flux._unpack_latents(stock_latents, HEIGHT, WIDTH, flux.vae_scale_factor)

    ours = family.generate(CAPTIONS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                           generator=generators())
    assert ours.shape == stock.shape == (2, HEIGHT, WIDTH, 3)
    assert np.abs(uint8(ours) - uint8(stock)).max() <= 1
    conditioning = family.encode_captions(CAPTIONS)
    noise = family.initial_noise(len(CAPTIONS), HEIGHT, WIDTH, generators())
    trajectory = sample_trajectory(family, conditioning, noise, STEPS, GUIDANCE, noise_level=0.0)
    torch.testing.assert_close(trajectory.latents[:, -1], stock_latents, rtol=1e-5, atol=1e-5)
    # the schedule: FLUX's linspace sigmas under the resolution-dependent shift, as the stock call left its scheduler
    timesteps, sigmas = family.schedule(STEPS, HEIGHT, WIDTH, "cpu")
    assert torch.equal(timesteps, stock_timesteps) and torch.equal(sigmas, stock_sigmas)
    assert torch.equal(trajectory.timesteps, stock_timesteps)
    # the guidance scale reaches the DiT's guidance embedding (FLUX.1-dev: no classifier-free guidance, one pass)
    other = family.generate(CAPTIONS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=1.0,
                            generator=generators())
    assert np.abs(other - ours).max() > 1e-3 and family.unguided_scale(GUIDANCE) == GUIDANCE
    with pytest.raises(ValueError, match="reads no negative prompt"):
        family.encode_captions(CAPTIONS, negative_prompt="blurry")
    # T5's sequence is what the DiT reads: a caption is cut where T5 cuts it
    assert family.caption_truncation(["a cat", " ".join(["cat"] * 20)], max_sequence_length=8) == [False, True]


def test_a_dit_without_guidance_embedding_reads_no_guidance(flux):
    """FLUX.1-schnell's layout: no guidance input, so the scale changes nothing, as in the stock pipeline."""
    config = dict(flux.transformer.config) | {"guidance_embeds": False}
    torch.manual_seed(0)
    schnell = FluxPipeline(**flux.components | {"transformer": type(flux.transformer).from_config(config).eval()})
    schnell.set_progress_bar_config(disable=True)
    family = decoder_family(schnell)
    settings = dict(height=HEIGHT, width=WIDTH, num_inference_steps=2)
    ours = family.generate(CAPTIONS, guidance_scale=GUIDANCE, generator=generators(), **settings)
    stock = schnell(CAPTIONS, guidance_scale=GUIDANCE, generator=generators(), output_type="np", **settings).images
    assert np.abs(uint8(ours) - uint8(stock)).max() <= 1
    assert np.array_equal(ours, family.generate(CAPTIONS, guidance_scale=1.0, generator=generators(), **settings))


def test_the_sde_step_log_prob_rescores_as_sampled(flux):
    family = decoder_family(flux)
    conditioning = family.encode_captions(CAPTIONS)
    noise = family.initial_noise(len(CAPTIONS), HEIGHT, WIDTH, generators())
    trajectory = sample_trajectory(family, conditioning, noise, STEPS, GUIDANCE, noise_level=0.7,
                                   generator=generators())
    assert trajectory.latents.shape == (2, STEPS + 1, 16, HEIGHT // 4, WIDTH // 4)
    for index in range(STEPS - 1):  # the last step, into σ = 0, draws no noise
        sample = trajectory.latents[:, index]
        velocity = family.velocity(family.transformer, sample, trajectory.timesteps[index], conditioning, GUIDANCE)
        target = trajectory.latents[:, index + 1]
        step = flow_step("sde", velocity, sample, trajectory.sigmas, index, 0.7, prev_sample=target)
        torch.testing.assert_close(step.log_prob, trajectory.log_probs[:, index], rtol=0, atol=1e-5)
        # and the sampled latent is that Gaussian's draw: its standardised residual is unit-variance noise
        residual = (target - step.mean) / step.std
        assert 0.8 < float(residual.std()) < 1.2


def test_bf16_twin_samples_in_bf16(tiny_dir):
    pipe = twin(tiny_dir, dtype=torch.bfloat16)
    family = decoder_family(pipe)
    assert all(parameter.dtype == torch.bfloat16 for parameter in family.transformer.parameters())
    conditioning = family.encode_captions(CAPTIONS[:1])
    noise = family.initial_noise(1, HEIGHT, WIDTH, generators(1))
    velocity = family.velocity(family.transformer, noise, torch.tensor(1000.0), conditioning, GUIDANCE)
    assert velocity.dtype == torch.bfloat16 and velocity.shape == noise.shape
    images = family.generate(CAPTIONS[:1], height=HEIGHT, width=WIDTH, num_inference_steps=2, generator=generators(1))
    assert images.shape == (1, HEIGHT, WIDTH, 3) and np.isfinite(images).all()


def stage_config(stage, tiny_dir, output_dir, **overrides):
    settings = dict(decoder_height=32, decoder_width=32, decoder_num_inference_steps=2, decoder_guidance_scale=3.5,
                    per_device_train_batch_size=2, num_generations=2, max_steps=1)
    return tiny_config(stage, tiny_dir, output_dir, **settings | overrides)


@pytest.mark.parametrize("trainer_class, stage", [(FlowGRPOTrainer, "generation"),
                                                  (DiffusionNFTTrainer, "generation_nft")])
def test_stage_3_trains_a_lora_the_stock_pipeline_loads(trainer_class, stage, tiny_dir, frozen_encoder, tmp_path):
    decoder = twin(tiny_dir)
    decoder.transformer.register_to_config(_name_or_path="black-forest-labs/FLUX.1-dev")  # as if from the Hub
    model, processor = frozen_encoder
    args = stage_config(stage, tiny_dir, tmp_path / "run", ema_decay=None, learning_rate=5e-2)
    trainer = trainer_class(model=model, decoder=decoder, args=args, train_dataset=skimage_photos(32),
                            processing_class=processor)
    assert trainer.model is decoder.transformer and trainer.decoder is decoder
    trainer.train()
    record = next(r for r in trainer.state.log_history if "reward" in r)
    assert np.isfinite(record["reward"])
    if trainer_class is FlowGRPOTrainer:  # a fresh rollout's first update is on-policy
        assert record["ratio/first_update_max_deviation"] <= 1e-4
    trainer.save_model()
    trainer.create_model_card()
    card = (tmp_path / "run" / "README.md").read_text()
    assert "black-forest-labs/FLUX.1-dev" in card and "`FluxPipeline` (FLUX.1 family)" in card

    stock = twin(tiny_dir)
    before = stock(CAPTIONS[:1], height=32, width=32, num_inference_steps=2, generator=generators(1),
                   output_type="np").images
    stock.load_lora_weights(tmp_path / "run", weight_name=LORA_WEIGHT_NAME)
    after = stock(CAPTIONS[:1], height=32, width=32, num_inference_steps=2, generator=generators(1),
                  output_type="np").images
    assert np.abs(after - before).max() > 1e-3
    # every trained LoRA layer, alpha included: the stock pipeline draws what the trained decoder draws
    lora_parameters = [name for name, _ in decoder.transformer.named_parameters() if "lora" in name]
    assert len(load_file(tmp_path / "run" / LORA_WEIGHT_NAME)) == len(lora_parameters)
    trained = decoder_family(decoder).generate(CAPTIONS[:1], height=32, width=32, num_inference_steps=2,
                                               generator=generators(1))
    assert np.abs(uint8(trained) - uint8(after)).max() <= 1


def test_stage_2_rewards_captions_with_the_stock_pipeline(tiny_dir, tmp_path):
    flux = twin(tiny_dir)
    args = stage_config("understanding", tiny_dir, tmp_path / "run", reward_fixed_noise=True)
    trainer = UnifiedGRPOTrainer(model=Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "encoder"),
                                 decoder=flux, args=args, train_dataset=skimage_photos(32),
                                 processing_class=AutoProcessor.from_pretrained(tiny_dir / "encoder"))
    trainer.train()
    batch = trainer.last_batch
    assert len(batch.rewards) == 2 and np.isfinite(batch.rewards).all()
    # the reward of a caption is the family's drawing of it scored against its image
    reward = trainer.reconstruction_reward
    drawn = decoder_family(flux).generate(batch.captions, height=32, width=32, num_inference_steps=2,
                                          guidance_scale=3.5, generator=reward.noise_generators(len(batch.captions), 0))
    scores = reward.similarity.scores(decoded_images(drawn), batch.originals)["clip"]
    np.testing.assert_allclose(batch.rewards, scores.numpy(), rtol=0, atol=1e-5)
    trainer.create_model_card()
    assert "conditioning" in (tmp_path / "run" / "README.md").read_text()
