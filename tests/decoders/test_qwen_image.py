"""Qwen-Image behind the decoder protocol, on its offline twin: our sampler against `QwenImagePipeline.__call__` (true
CFG with a negative prompt), the SDE step's log-prob, bf16 sampling, both stage-3 objectives with the stock pipeline as
the decoder, the stage-2 reward with the decoder reading captions through the policy's own Qwen2.5-VL (one copy, its
LoRA disabled). Its recipes through `uae-hf train`: test_decoder_families.py."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline
from peft import LoraConfig
from safetensors.torch import load_file
from trainer.tiny_trainer_configs import tiny_config
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2_5_VLForConditionalGeneration

from uae_hf import DiffusionNFTTrainer, FlowGRPOTrainer, UnifiedGRPOTrainer
from uae_hf.decoders import QwenImageFamily, decoder_family, supported_pipelines
from uae_hf.images import decoded_images
from uae_hf.sample_data import skimage_photos
from uae_hf.sampling.flow_sde import flow_step, sample_trajectory

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# of different lengths: the shorter caption's text mask reaches the DiT
CAPTIONS = ["A close-up of a grey cat with green eyes.", "Text in the image reads \"OPEN 24 HOURS\" in bold capital "
            "letters above a glass door."]
HEIGHT, WIDTH, STEPS, GUIDANCE = 32, 64, 3, 4.0  # not square: packing keeps rows and columns apart


def twin_folder(tiny_dir) -> Path:
    return tiny_dir / "decoders" / "qwen_image"


def twin(tiny_dir, **kwargs) -> QwenImagePipeline:
    pipe = QwenImagePipeline.from_pretrained(twin_folder(tiny_dir), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(count: int = len(CAPTIONS)) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(100 + index) for index in range(count)]


def uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.int16)


@pytest.fixture(scope="module")
def qwen(tiny_dir):
    return twin(tiny_dir)


def test_the_twin_drops_its_template_prefix_as_qwen_does(qwen):
    """The twin's BPE splits the chat template's system turn into exactly the tokens the pipeline drops."""
    tokenizer, template = qwen.tokenizer, qwen.prompt_template_encode
    prefix = tokenizer(template.split("{}")[0]).input_ids
    assert len(prefix) == qwen.prompt_template_encode_start_idx == 34
    conditioning = decoder_family(qwen).encode_captions(CAPTIONS[:1])
    caption_and_suffix = tokenizer(template.format(CAPTIONS[0])).input_ids[len(prefix):]
    assert conditioning["prompt_embeds"].shape[1] == len(caption_and_suffix)
    assert conditioning["prompt_embeds_mask"] is None  # one caption, no padding: the stock pipeline passes no mask


def test_our_sampler_draws_what_the_stock_pipeline_draws(qwen):
    family = decoder_family(qwen)
    assert isinstance(family, QwenImageFamily) and family.default_guidance_scale == 4.0
    assert "QwenImagePipeline (Qwen-Image)" in supported_pipelines()  # named in any other pipeline's one line
    # the stock call guides with one negative prompt per caption (Qwen-Image's published " "); ours by default
    call = dict(height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, num_images_per_prompt=2)
    guided = dict(negative_prompt=[" "] * len(CAPTIONS), true_cfg_scale=GUIDANCE, **call)
    stock = qwen(CAPTIONS, generator=generators(4), output_type="np", **guided).images
    stock_timesteps, stock_sigmas = qwen.scheduler.timesteps.clone(), qwen.scheduler.sigmas.clone()
    stock_latents = qwen(CAPTIONS, generator=generators(4), output_type="latent", **guided).images
    stock_latents = qwen._unpack_latents(stock_latents, HEIGHT, WIDTH, qwen.vae_scale_factor)[:, :, 0]

    ours = family.generate(CAPTIONS, guidance_scale=GUIDANCE, generator=generators(4), **call)
    assert ours.shape == stock.shape == (4, HEIGHT, WIDTH, 3)
    assert np.abs(uint8(ours) - uint8(stock)).max() <= 1
    conditioning = family.encode_captions(CAPTIONS, num_images_per_prompt=2)
    assert conditioning["prompt_embeds_mask"] is not None  # the shorter caption is padded
    noise = family.initial_noise(4, HEIGHT, WIDTH, generators(4))
    trajectory = sample_trajectory(family, conditioning, noise, STEPS, GUIDANCE, noise_level=0.0)
    torch.testing.assert_close(trajectory.latents[:, -1], stock_latents, rtol=1e-5, atol=1e-5)
    # the schedule: linspace sigmas under the resolution-dependent exponential shift, as the stock call left it
    timesteps, sigmas = family.schedule(STEPS, HEIGHT, WIDTH, "cpu")
    assert torch.equal(timesteps, stock_timesteps) and torch.equal(sigmas, stock_sigmas)
    # unguided (one DiT pass per step) is the stock call without a negative prompt
    unguided = qwen(CAPTIONS[:1], true_cfg_scale=1.0, generator=generators(1), output_type="np",
                    **call | {"num_images_per_prompt": 1}).images
    ours_unguided = family.generate(CAPTIONS[:1], guidance_scale=1.0, generator=generators(1),
                                    **call | {"num_images_per_prompt": 1})
    assert np.abs(uint8(ours_unguided) - uint8(unguided)).max() <= 1
    assert np.abs(ours_unguided - ours[:1]).max() > 1e-3


@torch.no_grad()
def test_the_sde_step_log_prob_rescores_as_sampled(qwen):
    family = decoder_family(qwen)
    conditioning = family.encode_captions(CAPTIONS)
    noise = family.initial_noise(len(CAPTIONS), HEIGHT, WIDTH, generators())
    trajectory = sample_trajectory(family, conditioning, noise, STEPS, GUIDANCE, noise_level=0.7,
                                   generator=generators())
    assert trajectory.latents.shape == (2, STEPS + 1, 16, HEIGHT // 8, WIDTH // 8)
    for index in range(STEPS - 1):  # the last step, into σ = 0, draws no noise
        sample = trajectory.latents[:, index]
        velocity = family.velocity(family.transformer, sample, trajectory.timesteps[index], conditioning, GUIDANCE)
        step = flow_step("sde", velocity, sample, trajectory.sigmas, index, 0.7,
                         prev_sample=trajectory.latents[:, index + 1])
        torch.testing.assert_close(step.log_prob, trajectory.log_probs[:, index], rtol=0, atol=1e-5)
        residual = (trajectory.latents[:, index + 1] - step.mean) / step.std  # the Gaussian's own draw
        assert 0.8 < float(residual.std()) < 1.2


def test_detached_unconditional_branch_keeps_the_value_and_drops_its_gradient(qwen):
    family = decoder_family(qwen)
    with torch.no_grad():
        conditioning = family.encode_captions(CAPTIONS[:1])
    noise = family.initial_noise(1, HEIGHT, WIDTH, generators(1))
    gradients, values = [], []
    for detach in (False, True):
        negative = conditioning["negative_prompt_embeds"].detach().clone().requires_grad_(True)
        velocity = family.velocity(family.transformer, noise, torch.tensor(700.0),
                                   conditioning | {"negative_prompt_embeds": negative}, GUIDANCE,
                                   detach_unconditional=detach)
        velocity.square().sum().backward()
        values.append(velocity.detach())
        gradients.append(negative.grad)
    family.transformer.zero_grad(set_to_none=True)
    assert torch.equal(values[0], values[1])
    assert gradients[0].abs().max() > 0 and gradients[1] is None


def test_bf16_twin_samples_in_bf16(tiny_dir):
    pipe = twin(tiny_dir, torch_dtype=torch.bfloat16)
    family = decoder_family(pipe)
    assert all(parameter.dtype == torch.bfloat16 for parameter in family.transformer.parameters())
    conditioning = family.encode_captions(CAPTIONS)
    noise = family.initial_noise(2, HEIGHT, WIDTH, generators())
    velocity = family.velocity(family.transformer, noise, torch.tensor(1000.0), conditioning, GUIDANCE)
    assert velocity.dtype == torch.bfloat16 and velocity.shape == noise.shape
    images = family.generate(CAPTIONS, height=HEIGHT, width=WIDTH, num_inference_steps=2, guidance_scale=GUIDANCE,
                             generator=generators())
    assert images.shape == (2, HEIGHT, WIDTH, 3) and np.isfinite(images).all()


def stage_config(stage, tiny_dir, output_dir, **overrides):
    settings = dict(decoder_height=32, decoder_width=32, decoder_num_inference_steps=2, decoder_guidance_scale=GUIDANCE,
                    per_device_train_batch_size=2, num_generations=2, max_steps=1)
    return tiny_config(stage, tiny_dir, output_dir, **settings | overrides)


@pytest.mark.parametrize("trainer_class, stage", [(FlowGRPOTrainer, "generation"),
                                                  (DiffusionNFTTrainer, "generation_nft")])
def test_stage_3_trains_a_lora_the_stock_pipeline_loads(trainer_class, stage, tiny_dir, tmp_path):
    decoder = twin(tiny_dir)
    decoder.transformer.register_to_config(_name_or_path="Qwen/Qwen-Image")  # as if from the Hub
    args = stage_config(stage, tiny_dir, tmp_path / "run", ema_decay=None, learning_rate=5e-2)
    trainer = trainer_class(model=Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "encoder"),
                            decoder=decoder, args=args, train_dataset=skimage_photos(32),
                            processing_class=AutoProcessor.from_pretrained(tiny_dir / "encoder"))
    assert trainer.model is decoder.transformer and trainer.decoder is decoder
    trainer.train()
    record = next(r for r in trainer.state.log_history if "reward" in r)
    assert np.isfinite(record["reward"])
    if trainer_class is FlowGRPOTrainer:  # a fresh rollout's first update is on-policy (true CFG in the rollout)
        assert record["ratio/first_update_max_deviation"] <= 1e-4
    trainer.save_model()
    trainer.create_model_card()
    card = (tmp_path / "run" / "README.md").read_text()
    assert "Qwen/Qwen-Image" in card and "`QwenImagePipeline` (Qwen-Image family)" in card

    stock = twin(tiny_dir)
    call = dict(negative_prompt=" ", true_cfg_scale=GUIDANCE, height=32, width=32, num_inference_steps=2,
                output_type="np")
    before = stock(CAPTIONS[:1], generator=generators(1), **call).images
    stock.load_lora_weights(tmp_path / "run", weight_name=LORA_WEIGHT_NAME)
    after = stock(CAPTIONS[:1], generator=generators(1), **call).images
    assert np.abs(after - before).max() > 1e-3
    # every trained LoRA layer, alpha included: the stock pipeline draws what the trained decoder draws
    saved = load_file(tmp_path / "run" / LORA_WEIGHT_NAME)
    assert len(saved) == sum("lora" in name for name, _ in decoder.transformer.named_parameters())
    assert all(".attn.to_" in name for name in saved)  # diffusers' Qwen-Image LoRA targets
    trained = decoder_family(decoder).generate(CAPTIONS[:1], height=32, width=32, num_inference_steps=2,
                                               guidance_scale=GUIDANCE, generator=generators(1))
    assert np.abs(uint8(trained) - uint8(after)).max() <= 1


def test_stage_2_reads_captions_through_the_policys_frozen_base(tiny_dir, tmp_path):
    """The pipeline built with text_encoder=<the policy>: one copy, read with the LoRA disabled while decoding, so a
    caption's reward is the one a pipeline with an untouched copy of the base text encoder gives it."""
    encoder_folder = twin_folder(tiny_dir) / "text_encoder"  # Qwen-Image's text encoder, an encoder twin
    policy = AutoModelForImageTextToText.from_pretrained(encoder_folder)
    processor = AutoProcessor.from_pretrained(encoder_folder)
    decoder = twin(tiny_dir, text_encoder=policy)
    args = stage_config("understanding", tiny_dir, tmp_path / "run", max_steps=2, reward_fixed_noise=True)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = UnifiedGRPOTrainer(model=policy, decoder=decoder, args=args, train_dataset=skimage_photos(32),
                                 processing_class=processor, peft_config=lora)
    assert trainer._decoder_caption_encoder() is trainer._policy_base_model() is decoder.text_encoder
    trainer.train()
    batch = trainer.last_batch
    assert len(batch.rewards) == 2 and np.isfinite(batch.rewards).all()

    untouched = decoder_family(twin(tiny_dir))  # its own text encoder: the base weights, never adapted
    family = trainer.decoder_family
    with torch.no_grad():
        adapted = family.encode_captions(CAPTIONS)["prompt_embeds"]
        with trainer._decoder_text_path():
            inside = family.encode_captions(CAPTIONS)["prompt_embeds"]
        base = untouched.encode_captions(CAPTIONS)["prompt_embeds"]
    assert not torch.allclose(adapted, base, atol=1e-4)  # the LoRA trained: the policy reads captions otherwise
    torch.testing.assert_close(inside, base, rtol=0, atol=1e-6)
    # the reward of a caption is the untouched pipeline's drawing of it, scored against its image
    reward = trainer.reconstruction_reward
    drawn = untouched.generate(batch.captions, height=32, width=32, num_inference_steps=2, guidance_scale=GUIDANCE,
                               generator=reward.noise_generators(len(batch.captions), 0))
    scores = reward.similarity.scores(decoded_images(drawn), batch.originals)["clip"]
    np.testing.assert_allclose(batch.rewards, scores.numpy(), rtol=0, atol=1e-6)


def test_one_copy_needs_the_pipeline_built_with_the_policy_or_a_lora(tiny_dir, tmp_path):
    encoder_folder = twin_folder(tiny_dir) / "text_encoder"
    processor = AutoProcessor.from_pretrained(encoder_folder)
    args = stage_config("understanding", tiny_dir, tmp_path / "run", decoder_text_encoder="policy")
    with pytest.raises(ValueError, match=r"decoder's `text_encoder` must be that model: build the decoder with "
                                         r"text_encoder=<the model"):
        UnifiedGRPOTrainer(model=AutoModelForImageTextToText.from_pretrained(encoder_folder), decoder=twin(tiny_dir),
                           args=args, train_dataset=skimage_photos(32), processing_class=processor)
    policy = AutoModelForImageTextToText.from_pretrained(encoder_folder)
    with pytest.raises(ValueError, match="full fine-tuning of the very model the decoder reads captions with"):
        UnifiedGRPOTrainer(model=policy, decoder=twin(tiny_dir, text_encoder=policy),
                           args=stage_config("understanding", tiny_dir, tmp_path / "run"),
                           train_dataset=skimage_photos(32), processing_class=processor)
