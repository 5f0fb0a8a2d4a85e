"""FLUX.1 (`FluxPipeline`): captions through CLIP-L (pooled) and T5 (the sequence), latents packed 2x2 into tokens
with their position ids, timesteps passed as t/1000, the resolution-dependent shift. FLUX.1-dev is guidance-distilled:
its guidance scale is an input of the DiT (one pass per step, no classifier-free guidance); FLUX.1-schnell reads
none."""

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from .base import DecoderFamily, per_row_timestep

# diffusers' FLUX LoRA training scripts' default targets (train_dreambooth_lora_flux.py): the joint attention's
# projections and the double blocks' feed-forwards (`attn.to_{q,k,v}` also match the single blocks' attention)
FLUX_LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2")
T5_MAX_SEQUENCE_LENGTH = 512  # the stock `__call__`'s `max_sequence_length`


class FluxFamily(DecoderFamily):
    """FLUX.1 [dev] / [schnell], read as `FluxPipeline.__call__` reads them with `true_cfg_scale=1` (the stock
    default: no negative prompt, one DiT pass per step). The guidance scale goes into the DiT's guidance embedding
    when `transformer.config.guidance_embeds` (FLUX.1-dev) and is ignored otherwise (FLUX.1-schnell)."""

    name = "FLUX.1"
    lora_target_modules = FLUX_LORA_TARGETS
    default_num_inference_steps = 28
    default_guidance_scale = 3.5

    # -------------------------------------------------------------------------------------------------- captions
    def encode_captions(self, captions, conditioning_mode=None, negative_prompt=None, num_images_per_prompt=1,
                        max_sequence_length=None) -> dict:
        """`FluxPipeline.encode_prompt`: T5's sequence (`prompt_embeds`) and CLIP's pooled output. The text position
        ids are all zeros of the sequence's length; [`velocity`] makes them (a `(seq, 3)` tensor has no batch
        dimension to select rows by)."""
        self.check_conditioning_mode(conditioning_mode)
        if negative_prompt is not None:
            raise ValueError(f"the {self.name} decoder reads no negative prompt (its guidance is the distilled "
                             "guidance embedding, one pass per step): pass negative_prompt=None")
        prompt_embeds, pooled_prompt_embeds, _ = self.pipe.encode_prompt(
            captions, device=self.pipe._execution_device, num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length or T5_MAX_SEQUENCE_LENGTH,
        )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}

    def caption_truncation(self, captions, max_sequence_length=None) -> list[bool]:
        """Whether T5, whose sequence the DiT attends to, cut each caption at `max_sequence_length` tokens (CLIP's
        pooled vector summarises the first 77 tokens of any caption: not counted)."""
        limit = max_sequence_length or T5_MAX_SEQUENCE_LENGTH
        return [len(ids) > limit for ids in self.pipe.tokenizer_2(captions)["input_ids"]]

    # ---------------------------------------------------------------------------------------------------- latents
    def initial_noise(self, batch_size, height, width, generator=None, device=None) -> torch.Tensor:
        """`FluxPipeline.prepare_latents`' draw, unpacked to `(batch, in_channels / 4, 2⌊h/16⌋, 2⌊w/16⌋)`."""
        pipe = self.pipe
        packed, _ = pipe.prepare_latents(batch_size, pipe.transformer.config.in_channels // 4, height, width,
                                         torch.float32, device, generator)
        return pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor)

    def schedule(self, num_inference_steps, height, width, device):
        """As `FluxPipeline.__call__` sets them: sigmas `linspace(1, 1/T, T)` (the scheduler's own with
        `use_flow_sigmas`), shifted by `mu = calculate_shift(image tokens)`."""
        pipe, config = self.pipe, self.pipe.scheduler.config
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if config.get("use_flow_sigmas", False):
            sigmas = None
        patch = 2 * pipe.vae_scale_factor  # one packed token per 2x2 latent pixels
        image_seq_len = (height // patch) * (width // patch)
        mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(pipe.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        return timesteps, pipe.scheduler.sigmas.to(device)

    def velocity(self, transformer, latents, timestep, conditioning, guidance_scale, detach_unconditional=False):
        """One DiT pass on the packed latents; `guidance_scale` is the guidance embedding's input where the DiT has
        one (no classifier-free guidance, so `detach_unconditional` changes nothing). The prediction comes back
        unpacked, spatial."""
        pipe = self.pipe
        dit = getattr(transformer, "module", transformer)  # a DistributedDataParallel wrapper holds the DiT
        dtype, device = dit.dtype, latents.device
        batch, channels, height, width = latents.shape
        embeds = conditioning["prompt_embeds"]
        guidance = None
        if dit.config.guidance_embeds:
            guidance = torch.full((batch,), guidance_scale, device=device, dtype=torch.float32)
        prediction = transformer(
            hidden_states=pipe._pack_latents(latents.to(dtype), batch, channels, height, width),
            timestep=per_row_timestep(timestep, batch).to(dtype) / 1000,
            guidance=guidance,
            pooled_projections=conditioning["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=pipe._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype),
            return_dict=False,
        )[0]
        scale = pipe.vae_scale_factor
        return pipe._unpack_latents(prediction, height * scale, width * scale, scale)

    def unguided_scale(self, guidance_scale: float) -> float:
        """`guidance_scale` itself: FLUX.1 runs its DiT once per step at any scale (FLUX.1-dev's distilled guidance is
        an input, FLUX.1-schnell ignores it)."""
        return guidance_scale
