"""[`Emu3RoundTrip`]: the round trip of Emu3 (transformers' `Emu3ForConditionalGeneration`), whose published
checkpoints split the two directions: Emu3-Chat captions (text generation through its chat template), Emu3-Gen draws
(VQ image tokens generated row by row with classifier-free guidance against a negative prompt, decoded by its VQ
model)."""


import torch
from transformers import GenerationConfig

from .images import images_as
from .pipelines.uae_reconstruction.captioning import _WARPERS, PerItemSampling, _generators_per_image
from .pipelines.uae_reconstruction.pipeline_output import UAEReconstructionPipelineOutput
from .token_round_trip import TokenRoundTrip

# Emu3-Gen's published sampling (BAAI's Emu3 README, "Use Transformers to run Emu3-Gen"), used where the Gen
# checkpoint's generation_config.json does not set its own: CFG weight 3 against its negative prompt, top-k 2048 over
# the visual vocabulary, and its quality suffix appended to every prompt. The image size is the processor's: 1:1 at
# 518,400 pixels (720 x 720, 90 x 90 tokens).
EMU3_GUIDANCE_SCALE = 3.0
EMU3_TOP_K = 2048
EMU3_PROMPT_SUFFIX = " masterpiece, film grained, best quality."
EMU3_NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst quality, "
    "low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."
)
_IMAGE_ENDS = ("eof_token_id", "eoi_token_id", "eos_token_id")  # the tokens that close an image, in order


class _ImageTokenLayout:
    """`prefix_allowed_tokens_fn` for Emu3's image tokens: after the prompt's image-wrapper token, `height` rows of
    `width` visual tokens each closed by an end-of-line token, then end-of-frame, end-of-image and end-of-sequence (and
    padding after them). Emu3 does not learn this layout exactly, so generation is held to it."""

    def __init__(self, tokenizer, visual_tokens: list[int], height: int, width: int, device="cpu"):
        self.wrapper = tokenizer.image_wrapper_token_id
        # a tensor on the scores' device: Emu3's 32,768 visual tokens are allowed at nearly every step
        self.visual_tokens = torch.tensor(visual_tokens, device=device)
        self.height, self.row = height, width + 1
        self.end_of_line = [tokenizer.convert_tokens_to_ids("<|extra_200|>")]
        self.ends = [[getattr(tokenizer, name)] for name in _IMAGE_ENDS] + [[tokenizer.pad_token_id]]

    @property
    def num_tokens(self) -> int:
        """The image's tokens, its three closing tokens included: what `decode_image_tokens` reads."""
        return self.row * self.height + len(_IMAGE_ENDS)

    def __call__(self, batch_id: int, input_ids: torch.Tensor) -> list[int] | torch.Tensor:
        offset = input_ids.shape[0] - int(torch.nonzero(input_ids == self.wrapper)[0, 0])  # 1 for the first token
        if offset <= self.row * self.height:
            return self.end_of_line if offset % self.row == 0 else self.visual_tokens
        return self.ends[min(offset - self.row * self.height - 1, len(self.ends) - 1)]


class Emu3RoundTrip(TokenRoundTrip):
    """Image → caption (Emu3-Chat) → image (Emu3-Gen), called like `UAEReconstructionPipeline` and seeded the same
    way: image `i`'s caption is drawn with a generator derived from its generator, its image tokens with that
    generator itself, one per image, so a seeded round trip is the same whatever the batch.

    Image tokens are sampled by [`PerItemSampling`] (with top-k) after the guidance (transformers' own
    `UnbatchedClassifierFreeGuidanceLogitsProcessor`, run by `generate` for the negative prompt) and the layout
    constraint (`_ImageTokenLayout`); `generate` then takes each drawn token greedily.

    Args:
        vlm (`Emu3ForConditionalGeneration`): the Chat checkpoint (or any chat VLM), which captions.
        processor (`Emu3Processor`): its processor, with a chat template.
        model (`Emu3ForConditionalGeneration`): the Gen checkpoint, which draws.
        model_processor (`Emu3Processor`): its processor.

    Example:

    ```py
    >>> import torch
    >>> from uae_hf import Emu3RoundTrip

    >>> emu3 = Emu3RoundTrip.from_pretrained("BAAI/Emu3-Chat-hf", "BAAI/Emu3-Gen-hf", torch_dtype=torch.bfloat16)
    >>> out = emu3.to("cuda")(image=image, generator=[torch.Generator().manual_seed(0)])
    >>> out.captions[0], out.images[0]
    ```
    """

    _model_names = ("vlm", "model")
    guidance = ("Emu3's image generation runs classifier-free guidance against its negative prompt", "Emu3-Gen's",
                EMU3_GUIDANCE_SCALE)

    def __init__(self, vlm, processor, model, model_processor):
        self.vlm, self.processor = vlm, processor
        self.model, self.model_processor = model, model_processor

    def _captioner(self):
        return self.vlm

    def check_image_settings(self, height: int | None = None, width: int | None = None, **_) -> None:
        """A size Emu3 cannot draw fails before captioning."""
        self._image_grid(height, width)

    @classmethod
    def from_pretrained(cls, chat_name_or_path, gen_name_or_path, torch_dtype: torch.dtype | None = None,
                        **kwargs) -> "Emu3RoundTrip":
        """The Chat and the Gen checkpoint (folders or Hub ids) and their processors, in `torch_dtype` (default: as
        stored)."""
        from transformers import AutoProcessor, Emu3ForConditionalGeneration

        vlm, model = (Emu3ForConditionalGeneration.from_pretrained(name, dtype=torch_dtype or "auto", **kwargs).eval()
                      for name in (chat_name_or_path, gen_name_or_path))
        return cls(vlm, AutoProcessor.from_pretrained(chat_name_or_path), model,
                   AutoProcessor.from_pretrained(gen_name_or_path))

    def _image_grid(self, height: int | None, width: int | None) -> dict:
        """The processor's size arguments for `height` x `width` pixels (both or neither; multiples of its 8)."""
        if (height is None) != (width is None):
            raise ValueError("pass both height and width, or neither (Emu3-Gen's processor default: 720 x 720)")
        if height is None:
            return {}
        ratio = self.model_processor.downsample_ratio
        if height % ratio or width % ratio or height <= 0 or width <= 0:
            raise ValueError(f"height={height}, width={width}: Emu3 draws {ratio} x {ratio} pixels per image token; "
                             f"pass positive multiples of {ratio}")
        return {"ratio": f"{width}:{height}", "image_area": height * width}

    @torch.no_grad()
    def generate(self, captions: str | list[str], generator=None, height: int | None = None, width: int | None = None,
                 guidance_scale: float | None = None, negative_prompt: str = EMU3_NEGATIVE_PROMPT,
                 prompt_suffix: str = EMU3_PROMPT_SUFFIX, output_type: str = "pil") -> UAEReconstructionPipelineOutput:
        """The image half: one image per caption, its tokens drawn with its own generator.

        Args:
            captions (`str` or `list[str]`): the prompts; each is sent as `caption + prompt_suffix`.
            generator (`torch.Generator` or a list of one per caption, *optional*): the sampling randomness.
            height, width (`int`, *optional*): the image size in pixels, multiples of 8; defaults to the processor's
                (Emu3-Gen: 720 x 720).
            guidance_scale (`float`, *optional*): CFG weight against `negative_prompt`, above 1; defaults to the
                checkpoint's, else Emu3-Gen's 3.
            negative_prompt (`str`), prompt_suffix (`str`): default to Emu3-Gen's published ones.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (B, H, W, 3 in [0, 1]) or `"pt"` (B, 3, H, W).
        """
        captions, config, scale = self._image_request(captions, guidance_scale)
        generators = _generators_per_image(generator, len(captions))
        inputs = self.model_processor(text=[caption + prompt_suffix for caption in captions],
                                      return_for_image_generation=True, padding=True, padding_side="left",
                                      return_tensors="pt", **self._image_grid(height, width))
        rows, columns = inputs.pop("image_sizes")[0]
        negative = self.model_processor(text=[negative_prompt] * len(captions), return_tensors="pt")
        layout = _ImageTokenLayout(self.model_processor.tokenizer, self.model.vocabulary_mapping.image_tokens, rows,
                                   columns, self.model.device)
        config.update(do_sample=True, top_k=config.top_k or EMU3_TOP_K)
        sampling = PerItemSampling(config, generators, self.model.device)  # after generate's guidance and layout
        defaults = GenerationConfig._get_default_generation_params()
        config.update(do_sample=False, guidance_scale=scale, max_new_tokens=layout.num_tokens, min_new_tokens=None,
                      **{name: defaults.get(name) for name, _, _ in _WARPERS})
        device = self.model.device
        tokens = self.model.generate(**inputs.to(device), generation_config=config, logits_processor=[sampling],
                                     prefix_allowed_tokens_fn=layout, negative_prompt_ids=negative.input_ids.to(device),
                                     negative_prompt_attention_mask=negative.attention_mask.to(device))
        pixels = self.model.model.decode_image_tokens(tokens[:, inputs["input_ids"].shape[1]:], height=rows,
                                                      width=columns)  # (B, 3, H, W), normalised as the processor's
        images = self.model_processor.postprocess(list(pixels.float()))["pixel_values"]  # its own un-normalisation
        return UAEReconstructionPipelineOutput(images=images_as(images, output_type), captions=captions,
                                               truncated=None)
