"""SD3 / SD3.5 (`StableDiffusion3Pipeline`), read through `UAEReconstructionPipeline`: text mode through its CLIP-L/G
(+ T5) encoders, or UAE-native embeddings through the encoder LLM and the projector. Batched classifier-free guidance,
the pooled projection beside the text tokens, the scheduler's raw timesteps, a fixed or dynamic shift."""

import contextlib

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

from ..pipelines.uae_reconstruction.pipeline_uae_reconstruction import CONDITIONING_MODES, UAEReconstructionPipeline
from .base import DecoderFamily, classifier_free_guidance

SD3_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out")


class SD3Family(DecoderFamily):
    """SD3 / SD3.5. A plain `StableDiffusion3Pipeline` is read through a text-mode `UAEReconstructionPipeline`
    sharing its components (no copies); a UAE pipeline (from `uae_hf` or as remote code) is read as it is."""

    name = "SD3"
    lora_target_modules = SD3_LORA_TARGETS
    conditioning_modes = CONDITIONING_MODES
    default_num_inference_steps = 40  # `UAEReconstructionPipeline.generate`'s (the paper's)
    default_guidance_scale = 5.0

    def __init__(self, pipe):
        if not hasattr(pipe, "encode_captions"):
            pipe = UAEReconstructionPipeline.from_pipe(pipe, conditioning_mode="text")
        super().__init__(pipe)

    @property
    def conditioning_mode(self) -> str:
        return self.pipe.config.conditioning_mode

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.pipe.transformer.config.patch_size

    def caption_encoder(self, conditioning_mode=None):
        """In embeddings mode, the pipeline's `vlm` (the encoder LLM); CLIP and T5 in text mode."""
        return self.pipe.vlm if (conditioning_mode or self.conditioning_mode) == "embeddings" else None

    def masked_attention(self) -> contextlib.AbstractContextManager:
        return self.pipe.masked_attention()

    def encode_captions(self, captions, conditioning_mode=None, negative_prompt=None, num_images_per_prompt=1,
                        max_sequence_length=None) -> dict:
        """`UAEReconstructionPipeline.encode_captions`: SD3's denoising keyword arguments."""
        return self.pipe.encode_captions(captions, conditioning_mode, negative_prompt, num_images_per_prompt,
                                         max_sequence_length or 256)

    def caption_truncation(self, captions, max_sequence_length=None) -> list[bool]:
        return self.pipe.caption_truncation(captions, max_sequence_length or 256)

    def initial_noise(self, batch_size, height, width, generator=None, device=None) -> torch.Tensor:
        return self.pipe.prepare_latents(batch_size, self.pipe.transformer.config.in_channels, height, width,
                                         torch.float32, device, generator)

    def schedule(self, num_inference_steps, height, width, device):
        """As the SD3 pipeline sets them (shift, dynamic shifting included)."""
        pipe, scheduler_kwargs = self.pipe, {}
        if pipe.scheduler.config.get("use_dynamic_shifting", False):
            patch = pipe.transformer.config.patch_size
            image_seq_len = (height // pipe.vae_scale_factor // patch) * (width // pipe.vae_scale_factor // patch)
            config = pipe.scheduler.config
            scheduler_kwargs["mu"] = calculate_shift(
                image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5), config.get("max_shift", 1.16),
            )
        timesteps, _ = retrieve_timesteps(pipe.scheduler, num_inference_steps, device, **scheduler_kwargs)
        return timesteps, pipe.scheduler.sigmas.to(device)

    def velocity(self, transformer, latents, timestep, conditioning, guidance_scale, detach_unconditional=False):
        """Batched CFG when `guidance_scale > 1`; `conditioning` is what `encode_captions` returns (embeddings or
        text mode). A text mask (captions of different lengths) needs the masked joint attention installed."""
        guided = guidance_scale > 1
        embeds, pooled = conditioning["prompt_embeds"], conditioning["pooled_prompt_embeds"]
        model_input = latents
        if guided:
            embeds = torch.cat([conditioning["negative_prompt_embeds"], embeds])
            pooled = torch.cat([conditioning["negative_pooled_prompt_embeds"], pooled])
            model_input = torch.cat([latents, latents])
        dit = getattr(transformer, "module", transformer)  # a DistributedDataParallel wrapper holds the DiT
        attention_kwargs = conditioning.get("joint_attention_kwargs") or {}
        if "encoder_attention_mask" in attention_kwargs:
            # `masked_attention` sets every layer's processor at once, so the first block's tells (an O(1) look on
            # the sampler's hot path; by class name, which a remote-code copy of the pipeline shares)
            processor = type(dit.transformer_blocks[0].attn.processor).__name__
            if processor != "MaskedJointAttnProcessor":  # diffusers' own would drop the mask: padding attended
                raise ValueError(
                    f"the text mask of captions of different lengths needs the masked joint attention, but the DiT "
                    f"runs {processor}: call it inside `with pipe.masked_attention():` (or "
                    "masked_attention(transformer))"
                )
        dtype = dit.dtype
        prediction = transformer(
            hidden_states=model_input.to(dtype),
            timestep=timestep.expand(model_input.shape[0]),
            encoder_hidden_states=embeds.to(dtype),
            pooled_projections=pooled.to(dtype),
            joint_attention_kwargs=conditioning.get("joint_attention_kwargs"),
            return_dict=False,
        )[0]
        if not guided:
            return prediction
        unconditional, conditional = prediction.chunk(2)
        return classifier_free_guidance(conditional, unconditional, guidance_scale, detach_unconditional)

    @torch.no_grad()
    def generate(self, captions, **kwargs):
        """`UAEReconstructionPipeline.generate` (SD3's own denoising loop; its defaults: 40 steps, guidance 5.0)."""
        kwargs = {"output_type": "np"} | {name: value for name, value in kwargs.items() if value is not None}
        return self.pipe.generate(captions, **kwargs).images
