"""FLUX.2 [klein] behind the decoder protocol, on its offline twin (base-like: not step-distilled, so classifier-free
guidance; a step-distilled view of it for the one-pass path): our sampler against `Flux2KleinPipeline.__call__`, the
SDE step's log-prob, bf16 sampling, both stage-3 objectives with the stock pipeline as the decoder (its recipes
through `uae-hf train`: test_decoder_families.py)."""

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from safetensors.torch import load_file
from trainer.tiny_trainer_configs import tiny_config

from uae_hf import DiffusionNFTTrainer, FlowGRPOTrainer, UnifiedGRPOTrainer
from uae_hf.decoders import Flux2KleinFamily, decoder_family
from uae_hf.sample_data import skimage_photos
from uae_hf.sampling.flow_sde import flow_step, sample_trajectory

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
CAPTIONS = ["A close-up of a grey cat with green eyes.", "Text in the image reads \"OPEN 24 HOURS\" above a door."]
HEIGHT, WIDTH, STEPS, GUIDANCE = 48, 32, 3, 4.0  # not square: rows and columns of the tokens stay apart


def twin(tiny_dir, **kwargs) -> Flux2KleinPipeline:
    pipe = Flux2KleinPipeline.from_pretrained(tiny_dir / "decoders" / "flux2_klein", **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(count: int = len(CAPTIONS)) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(200 + index) for index in range(count)]


def uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.int16)


def spatial(tokens: torch.Tensor) -> torch.Tensor:
    """The stock pipeline's packed latents `(batch, tokens, 4·C)` as this family's spatial ones."""
    return tokens.transpose(1, 2).reshape(len(tokens), -1, HEIGHT // 8, WIDTH // 8)


class PassCounter:
    """Counts the DiT's forward passes."""

    def __init__(self, module):
        self.count = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, *args):
        self.count += 1


@pytest.fixture(scope="module")
def klein(tiny_dir):
    return twin(tiny_dir)


@pytest.fixture(scope="module")
def conditioning(klein):
    """`CAPTIONS` encoded once for the module (captions and the negative prompt)."""
    with torch.no_grad():
        return decoder_family(klein).encode_captions(CAPTIONS)


@torch.no_grad()
def sample(family, conditioning, guidance_scale, noise_level=0.0, **kwargs):
    noise = family.initial_noise(len(CAPTIONS), HEIGHT, WIDTH, generators())
    return sample_trajectory(family, conditioning, noise, STEPS, guidance_scale, noise_level, **kwargs)


@torch.no_grad()
def draw(family, conditioning, guidance_scale) -> np.ndarray:
    """`generate` from already encoded captions."""
    return family.decode(sample(family, conditioning, guidance_scale).latents[:, -1])


def test_our_sampler_draws_what_the_stock_pipeline_draws_with_classifier_free_guidance(klein, conditioning):
    family = decoder_family(klein)
    assert isinstance(family, Flux2KleinFamily) and not klein.config.is_distilled
    call = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    final = {}

    def keep_latents(pipe, step, timestep, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    stock = klein(prompt=CAPTIONS, generator=generators(), output_type="np", callback_on_step_end=keep_latents,
                  **call).images
    stock_timesteps, stock_sigmas = klein.scheduler.timesteps.clone(), klein.scheduler.sigmas.clone()

    passes = PassCounter(klein.transformer)
    ours = family.generate(CAPTIONS, generator=generators(), **call)
    passes.handle.remove()
    assert passes.count == 2 * STEPS  # conditional and unconditional (the negative prompt "") at every step
    assert ours.shape == stock.shape == (2, HEIGHT, WIDTH, 3)
    assert np.abs(uint8(ours) - uint8(stock)).max() <= 1
    trajectory = sample(family, conditioning, GUIDANCE)
    assert trajectory.latents.shape == (2, STEPS + 1, 16, HEIGHT // 8, WIDTH // 8)  # patchified: 4 channels x 2x2
    torch.testing.assert_close(trajectory.latents[:, -1], spatial(final["latents"]), rtol=1e-5, atol=1e-5)
    # the schedule: linspace sigmas shifted by the empirical mu of (image tokens, steps), as the stock call left it
    timesteps, sigmas = family.schedule(STEPS, HEIGHT, WIDTH, "cpu")
    assert torch.equal(timesteps, stock_timesteps) and torch.equal(sigmas, stock_sigmas)
    assert torch.equal(trajectory.timesteps, stock_timesteps)
    # guidance moves the samples; unguided, one pass per step
    assert conditioning["negative_prompt_embeds"].shape == conditioning["prompt_embeds"].shape == (2, 512, 48)
    passes = PassCounter(klein.transformer)
    unguided = draw(family, conditioning, 1.0)
    passes.handle.remove()
    assert passes.count == STEPS and np.abs(uint8(unguided) - uint8(ours)).max() > 2
    assert family.unguided_scale(GUIDANCE) == 1.0
    # a chat-templated caption longer than the sequence is the one the stock pipeline cuts
    assert family.caption_truncation(["a cat", "a cat " * 40], max_sequence_length=64) == [False, True]


def test_a_step_distilled_checkpoint_runs_one_pass_and_ignores_guidance(klein, conditioning):
    distilled = Flux2KleinPipeline(**klein.components, is_distilled=True)  # the same weights, marked distilled
    distilled.set_progress_bar_config(disable=True)
    family = decoder_family(distilled)
    call = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    stock = distilled(prompt=CAPTIONS, generator=generators(), output_type="np", **call).images
    passes = PassCounter(distilled.transformer)
    ours = family.generate(CAPTIONS, generator=generators(), **call)
    passes.handle.remove()
    assert passes.count == STEPS and np.abs(uint8(ours) - uint8(stock)).max() <= 1
    assert family.encode_captions(CAPTIONS[:1])["negative_prompt_embeds"] is None
    unguided = draw(family, conditioning, 1.0)
    assert np.array_equal(ours, unguided)


def test_the_sde_step_log_prob_rescores_as_sampled(klein, conditioning):
    family = decoder_family(klein)
    trajectory = sample(family, conditioning, GUIDANCE, noise_level=0.7, generator=generators())
    with torch.no_grad():
        for index in range(STEPS - 1):  # the last step, into σ = 0, draws no noise
            latents = trajectory.latents[:, index]
            velocity = family.velocity(family.transformer, latents, trajectory.timesteps[index], conditioning,
                                       GUIDANCE)
            step = flow_step("sde", velocity, latents, trajectory.sigmas, index, 0.7,
                             prev_sample=trajectory.latents[:, index + 1])
            torch.testing.assert_close(step.log_prob, trajectory.log_probs[:, index], rtol=0, atol=1e-5)
            residual = (trajectory.latents[:, index + 1] - step.mean) / step.std  # the Gaussian's own draw
            assert 0.8 < float(residual.std()) < 1.2


def test_bf16_twin_samples_in_bf16(tiny_dir):
    pipe = twin(tiny_dir, dtype=torch.bfloat16)
    family = decoder_family(pipe)
    assert all(parameter.dtype == torch.bfloat16 for parameter in family.transformer.parameters())
    dtypes = []  # the DiT's inputs and prediction, at every pass
    hook = family.transformer.register_forward_hook(
        lambda module, args, kwargs, output: dtypes.append((kwargs["hidden_states"].dtype, output[0].dtype)),
        with_kwargs=True)
    images = family.generate(CAPTIONS[:1], height=HEIGHT, width=WIDTH, num_inference_steps=2,
                             guidance_scale=GUIDANCE, generator=generators(1))
    hook.remove()
    assert dtypes == [(torch.bfloat16, torch.bfloat16)] * 4  # two steps of two passes (CFG)
    assert images.shape == (1, HEIGHT, WIDTH, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("trainer_class, stage", [(FlowGRPOTrainer, "generation"),
                                                  (DiffusionNFTTrainer, "generation_nft")])
def test_stage_3_trains_a_lora_the_stock_pipeline_loads(trainer_class, stage, tiny_dir, frozen_encoder, tmp_path):
    decoder = twin(tiny_dir)
    decoder.transformer.register_to_config(_name_or_path="black-forest-labs/FLUX.2-klein-base-4B")  # as from the Hub
    model, processor = frozen_encoder
    args = tiny_config(stage, tiny_dir, tmp_path / "run", decoder_height=32, decoder_width=32,
                       decoder_num_inference_steps=2, decoder_guidance_scale=GUIDANCE, per_device_train_batch_size=2,
                       num_generations=2, max_steps=1, ema_decay=None, learning_rate=5e-2)
    trainer = trainer_class(model=model, decoder=decoder, args=args, train_dataset=skimage_photos(32),
                            processing_class=processor)
    assert trainer.model is decoder.transformer and trainer.decoder is decoder
    trained = {name for name, parameter in decoder.transformer.named_parameters() if parameter.requires_grad}
    assert trained and all(".attn.to_" in name and "single" not in name for name in trained)
    trainer.train()
    record = next(r for r in trainer.state.log_history if "reward" in r)
    assert np.isfinite(record["reward"])
    if trainer_class is FlowGRPOTrainer:  # a fresh rollout's first update is on-policy (here with CFG)
        assert record["ratio/first_update_max_deviation"] <= 1e-4
    trainer.save_model()
    trainer.create_model_card()
    card = (tmp_path / "run" / "README.md").read_text()
    assert "black-forest-labs/FLUX.2-klein-base-4B" in card and "`Flux2KleinPipeline` (FLUX.2 [klein] family)" in card

    stock = twin(tiny_dir)
    call = dict(height=32, width=32, num_inference_steps=2, guidance_scale=1.0, output_type="np")
    before = stock(prompt=CAPTIONS[:1], generator=generators(1), **call).images
    stock.load_lora_weights(tmp_path / "run", weight_name=LORA_WEIGHT_NAME)
    after = stock(prompt=CAPTIONS[:1], generator=generators(1), **call).images
    assert np.abs(uint8(after) - uint8(before)).max() > 0
    # every trained LoRA layer, alpha included: the stock pipeline draws what the trained decoder draws
    assert len(load_file(tmp_path / "run" / LORA_WEIGHT_NAME)) == len(trained)
    ours = decoder_family(decoder).generate(CAPTIONS[:1], height=32, width=32, num_inference_steps=2,
                                            guidance_scale=1.0, generator=generators(1))
    assert np.abs(uint8(ours) - uint8(after)).max() <= 1


def test_stage_2_reads_captions_with_the_policy_only_where_the_pipeline_holds_it(tiny_dir, frozen_encoder, tmp_path):
    """The decoder's caption reader is its Qwen3 text encoder: a policy that is not it cannot be the one read."""
    model, processor = frozen_encoder
    args = tiny_config("understanding", tiny_dir, tmp_path / "run", decoder_text_encoder="policy")
    with pytest.raises(ValueError, match=r"decoder's `text_encoder` must be that model: build the decoder with "
                                         r"text_encoder=<the model"):
        UnifiedGRPOTrainer(model=model, decoder=twin(tiny_dir), args=args, train_dataset=skimage_photos(32),
                           processing_class=processor)
