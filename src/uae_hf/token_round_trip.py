"""[`TokenRoundTrip`]: what the round-trip systems of unified models that draw image tokens (`JanusRoundTrip`,
`Emu3RoundTrip`) share: captioning through `caption_images`, the chaining of captions and images in `__call__`, and
moving their transformers models."""

import copy

import torch

from .pipelines.uae_reconstruction.captioning import CAPTION_INSTRUCTION, _derived_generators, caption_images
from .pipelines.uae_reconstruction.pipeline_output import UAEReconstructionPipelineOutput
from .pipelines.uae_reconstruction.pipeline_uae_reconstruction import UAEReconstructionPipeline


class TokenRoundTrip:
    """Image → caption → image with transformers models, called like `UAEReconstructionPipeline` and seeded the same
    way: image `i`'s caption is drawn with a generator derived from its generator, its image with that generator
    itself. A subclass sets `processor` (the captioner's), `model` (the one that draws), `_model_names` (every model
    it holds), `guidance` and `generate`; `_captioner` and `check_image_settings` where it differs."""

    _model_names: tuple[str, ...] = ("model",)
    # why the image half needs a CFG weight above 1, whose published weight is the default, and that weight
    guidance: tuple[str, str, float]

    def _image_request(self, captions, guidance_scale: float | None) -> tuple[list[str], object, float]:
        """`generate`'s captions as a list, a copy of the drawing model's generation config and the CFG weight (the
        one given, else the checkpoint's, else the published one), refused in one line unless above 1."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        if not captions:
            raise ValueError("`captions` is empty: pass at least one caption")
        config = copy.deepcopy(self.model.generation_config)
        why, published, default = self.guidance
        scale = guidance_scale if guidance_scale is not None else (config.guidance_scale or default)
        if scale <= 1:
            raise ValueError(f"guidance_scale={scale}: {why}; pass a weight above 1 ({published} is {default:g})")
        return captions, config, scale

    def _captioner(self):
        """The model `caption_images` generates captions with."""
        return self.model

    def check_image_settings(self, **image_settings) -> None:
        """Refuse image settings the model cannot draw with, before anything is captioned (default: none)."""

    def to(self, *args, **kwargs):
        for name in self._model_names:
            getattr(self, name).to(*args, **kwargs)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        """Nothing to configure: token generation draws no progress bar."""

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def caption(self, image, instruction: str = CAPTION_INSTRUCTION, max_new_tokens: int = 512, do_sample: bool = True,
                temperature: float = 0.7, top_p: float | None = None, **generate_kwargs) -> list[str]:
        """Caption one image or a list of them in one batch (see `caption_images`), through the captioner's chat
        template."""
        images = UAEReconstructionPipeline._as_image_list(image)  # RGB, with the pipeline's named errors
        return caption_images(self._captioner(), self.processor, images, instruction, max_new_tokens, do_sample,
                              temperature, top_p, **generate_kwargs)

    @torch.no_grad()
    def __call__(self, image=None, captions: list[str] | None = None, instruction: str = CAPTION_INSTRUCTION,
                 max_new_tokens: int = 512, do_sample: bool = True, temperature: float = 0.7,
                 top_p: float | None = None, generator=None, output_type: str = "pil",
                 **image_settings) -> UAEReconstructionPipelineOutput:
        """Caption each image (unless `captions` are given), then draw one image per caption. `instruction`,
        `max_new_tokens`, `do_sample`, `temperature`, `top_p`: caption sampling (the UAE protocol's by default);
        `image_settings`: the image half's (see the subclass's `generate`)."""
        if image is None and captions is None:
            raise ValueError("pass `image` (to caption and reconstruct) or `captions` (to skip captioning)")
        self.check_image_settings(**image_settings)
        if captions is None:
            captions = self.caption(image, instruction, max_new_tokens, do_sample, temperature, top_p,
                                    generator=_derived_generators(generator))
        return self.generate(captions, generator=generator, output_type=output_type, **image_settings)
