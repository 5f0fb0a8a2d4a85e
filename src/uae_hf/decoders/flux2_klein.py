"""FLUX.2 [klein] (`Flux2KleinPipeline`): captions read by Qwen3 through its chat template, the hidden states of chosen
layers stacked into the DiT's text tokens (with 4D text position ids); latents patchified 2x2 (channels x4), packed
into tokens with 4D image position ids; timesteps divided by 1000; classifier-free guidance (two passes, the
negative prompt "") when `guidance_scale > 1` and the checkpoint is not step-distilled, else one pass; the empirical,
resolution- and step-dependent shift; the VAE's batch-norm statistics de-normalise latents before decoding.

This family's spatial latents are the patchified ones, `(batch, 4·C, h/2, w/2)` for a VAE latent of `C` channels and
side `h`x`w`: the tensor the stock `prepare_latents` draws before packing it into tokens."""

import contextlib

import numpy as np
import torch
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

from .base import DecoderFamily, classifier_free_guidance, per_row_timestep

# what diffusers' own LoRA script for FLUX.2 [klein] targets by default: the double-stream blocks' attention
FLUX2_KLEIN_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
MAX_SEQUENCE_LENGTH = 512  # the stock `__call__`'s default


class Flux2KleinFamily(DecoderFamily):
    """FLUX.2 [klein] 4B / 9B, base (CFG) or step-distilled (`is_distilled` in the pipeline's config: one pass)."""

    name = "FLUX.2 [klein]"
    lora_target_modules = FLUX2_KLEIN_LORA_TARGETS
    default_num_inference_steps = 50
    default_guidance_scale = 4.0

    @property
    def distilled(self) -> bool:
        """A step-distilled checkpoint: it ignores `guidance_scale` (one DiT pass per step)."""
        return bool(self.pipe.config.is_distilled)

    def guided(self, guidance_scale: float) -> bool:
        """Whether the stock pipeline runs classifier-free guidance at `guidance_scale`."""
        return guidance_scale > 1 and not self.distilled

    def caption_encoder(self, conditioning_mode=None) -> torch.nn.Module:
        """The pipeline's Qwen3 text encoder: the encoder being trained when the pipeline was built with
        `text_encoder=<that model>` (any model whose forward returns hidden states of the stacked width)."""
        return self.pipe.text_encoder

    # -------------------------------------------------------------------------------------------------- captions
    def _chat_texts(self, captions: list[str]) -> list[str]:
        """Each caption as the stock pipeline hands it to the tokenizer: one user turn, thinking off."""
        return [self.pipe.tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                                        add_generation_prompt=True, enable_thinking=False)
                for caption in captions]

    def encode_captions(self, captions, conditioning_mode=None, negative_prompt=None, num_images_per_prompt=1,
                        max_sequence_length=None) -> dict:
        """`prompt_embeds` and `text_ids` of `Flux2KleinPipeline.encode_prompt` (Qwen3's layers 9, 18 and 27, padded
        to 512 tokens); for a checkpoint that is not step-distilled also those of the negative prompt (the stock
        pipeline's "" unless `negative_prompt` is given), one row per image."""
        self.check_conditioning_mode(conditioning_mode)
        pipe, length = self.pipe, max_sequence_length or MAX_SEQUENCE_LENGTH
        device = pipe._execution_device
        embeds, text_ids = pipe.encode_prompt(prompt=list(captions), device=device,
                                              num_images_per_prompt=num_images_per_prompt, max_sequence_length=length)
        negative_embeds = negative_text_ids = None
        if not self.distilled:
            negative_embeds, negative_text_ids = pipe.encode_prompt(
                prompt=[negative_prompt or ""] * len(captions), device=device,
                num_images_per_prompt=num_images_per_prompt, max_sequence_length=length,
            )
        return {"prompt_embeds": embeds, "text_ids": text_ids, "negative_prompt_embeds": negative_embeds,
                "negative_text_ids": negative_text_ids}

    def caption_truncation(self, captions, max_sequence_length=None) -> list[bool]:
        """Whether a caption's chat-templated tokens exceed the sequence length (the stock pipeline cuts them)."""
        length = max_sequence_length or MAX_SEQUENCE_LENGTH
        tokens = self.pipe.tokenizer(self._chat_texts(captions))["input_ids"]
        return [len(ids) > length for ids in tokens]

    # ---------------------------------------------------------------------------------------------------- latents
    def initial_noise(self, batch_size, height, width, generator=None, device=None) -> torch.Tensor:
        """The stock `prepare_latents` draw, `(batch, 4·C, h/2, w/2)`, unpacked from its tokens."""
        pipe = self.pipe
        channels = pipe.transformer.config.in_channels // 4
        tokens, _ = pipe.prepare_latents(batch_size, channels, height, width, torch.float32, device, generator)
        side = 2 * pipe.vae_scale_factor  # pixels per token
        return tokens.transpose(1, 2).reshape(batch_size, channels * 4, height // side, width // side)

    def image_size(self, latents):
        side = 2 * self.vae_scale_factor
        return latents.shape[-2] * side, latents.shape[-1] * side

    def schedule(self, num_inference_steps, height, width, device):
        """As the stock `__call__` sets them: sigmas linear from 1 to 1/T (unless the scheduler uses flow sigmas),
        shifted by `compute_empirical_mu(image tokens, T)`."""
        pipe = self.pipe
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(pipe.scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        side = 2 * pipe.vae_scale_factor
        mu = compute_empirical_mu(image_seq_len=(height // side) * (width // side), num_steps=num_inference_steps)
        timesteps, _ = retrieve_timesteps(pipe.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        return timesteps, pipe.scheduler.sigmas.to(device)

    def velocity(self, transformer, latents, timestep, conditioning, guidance_scale, detach_unconditional=False):
        """The DiT on the packed tokens (`t/1000`, no guidance embedding); with CFG a second pass on the negative
        prompt, `u + w·(c - u)` as the stock pipeline combines them (the unconditional pass without a graph when
        `detach_unconditional`). Returns spatial `(batch, 4·C, h/2, w/2)`."""
        dit = getattr(transformer, "module", transformer)  # a DistributedDataParallel wrapper holds the DiT
        dtype = dit.dtype
        batch, channels, height, width = latents.shape
        tokens = latents.reshape(batch, channels, height * width).transpose(1, 2).to(dtype)  # `_pack_latents`
        image_ids = self.pipe._prepare_latent_ids(latents).to(latents.device)
        timestep = per_row_timestep(timestep, batch).to(dtype) / 1000

        def predict(embeds, text_ids):
            prediction = transformer(hidden_states=tokens, timestep=timestep, guidance=None,
                                     encoder_hidden_states=embeds.to(dtype), txt_ids=text_ids, img_ids=image_ids,
                                     return_dict=False)[0]
            return prediction[:, : height * width].transpose(1, 2).reshape(batch, -1, height, width)

        conditional = predict(conditioning["prompt_embeds"], conditioning["text_ids"])
        if not self.guided(guidance_scale):
            return conditional
        with torch.no_grad() if detach_unconditional else contextlib.nullcontext():
            unconditional = predict(conditioning["negative_prompt_embeds"], conditioning["negative_text_ids"])
        return classifier_free_guidance(conditional, unconditional, guidance_scale, detach_unconditional)

    def decode(self, latents, output_type="np"):
        """De-normalise with the VAE's batch-norm statistics, unpatchify, decode, post-process."""
        pipe, vae = self.pipe, self.pipe.vae
        latents = latents.to(vae.dtype)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device,
                                                                                             latents.dtype)
        latents = pipe._unpatchify_latents(latents * std + mean)
        images = vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(images, output_type=output_type)
