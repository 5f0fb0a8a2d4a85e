"""[`PairedRoundTrip`]: the round trip of any chat vision-language model paired with any supported text-to-image
pipeline: the VLM captions each image, the decoder draws from the caption as a text prompt."""

import torch

from .decoders import decoder_family
from .pipelines.uae_reconstruction.captioning import CAPTION_INSTRUCTION, _derived_generators, caption_images
from .pipelines.uae_reconstruction.pipeline_output import UAEReconstructionPipelineOutput
from .pipelines.uae_reconstruction.pipeline_uae_reconstruction import UAEReconstructionPipeline


class PairedRoundTrip:
    """Image → caption (a chat VLM) → image (a decoder of a supported family, text mode), called like
    `UAEReconstructionPipeline`, seeded the same way: image `i`'s caption is drawn with a generator derived from its
    noise generator, so a seeded round trip is the same whatever the batch.

    Args:
        vlm: an image-text-to-text model with a chat template (e.g. `Qwen2_5_VLForConditionalGeneration`).
        processor: its processor.
        decoder: a diffusers pipeline of a supported family (`uae_hf.decoders`), or its [`DecoderFamily`].

    Example:

    ```py
    >>> from diffusers import FluxPipeline
    >>> from transformers import AutoModelForImageTextToText, AutoProcessor
    >>> from uae_hf import PairedRoundTrip

    >>> vlm = AutoModelForImageTextToText.from_pretrained("Qwen/Qwen2.5-VL-3B-Instruct", dtype=torch.bfloat16)
    >>> decoder = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16)
    >>> pair = PairedRoundTrip(vlm, AutoProcessor.from_pretrained("Qwen/Qwen2.5-VL-3B-Instruct"), decoder).to("cuda")
    >>> out = pair(image=image, generator=[torch.Generator().manual_seed(0)])
    >>> out.captions[0], out.images[0]
    ```
    """

    def __init__(self, vlm, processor, decoder):
        self.vlm, self.processor = vlm, processor
        self.decoder_family = decoder_family(decoder)
        self.decoder = self.decoder_family.pipe

    def to(self, *args, **kwargs) -> "PairedRoundTrip":
        self.vlm.to(*args, **kwargs)
        self.decoder.to(*args, **kwargs)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        self.decoder.set_progress_bar_config(**kwargs)

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.dtype

    def load_encoder_adapter(self, adapter_path: str, adapter_name: str = "default", **kwargs) -> None:
        """Attach a PEFT adapter folder to the VLM and make it active (captioning then runs through it)."""
        self.vlm.load_adapter(adapter_path, adapter_name=adapter_name, **kwargs)
        self.vlm.set_adapter(adapter_name)

    def caption(self, image, instruction: str = CAPTION_INSTRUCTION, max_new_tokens: int = 512, do_sample: bool = True,
                temperature: float = 0.7, top_p: float | None = None, **generate_kwargs) -> list[str]:
        """Caption one image or a list of them in one batch (see `caption_images`)."""
        images = UAEReconstructionPipeline._as_image_list(image)  # RGB, with the pipeline's named errors
        return caption_images(self.vlm, self.processor, images, instruction, max_new_tokens, do_sample, temperature,
                              top_p, **generate_kwargs)

    @torch.no_grad()
    def __call__(self, image=None, captions: list[str] | None = None, instruction: str = CAPTION_INSTRUCTION,
                 max_new_tokens: int = 512, do_sample: bool = True, temperature: float = 0.7,
                 top_p: float | None = None, generator=None, height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 negative_prompt: str | None = None, output_type: str = "pil") -> UAEReconstructionPipelineOutput:
        """Caption each image (unless `captions` are given), then draw one image per caption from the generator(s)
        (one per image); decoder settings left `None` are its stock pipeline's defaults."""
        if image is None and captions is None:
            raise ValueError("pass `image` (to caption and reconstruct) or `captions` (to skip captioning)")
        if captions is None:
            captions = self.caption(image, instruction, max_new_tokens, do_sample, temperature, top_p,
                                    generator=_derived_generators(generator))
        return self.generate(captions, height=height, width=width, num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, generator=generator, negative_prompt=negative_prompt,
                             output_type=output_type)

    @torch.no_grad()
    def generate(self, captions: str | list[str], generator=None, output_type: str = "pil",
                 **decoder_settings) -> UAEReconstructionPipelineOutput:
        """The decoder half: one image per caption from the generator(s), with which captions its text encoder cut.
        `decoder_settings`: `height`, `width`, `num_inference_steps`, `guidance_scale`, `negative_prompt`."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        images = self.decoder_family.generate(captions, generator=generator, output_type=output_type,
                                              conditioning_mode="text", **decoder_settings)
        return UAEReconstructionPipelineOutput(images=images, captions=captions,
                                               truncated=self.decoder_family.caption_truncation(captions))
