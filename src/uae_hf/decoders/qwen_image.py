"""Qwen-Image (`QwenImagePipeline`): captions read by Qwen2.5-VL through the pipeline's chat template (its first
`prompt_template_encode_start_idx` tokens dropped: embeds + mask), latents of a 3-D VAE packed 2x2 into tokens, the
timestep divided by 1000, true classifier-free guidance (a second pass on a negative prompt, the guided prediction
rescaled to the conditional one's norm), sigmas `linspace(1, 1/T, T)` under a resolution-dependent shift `mu`."""

import numpy as np
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

from .base import DecoderFamily, classifier_free_guidance, per_row_timestep

# the attention projections diffusers' Qwen-Image LoRA script trains by default (train_dreambooth_lora_qwen_image.py)
QWEN_IMAGE_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")


class QwenImageFamily(DecoderFamily):
    """Qwen-Image. `guidance_scale` is the stock pipeline's `true_cfg_scale`: above 1 each step runs the DiT on the
    caption and on the negative prompt, which is `" "` when none is given (Qwen-Image's published usage; the stock
    `__call__` guides only when given one). Its text encoder, Qwen2.5-VL, may be the very model UAE's encoder trains:
    build the pipeline with `text_encoder=<that model>` and the trainer holds one copy ([`caption_encoder`])."""

    name = "Qwen-Image"
    lora_target_modules = QWEN_IMAGE_LORA_TARGETS
    default_num_inference_steps = 50
    default_guidance_scale = 4.0  # the stock `true_cfg_scale`
    default_negative_prompt = " "
    default_max_sequence_length = 512  # the stock `__call__`'s

    def __init__(self, pipe):
        if pipe.transformer.config.guidance_embeds:
            raise ValueError("this Qwen-Image transformer is guidance-distilled (guidance_embeds=True), which the "
                             "Qwen-Image family does not read: use a Qwen-Image checkpoint with true CFG")
        super().__init__(pipe)

    def caption_encoder(self, conditioning_mode=None) -> torch.nn.Module:
        """The pipeline's Qwen2.5-VL text encoder: the encoder being trained when the pipeline was built with
        `text_encoder=<that model>`."""
        return self.pipe.text_encoder

    # -------------------------------------------------------------------------------------------------- captions
    def encode_captions(self, captions, conditioning_mode=None, negative_prompt=None, num_images_per_prompt=1,
                        max_sequence_length=None) -> dict:
        """The stock `encode_prompt` of the captions and of the negative prompt (encoded once, one row per image).
        A mask is `None` where no caption is padded, as the stock pipeline passes it."""
        self.check_conditioning_mode(conditioning_mode)
        pipe, length = self.pipe, max_sequence_length or self.default_max_sequence_length
        device = pipe._execution_device
        embeds, mask = pipe.encode_prompt(captions, device, num_images_per_prompt, max_sequence_length=length)
        negative = self.default_negative_prompt if negative_prompt is None else negative_prompt
        negative_embeds, negative_mask = pipe.encode_prompt([negative], device, max_sequence_length=length)
        rows = len(embeds)
        return {
            "prompt_embeds": embeds,
            "prompt_embeds_mask": mask,
            "negative_prompt_embeds": negative_embeds.expand(rows, -1, -1),
            "negative_prompt_embeds_mask": None if negative_mask is None else negative_mask.expand(rows, -1),
        }

    def caption_truncation(self, captions, max_sequence_length=None) -> list[bool]:
        """Whether the caption, in the chat template past its dropped prefix, runs beyond the tokens the DiT reads."""
        pipe = self.pipe
        limit = min(max_sequence_length or self.default_max_sequence_length, pipe.tokenizer_max_length)
        texts = [pipe.prompt_template_encode.format(caption) for caption in captions]
        return [len(ids) - pipe.prompt_template_encode_start_idx > limit for ids in pipe.tokenizer(texts).input_ids]

    # ---------------------------------------------------------------------------------------------------- latents
    def _latent_channels(self) -> int:
        return self.pipe.transformer.config.in_channels // 4

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        """`(B, C, h, w)` → the DiT's `(B, h/2 · w/2, 4C)` tokens."""
        batch, channels, height, width = latents.shape
        return self.pipe._pack_latents(latents, batch, channels, height, width)

    def _unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The DiT's tokens → spatial `(B, C, h, w)` (the stock 5-D latents' single frame) of an image of
        `height`x`width` pixels."""
        return self.pipe._unpack_latents(tokens, height, width, self.vae_scale_factor)[:, :, 0]

    def initial_noise(self, batch_size, height, width, generator=None, device=None) -> torch.Tensor:
        """The stock `prepare_latents` draw (`(B, 1, C, h, w)`, then packed), unpacked."""
        tokens = self.pipe.prepare_latents(batch_size, self._latent_channels(), height, width, torch.float32, device,
                                           generator)
        return self._unpack(tokens, height, width)

    def schedule(self, num_inference_steps, height, width, device):
        """As the stock `__call__` sets them: `linspace(1, 1/T, T)` shifted by `mu` of the packed sequence length."""
        pipe = self.pipe
        config = pipe.scheduler.config
        multiple = self.vae_scale_factor * 2
        image_seq_len = (height // multiple) * (width // multiple)
        mu = calculate_shift(
            image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        timesteps, _ = retrieve_timesteps(pipe.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        return timesteps, pipe.scheduler.sigmas.to(device)

    def velocity(self, transformer, latents, timestep, conditioning, guidance_scale, detach_unconditional=False):
        """One DiT pass on the caption, and with `guidance_scale > 1` one on the negative prompt: true CFG, the
        guided prediction rescaled per token to the conditional one's norm (the stock pipeline's)."""
        dit = getattr(transformer, "module", transformer)  # a DistributedDataParallel wrapper holds the DiT
        dtype = dit.dtype
        height, width = self.image_size(latents)
        tokens = self._pack(latents.to(dtype))
        batch = len(tokens)
        timestep = per_row_timestep(timestep, batch).to(dtype) / 1000
        img_shapes = [[(1, latents.shape[-2] // 2, latents.shape[-1] // 2)]] * batch

        def predict(embeds: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            return transformer(hidden_states=tokens, timestep=timestep, encoder_hidden_states=embeds.to(dtype),
                               encoder_hidden_states_mask=mask, img_shapes=img_shapes, return_dict=False)[0]

        prediction = predict(conditioning["prompt_embeds"], conditioning["prompt_embeds_mask"])
        if guidance_scale > 1:
            unconditional = predict(conditioning["negative_prompt_embeds"], conditioning["negative_prompt_embeds_mask"])
            guided = classifier_free_guidance(prediction, unconditional, guidance_scale, detach_unconditional)
            norms = torch.norm(prediction, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True)
            prediction = guided * norms
        return self._unpack(prediction, height, width)

    def decode(self, latents, output_type="np"):
        """The stock decoding: one frame for the 3-D VAE, denormalised with its `latents_mean` / `latents_std`."""
        pipe = self.pipe
        vae = pipe.vae
        latents = latents.unsqueeze(2).to(vae.dtype)
        shape, place = (1, vae.config.z_dim, 1, 1, 1), (latents.device, latents.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(*place)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(*place)
        images = vae.decode(latents / inverse_std + mean, return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(images, output_type=output_type)
