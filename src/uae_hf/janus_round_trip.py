"""[`JanusRoundTrip`]: the round trip of one Janus / Janus-Pro checkpoint (transformers'
`JanusForConditionalGeneration`), which both captions (text generation through its chat template) and draws (image
tokens generated with classifier-free guidance, decoded by its VQ model)."""

import copy

import PIL.Image
import torch
from transformers import GenerationMixin
from transformers.generation import ClassifierFreeGuidanceLogitsProcessor

from .images import images_as
from .pipelines.uae_reconstruction.captioning import _WARPERS, PerItemSampling, _generators_per_image
from .pipelines.uae_reconstruction.pipeline_output import UAEReconstructionPipelineOutput
from .token_round_trip import TokenRoundTrip

# Janus-Pro's published image sampling, used where the checkpoint's generation_config.json does not set its own: CFG
# weight 5 and temperature 1, plain multinomial sampling over the VQ codebook (DeepSeek's generation_inference.py:
# cfg_weight=5, temperature=1; transformers' convert_janus_weights_to_hf.py writes guidance_scale=5, temperature=1
# into the deepseek-community checkpoints' generation config). The image size is the checkpoint's: Janus-Pro draws
# 24 x 24 = 576 tokens, decoded 16x up to 384 x 384 pixels.
JANUS_GUIDANCE_SCALE = 5.0
JANUS_IMAGE_TEMPERATURE = 1.0


class _JanusTextGeneration:
    """The Janus model as `caption_images` calls it. `JanusForConditionalGeneration.generate` drops `logits_processor`
    in text mode (transformers 5.23), which would leave the per-image sampler out and decode greedily: text goes
    through `GenerationMixin.generate` itself, as Janus's own text mode does, with its guidance off."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    @property
    def generation_config(self):
        config = copy.deepcopy(self.model.generation_config)
        config.guidance_scale = None  # Janus's text mode: no CFG
        return config

    def generate(self, **kwargs):
        return GenerationMixin.generate(self.model, **kwargs)


class JanusRoundTrip(TokenRoundTrip):
    """Image → caption → image with one Janus / Janus-Pro checkpoint for both directions, called like
    `UAEReconstructionPipeline` and seeded the same way: image `i`'s caption is drawn with a generator derived from
    its generator, its image tokens with that generator itself, one per image, so a seeded round trip is the same
    whatever the batch.

    Image tokens are sampled by [`PerItemSampling`] after the guidance (transformers' own
    `ClassifierFreeGuidanceLogitsProcessor`), with the checkpoint's sampling settings; `JanusForConditionalGeneration.
    generate` then takes each drawn token greedily, so its own draw (from the global RNG) is never used.

    Args:
        model (`JanusForConditionalGeneration`): the checkpoint.
        processor (`JanusProcessor`): its processor (chat template, image processor, image tokens).

    Example:

    ```py
    >>> import torch
    >>> from uae_hf import JanusRoundTrip

    >>> janus = JanusRoundTrip.from_pretrained("deepseek-community/Janus-Pro-1B", torch_dtype=torch.bfloat16).to("cuda")
    >>> out = janus(image=image, generator=[torch.Generator().manual_seed(0)])
    >>> out.captions[0], out.images[0]
    ```
    """

    guidance = ("Janus's image generation always runs classifier-free guidance", "Janus-Pro's", JANUS_GUIDANCE_SCALE)

    def __init__(self, model, processor):
        self.model, self.processor = model, processor

    def _captioner(self):
        return _JanusTextGeneration(self.model)  # its text mode, with our per-image sampler kept

    @classmethod
    def from_pretrained(cls, model_name_or_path, torch_dtype: torch.dtype | None = None, **kwargs) -> "JanusRoundTrip":
        """The checkpoint (a folder or Hub id) and its processor, in `torch_dtype` (default: as stored)."""
        from transformers import AutoProcessor, JanusForConditionalGeneration

        model = JanusForConditionalGeneration.from_pretrained(model_name_or_path, dtype=torch_dtype or "auto",
                                                              **kwargs).eval()
        return cls(model, AutoProcessor.from_pretrained(model_name_or_path))

    @property
    def name_or_path(self) -> str:
        return self.model.name_or_path

    @torch.no_grad()
    def generate(self, captions: str | list[str], generator=None, guidance_scale: float | None = None,
                 image_temperature: float | None = None, output_type: str = "pil") -> UAEReconstructionPipelineOutput:
        """The image half: one image per caption, its tokens drawn with its own generator.

        Args:
            captions (`str` or `list[str]`): the prompts, each the user turn of Janus's chat template.
            generator (`torch.Generator` or a list of one per caption, *optional*): the sampling randomness.
            guidance_scale (`float`, *optional*): CFG weight, above 1 (Janus always runs its unconditional rows);
                defaults to the checkpoint's, else Janus-Pro's 5.
            image_temperature (`float`, *optional*): defaults to the checkpoint's, else Janus-Pro's 1.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (B, H, W, 3 in [0, 1]) or `"pt"` (B, 3, H, W).
        """
        captions, config, scale = self._image_request(captions, guidance_scale)
        generators = _generators_per_image(generator, len(captions))
        prompts = [self.processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": text}]}],
                                                      add_generation_prompt=True) for text in captions]
        inputs = self.processor(text=prompts, generation_mode="image", padding=True, return_tensors="pt")
        config.update(do_sample=True, temperature=image_temperature if image_temperature is not None else
                      (config.temperature or JANUS_IMAGE_TEMPERATURE))
        processors = [ClassifierFreeGuidanceLogitsProcessor(scale),  # first: our sampler draws from guided scores
                      PerItemSampling(config, generators, self.model.device)]
        # guidance_scale=1: generate adds no guidance of its own (it would come after our sampler)
        config.update(do_sample=False, guidance_scale=1, **{name: None for name, _, _ in _WARPERS})
        tokens = self.model.generate(**inputs.to(self.model.device), generation_mode="image", generation_config=config,
                                     logits_processor=processors)
        pixels = self.model.decode_image_tokens(tokens)  # (B, H, W, 3), normalised as the image processor's inputs
        decoded = self.processor.postprocess(list(pixels.float()))["pixel_values"]  # its own un-normalisation: uint8
        images = images_as([PIL.Image.fromarray(image.permute(1, 2, 0).cpu().numpy()) for image in decoded],
                           output_type)
        return UAEReconstructionPipelineOutput(images=images, captions=captions, truncated=None)
