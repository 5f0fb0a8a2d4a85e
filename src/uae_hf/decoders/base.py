"""[`DecoderFamily`]: what a diffusers text-to-image family differs in, behind one protocol.

The sampler (`sampling/flow_sde.py`), the reconstruction reward, the stage-3 trainers, the round trip and the CLI
read a decoder only through this protocol; each supported diffusers family is one module beside this one. Latents
are always spatial here, `(batch, channels, height, width)`: a family that packs them into tokens for its transformer
(FLUX, Qwen-Image) packs inside [`DecoderFamily.velocity`] and unpacks the prediction, so the SDE/CPS steps, their
log-probs (means over elements, which packing permutes) and the trainers never see a family's layout.
"""

import contextlib

import torch

from ..sampling.flow_sde import sample_trajectory


class DecoderFamily:
    """One diffusers pipeline, read the way its stock `__call__` reads it.

    A subclass (listed with the pipeline class it reads in `uae_hf.decoders.FAMILY_OF_PIPELINE`; a subclass of that
    pipeline, such as `UAEReconstructionPipeline`, counts) names the DiT's LoRA targets and implements the methods
    below.

    Args:
        pipe (`DiffusionPipeline`): the decoder; `self.pipe` may be a view of it the family needs (SD3: a
            `UAEReconstructionPipeline` sharing its components).
    """

    name = ""  # the family's name in messages and model cards, e.g. "FLUX.1"
    lora_target_modules: tuple[str, ...] = ()  # the DiT's modules a decoder LoRA adapts by default
    conditioning_modes: tuple[str, ...] = ("text",)  # "embeddings": UAE-native conditioning (SD3 only)
    default_num_inference_steps = 28  # the stock pipeline's defaults
    default_guidance_scale = 1.0

    def __init__(self, pipe):
        self.pipe = pipe

    # ----------------------------------------------------------------------------------------------- the pipeline
    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @property
    def conditioning_mode(self) -> str:
        """How the decoder reads captions by default: `"text"` (its own text encoders) or `"embeddings"`."""
        return "text"

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this (the VAE's downsampling times the DiT's patch)."""
        return self.vae_scale_factor * 2

    def default_size(self) -> int:
        """The decoder's native image side in pixels, as its stock pipeline defaults it."""
        return self.pipe.default_sample_size * self.vae_scale_factor

    def check_size(self, height: int, width: int) -> None:
        multiple = self.size_multiple
        if height % multiple or width % multiple:
            raise ValueError(f"the {self.name} decoder draws images whose sides are multiples of {multiple}; got "
                             f"{height}x{width}: pick a height and width divisible by {multiple}")

    def caption_encoder(self, conditioning_mode: str | None = None) -> torch.nn.Module | None:
        """The model that reads captions for the decoder in `conditioning_mode`, where it may be the encoder's own
        checkpoint (so one copy can serve both); `None` where it never is."""
        return None

    def masked_attention(self) -> contextlib.AbstractContextManager:
        """A context in which the DiT honours a text mask of captions of different lengths (SD3 needs one)."""
        return contextlib.nullcontext()

    # -------------------------------------------------------------------------------------------------- captions
    def encode_captions(self, captions: list[str], conditioning_mode: str | None = None,
                        negative_prompt: str | None = None, num_images_per_prompt: int = 1,
                        max_sequence_length: int | None = None) -> dict:
        """The DiT's conditioning for `captions` (item-major, `num_images_per_prompt` rows per caption), negative
        prompt included where the family's guidance needs one: a dict of tensors (and `None`s) that
        [`velocity`] reads. Gradients flow if enabled."""
        raise NotImplementedError

    def caption_truncation(self, captions: list[str], max_sequence_length: int | None = None) -> list[bool]:
        """Whether the decoder's text encoder cut each caption."""
        raise NotImplementedError

    def check_conditioning_mode(self, mode: str | None) -> str:
        mode = mode or self.conditioning_mode
        if mode not in self.conditioning_modes:
            raise ValueError(f"the {self.name} decoder reads captions as {' or '.join(self.conditioning_modes)}, not "
                             f"{mode!r}: UAE-native embeddings conditioning is the SD3 family's (a UAE pipeline); "
                             'use conditioning_mode="text"')
        return mode

    # ---------------------------------------------------------------------------------------------------- latents
    def initial_noise(self, batch_size: int, height: int, width: int, generator=None, device=None) -> torch.Tensor:
        """The stock pipeline's initial latents for an image of `height`x`width`, spatial and float32: the same
        draws from the same generators (one per row, or one for the batch)."""
        raise NotImplementedError

    def image_size(self, latents: torch.Tensor) -> tuple[int, int]:
        """`(height, width)` in pixels of spatial `latents`."""
        return latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor

    def schedule(self, num_inference_steps: int, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """`(timesteps, sigmas)` exactly as the stock pipeline sets its scheduler (shift included); sigmas end at 0,
        timesteps are the scheduler's (σ·1000)."""
        raise NotImplementedError

    def velocity(self, transformer, latents: torch.Tensor, timestep: torch.Tensor, conditioning: dict,
                 guidance_scale: float, detach_unconditional: bool = False) -> torch.Tensor:
        """The DiT's velocity at spatial `latents` and scheduler `timestep` (one value or one per row), with the
        family's guidance at `guidance_scale`, in the DiT's dtype and the latents' shape. Inputs are cast to the
        DiT's dtype here, at the boundary.

        Args:
            transformer: the DiT to run (the pipeline's, or a training wrapper of it).
            detach_unconditional (`bool`, defaults to `False`): with classifier-free guidance, stop gradients through
                the unconditional branch (same value; only gradients change).
        """
        raise NotImplementedError

    def unguided_scale(self, guidance_scale: float) -> float:
        """The `guidance_scale` that runs the DiT once per step, without classifier-free guidance: 1.0 (a
        guidance-distilled family keeps its embedded guidance, which costs no second pass)."""
        return 1.0

    def decode(self, latents: torch.Tensor, output_type: str = "np"):
        """Final spatial latents → images, as the stock pipeline decodes them (differentiable with
        `output_type="pt"` when gradients are enabled). Here: an `AutoencoderKL`'s scaling and shift (SD3, FLUX.1)."""
        pipe = self.pipe
        latents = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        images = pipe.vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(images, output_type=output_type)

    # ----------------------------------------------------------------------------------------------------- drawing
    @torch.no_grad()
    def generate(self, captions: list[str], height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None, generator=None,
                 output_type: str = "np", conditioning_mode: str | None = None, negative_prompt: str | None = None,
                 num_images_per_prompt: int = 1):
        """Draw `num_images_per_prompt` images per caption (item-major; `generator`: one per image or one for the
        batch), deterministically from the seeded noise: the stock pipeline's sampling, run through this protocol's
        Euler steps. The reward's and the round trip's decoding. Settings left `None` are the stock pipeline's."""
        height, width = height or self.default_size(), width or self.default_size()
        num_inference_steps = num_inference_steps or self.default_num_inference_steps
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        self.check_size(height, width)
        conditioning = self.encode_captions(captions, conditioning_mode, negative_prompt, num_images_per_prompt)
        latents = self.initial_noise(len(captions) * num_images_per_prompt, height, width, generator,
                                     self.pipe._execution_device)
        with self.masked_attention():
            trajectory = sample_trajectory(self, conditioning, latents, num_inference_steps, guidance_scale,
                                           noise_level=0.0)
        return self.decode(trajectory.latents[:, -1], output_type)

    # ------------------------------------------------------------------------------------------------------- LoRA
    def save_lora_weights(self, output_dir, lora_layers: dict[str, torch.Tensor], adapter_metadata: dict,
                          weight_name: str) -> None:
        """The DiT LoRA as the family's stock pipeline's `load_lora_weights` reads it."""
        type(self.pipe).save_lora_weights(output_dir, transformer_lora_layers=lora_layers,
                                          transformer_lora_adapter_metadata=adapter_metadata, weight_name=weight_name)


def per_row_timestep(timestep: torch.Tensor, batch_size: int) -> torch.Tensor:
    """One scheduler timestep per row."""
    timestep = torch.as_tensor(timestep)
    return timestep.expand(batch_size) if timestep.ndim == 0 else timestep


def classifier_free_guidance(conditional: torch.Tensor, unconditional: torch.Tensor, guidance_scale: float,
                             detach_unconditional: bool) -> torch.Tensor:
    """`u + w·(c - u)`, with `u` detached when asked."""
    if detach_unconditional:
        unconditional = unconditional.detach()
    return unconditional + guidance_scale * (conditional - unconditional)
