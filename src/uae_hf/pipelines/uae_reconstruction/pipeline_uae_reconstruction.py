"""UAE reconstruction: image → caption (vision-language encoder) → image (SD3-family flow-matching decoder).

This module imports only torch, transformers and diffusers, never `uae_hf`: `save_pretrained` writes this very file
as the saved folder's `pipeline.py`, so `DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)`
works without `uae_hf` installed. It is also the one home of UAE captioning and "generate"-role conditioning.
"""

import contextlib
import copy
import inspect
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from transformers import (
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    GenerationConfig,
    PreTrainedModel,
    ProcessorMixin,
    SiglipImageProcessor,
    SiglipVisionModel,
    T5EncoderModel,
    T5TokenizerFast,
)
from transformers.generation import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessor,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

# Exactly the released inference code's text: markdown bold, two spaces before each newline, a trailing space.
CAPTION_INSTRUCTION = (
    "You are an expert vision-language model.  \nYour task is: Given an input image, generate a **textual "
    "description** of the image. If there is text in the image, transcribe it inside double quotes \"\".  \n"
    "Now, carefully analyze the input image and output the full description. "
)
NEGATIVE_PROMPT = "Generate a random, low quality, ugly, blur, bad and anime, cartoon image."
GENERATE_ROLE = "generate"
CONDITIONING_MODES = ("embeddings", "text")
# Float32 weights beyond this many parameters on an accelerator: a bf16 load was almost certainly intended.
FLOAT32_WARNING_PARAMETERS = 1_000_000_000
FLOAT32_WARNING_DEVICES = ("cuda",)


def caption_messages(instruction: str = CAPTION_INSTRUCTION) -> list[dict]:
    """The chat conversation that asks the encoder to caption one image (instruction first, then the image)."""
    return [{"role": "user", "content": [{"type": "text", "text": instruction}, {"type": "image"}]}]


def _floats_to_uint8(array: np.ndarray, where: str, peak: float = 1.0) -> np.ndarray:
    """Float pixels in [0, peak] → uint8; NaN, infinities and values outside the range are errors, never clipped."""
    if not np.isfinite(array).all():
        raise ValueError(f"{where}: the image contains NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < -0.5 * peak / 255 or high > peak * (1 + 0.5 / 255):  # within half an 8-bit step is rounding noise
        hint = "; divide 0..255 data by 255, map [-1, 1] data with (x + 1) / 2" if peak == 1 else ""
        raise ValueError(f"{where}: float pixel values must be in [0, {peak:g}], got [{low:.4g}, {high:.4g}]{hint}")
    return np.clip(array.astype(np.float32) * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)


def array_to_image(array: np.ndarray, where: str = "image") -> PIL.Image.Image:
    """An `HxW` or `HxWxC` (C = 1 to 4) array as a PIL image, without guessing its range.

    uint8 is taken as is, uint16 as 0..65535, other integers must hold 0..255, floats (and bools) must be finite and in
    [0, 1]. Anything else is an error that names `where` (e.g. `"references[3]"`) and says how to fix it.
    """
    if array.ndim not in (2, 3) or (array.ndim == 3 and not 1 <= array.shape[-1] <= 4):
        hint = "; for a CxHxW array pass array.transpose(1, 2, 0)" if array.ndim == 3 and array.shape[0] <= 4 else ""
        raise ValueError(f"{where}: expected an HxW or HxWxC array with 1 to 4 channels, got shape {array.shape}{hint}")
    if array.size == 0:
        raise ValueError(f"{where}: the image is empty (shape {array.shape})")
    if array.dtype.type in (np.bool_, np.uint16):  # `.type`: big-endian uint16 (PIL's I;16B) too
        array = _floats_to_uint8(array.astype(np.float32), where, 65535.0 if array.dtype.type is np.uint16 else 1.0)
    elif np.issubdtype(array.dtype, np.floating):
        array = _floats_to_uint8(array, where)
    elif np.issubdtype(array.dtype, np.integer) and array.dtype != np.uint8:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"{where}: {array.dtype} values span [{low}, {high}], outside 0..255; pass uint8 for 8-bit data or "
                "uint16 (PIL mode I;16) for 16-bit data"
            )
        array = array.astype(np.uint8)
    elif array.dtype != np.uint8:
        raise TypeError(f"{where}: unsupported array dtype {array.dtype}; pass uint8, uint16 or float in [0, 1]")
    return PIL.Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


def to_rgb(image, where: str = "image") -> PIL.Image.Image:
    """Convert a PIL image in any mode to 8-bit RGB; transparent pixels are composited on white.

    Modes I;16 (0..65535) and I (0..255) follow [`array_to_image`]; F holds 0..255 as `Image.convert("F")` makes it, so
    an F image in [0, 1] is refused as ambiguous. CMYK and other colour spaces use PIL's conversion (no ICC profile).
    NaN and out-of-range values are errors naming `where`.
    """
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"{where}: expected a PIL.Image.Image, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{where}: the image is empty ({image.width}x{image.height} pixels)")
    if image.mode == "F":
        array = np.asarray(image)
        if 0 < array.max() <= 1:
            raise ValueError(
                f"{where}: float (mode F) image with values in [0, 1], but PIL's float images hold 0..255; pass the "
                "array itself (float arrays are read as [0, 1]) or multiply it by 255"
            )
        image = PIL.Image.fromarray(_floats_to_uint8(array, where, 255.0))
    elif image.mode.startswith("I"):
        image = array_to_image(np.asarray(image), where)
    if image.mode in ("RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert({"La": "LA"}.get(image.mode, "RGBA"))  # premultiplied La converts only to LA
    if image.mode in ("RGBA", "LA", "PA"):
        background = PIL.Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


# transformers' sampling warpers, in the order `generate` applies them (after every other logits processor)
_WARPERS = (  # (generation config field, whether a value is in use, the warper for it on a device)
    ("temperature", lambda value: value != 1.0, lambda value, device: TemperatureLogitsWarper(value)),
    ("top_h", lambda value: True, lambda value, device: TopHLogitsWarper(top_h=value)),
    ("top_k", lambda value: value != 0, lambda value, device: TopKLogitsWarper(top_k=value)),
    ("top_p", lambda value: value < 1.0, lambda value, device: TopPLogitsWarper(top_p=value)),
    ("min_p", lambda value: True, lambda value, device: MinPLogitsWarper(min_p=value)),
    ("typical_p", lambda value: value < 1.0, lambda value, device: TypicalLogitsWarper(mass=value)),
    ("epsilon_cutoff", lambda value: 0.0 < value < 1.0, lambda value, device: EpsilonLogitsWarper(epsilon=value)),
    ("eta_cutoff", lambda value: 0.0 < value < 1.0, lambda value, device: EtaLogitsWarper(epsilon=value, device=device)),
)


class PerItemSampling(LogitsProcessor):
    """Multinomial sampling with one `torch.Generator` per row, as a logits processor for greedy decoding.

    It applies the sampling warpers of a generation config (temperature, top-k, top-p, ...), draws row i's next token
    with `generators[i]` (inverse CDF of one uniform per row), and returns scores on which greedy decoding picks that
    token. Row i's tokens then depend only on its own generator and inputs: neither on the global RNG nor on the rest
    of the batch.
    """

    def __init__(self, generation_config: GenerationConfig, generators: list[torch.Generator], device="cpu"):
        settings = {name: getattr(generation_config, name, None) for name, _, _ in _WARPERS}
        self.warpers = [make(settings[name], device) for name, used, make in _WARPERS
                        if settings[name] is not None and used(settings[name])]
        self.generators = generators

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        cumulative = scores.float().softmax(dim=-1).cumsum(dim=-1)
        # one uniform per row from its own generator, moved to the scores' device in one transfer per token
        uniforms = torch.stack([torch.rand((), generator=g, device=g.device).cpu() for g in self.generators])
        uniforms = uniforms.to(scores.device)
        targets = uniforms[:, None] * cumulative[:, -1:]  # scaled to the total, which rounding leaves just below 1
        tokens = torch.searchsorted(cumulative, targets, right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, -float("inf")).scatter_(1, tokens, 0.0)


def _generators_per_image(generator, count: int) -> list[torch.Generator]:
    if isinstance(generator, (list, tuple)):
        if len(generator) != count:
            raise ValueError(f"got {len(generator)} generators for {count} images: pass one per image, or one in all")
        return list(generator)
    seeds = torch.randint(0, 2**62, (count,), generator=generator).tolist()  # the global RNG when `generator` is None
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def _derived_generators(generator):
    """New generators seeded from (copies of) `generator`(s), which are left where they were: a round trip's captions
    follow the generator(s) given for the noise, and the noise stays what the same generator gives `generate`."""
    if generator is None:
        return None
    if isinstance(generator, (list, tuple)):
        return [_derived_generators(one) for one in generator]
    copy_ = torch.Generator(generator.device)
    copy_.set_state(generator.get_state())
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), generator=copy_, device=generator.device)))


@torch.no_grad()
def caption_images(
    vlm,
    processor,
    images: list[PIL.Image.Image],
    instruction: str = CAPTION_INSTRUCTION,
    max_new_tokens: int = 512,
    do_sample: bool = True,
    temperature: float = 0.7,
    top_p: float | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    **generate_kwargs,
) -> list[str]:
    """Caption a batch of images with a chat vision-language model, in one left-padded `generate` call.

    Sampling follows the model's own `generation_config` (top-k, top-p, repetition penalty, ... as the checkpoint
    sets them) with the paper's temperature and length; `top_p` and `generate_kwargs` override it only when given.
    Each image's caption is drawn with its own generator, so a seeded call gives the same captions in any process
    and whatever else shares the batch.

    Args:
        vlm: an image-text-to-text model (e.g. `Qwen2_5_VLForConditionalGeneration`, PEFT-wrapped or not).
        processor: its processor (tokenizer + image processor + chat template).
        images (`list[PIL.Image.Image]`): the images; any mode, converted to RGB.
        instruction (`str`): the user turn's text; defaults to the released UAE captioning instruction.
        max_new_tokens (`int`, defaults to 512), do_sample (`bool`, defaults to `True`),
        temperature (`float`, defaults to 0.7): the paper's sampling settings.
        top_p (`float`, *optional*): overrides the checkpoint's `top_p`.
        generator (`torch.Generator` or a list of one per image, *optional*): the sampling randomness; one generator
            seeds a generator per image; by default they are seeded from the global RNG.

    Returns:
        `list[str]`: one caption per image, special tokens removed and whitespace stripped.
    """
    prompt = processor.apply_chat_template(caption_messages(instruction), add_generation_prompt=True, tokenize=False)
    images = [to_rgb(image, f"image[{index}]") for index, image in enumerate(images)]
    try:
        inputs = processor(
            text=[prompt] * len(images), images=images, padding=True, padding_side="left", return_tensors="pt"
        )
    except ValueError as error:  # e.g. Qwen2-VL refuses aspect ratios above 200: name the image
        for index, image in enumerate(images):
            try:
                processor.image_processor(images=[image])
            except ValueError:
                raise ValueError(
                    f"image[{index}] ({image.width}x{image.height} pixels): the encoder's image processor refuses it: "
                    f"{error}. Crop or pad the image"
                ) from error
        raise
    inputs = inputs.to(vlm.device)
    config = copy.deepcopy(vlm.generation_config)
    other_kwargs = config.update(**{"max_new_tokens": max_new_tokens, **generate_kwargs})  # e.g. stopping_criteria
    processors = other_kwargs.pop("logits_processor", None) or []
    if do_sample:
        config.update(temperature=temperature, **({"top_p": top_p} if top_p is not None else {}))
        processors = [*processors, PerItemSampling(config, _generators_per_image(generator, len(images)), vlm.device)]
    # our sampler decides each token and greedy decoding takes it: the warpers are the sampler's, not generate's
    config.update(do_sample=False, **{name: None for name, _, _ in _WARPERS})
    output_ids = vlm.generate(**inputs, generation_config=config, logits_processor=processors, **other_kwargs)
    new_tokens = output_ids[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


@dataclass
class GenerateConditioning:
    """UAE-native conditioning for a batch of captions.

    Attributes:
        prompt_embeds (`torch.Tensor` of shape `(batch, max_length, joint_attention_dim)`)
        negative_prompt_embeds (`torch.Tensor` of the same shape)
        lengths (`torch.LongTensor` of shape `(batch,)`): item i's own length (its [negative, positive] pair padded
            together); positions at or beyond it are batch padding and must be masked out of the decoder's attention.
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    lengths: torch.LongTensor

    def text_mask(self) -> torch.BoolTensor:
        """`(batch, max_length)` mask, `True` where a text token belongs to its item."""
        positions = torch.arange(self.prompt_embeds.shape[1], device=self.lengths.device)
        return positions[None, :] < self.lengths[:, None]


def generate_prompt_ids(tokenizer, captions: list[str]) -> list[list[int]]:
    """Token ids of each caption wrapped as a `"generate"`-role chat message with the assistant header appended."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": GENERATE_ROLE, "content": [{"type": "text", "text": caption}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for caption in captions
    ]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run `model` on its base weights: every PEFT adapter layer (LoRA, modules_to_save copies) is switched off,
    then put back as it was. A no-op for a model without adapters."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "disable_adapters", None), bool)]
    was_disabled = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, disabled in zip(layers, was_disabled):
            layer.enable_adapters(not disabled)


def encode_generate_prompts(
    vlm,
    tokenizer,
    projector,
    captions: list[str],
    negative_prompt: str = NEGATIVE_PROMPT,
    with_adapters: bool = True,
) -> GenerateConditioning:
    """Captions → LLM last hidden state of every token → projector: the decoder's `prompt_embeds` (UAE-native).

    As in the released model, each caption is right-padded together with the negative prompt to their common length
    (pad token `<|endoftext|>`), the LLM sees an attention mask and mask-derived position ids, and every position
    (pads of the pair included) is projected. One forward pass serves the whole batch: extra padding up to the
    batch's longest item cannot change earlier positions (causal attention), so item i's first `lengths[i]` rows
    equal what it gets alone. Gradients flow if enabled (cold start trains through this). `with_adapters=False`
    reads the captions with the LLM's base weights (any encoder adapter then only changes the captions written).
    """
    if len(captions) == 0:
        raise ValueError("`captions` is empty: pass at least one caption")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    negative_ids, *caption_ids = generate_prompt_ids(tokenizer, [negative_prompt, *captions])
    limit = getattr(vlm.config.get_text_config(), "max_position_embeddings", None)
    for index, ids in enumerate(caption_ids):
        if limit is not None and len(ids) > limit:
            raise ValueError(
                f"captions[{index}] is {len(ids)} tokens long in its chat template ({len(captions[index])} "
                f"characters); the encoder LLM reads at most {limit} (max_position_embeddings): shorten it"
            )
    lengths = torch.tensor([max(len(negative_ids), len(ids)) for ids in caption_ids])
    sequences = [negative_ids, *caption_ids]
    max_length = int(lengths.max())
    input_ids = torch.full((len(sequences), max_length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)

    device = vlm.device
    # The top-level forward (not the inner decoder) so offload hooks and PEFT wrappers apply; logits of one position.
    with contextlib.nullcontext() if with_adapters else adapters_disabled(vlm):
        hidden_states = vlm(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            output_hidden_states=True,
            logits_to_keep=1,
            use_cache=False,
        ).hidden_states[-1]
    projector_dtype = next(projector.parameters()).dtype
    embeds = projector(hidden_states.to(projector.device, projector_dtype))
    negative = embeds[:1].expand(len(captions), -1, -1)
    return GenerateConditioning(embeds[1:], negative, lengths.to(embeds.device))


@torch.no_grad()
def clip_pooled_embeds(text_encoders, tokenizers, prompt: str = "") -> torch.Tensor:
    """SD3's pooled text embedding of `prompt` from its CLIP-L and CLIP-G encoders (concatenated), shape `(1, P)`."""
    pooled = []
    for text_encoder, tokenizer in zip(text_encoders, tokenizers):
        ids = tokenizer(
            [prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        pooled.append(text_encoder(ids.to(text_encoder.device)).text_embeds)
    return torch.cat(pooled, dim=-1)


class MaskedJointAttnProcessor:
    """SD3 joint attention (as diffusers' `JointAttnProcessor2_0`) that can hide padded text tokens.

    `encoder_attention_mask` (`(batch, text_length)` bool, `True` = keep) removes each item's batch padding from the
    keys, so an item decoded in a batch attends to exactly the text tokens it has alone. A mask with fewer rows than
    the batch is tiled (classifier-free guidance stacks [negative; positive] items that share their lengths).
    Without a mask it computes exactly what `JointAttnProcessor2_0` computes.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, encoder_attention_mask=None):
        batch_size = hidden_states.shape[0]
        num_image_tokens = hidden_states.shape[1]

        def heads(x):
            return x.view(batch_size, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        mask = None
        if encoder_hidden_states is not None:
            text_query = heads(attn.add_q_proj(encoder_hidden_states))
            text_key = heads(attn.add_k_proj(encoder_hidden_states))
            text_value = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=2)
            key = torch.cat([key, text_key], dim=2)
            value = torch.cat([value, text_value], dim=2)
            if encoder_attention_mask is not None:
                text_mask = encoder_attention_mask.to(device=query.device, dtype=torch.bool)
                text_mask = text_mask.repeat(batch_size // text_mask.shape[0], 1)
                image_mask = text_mask.new_ones(batch_size, num_image_tokens)
                mask = torch.cat([image_mask, text_mask], dim=1)[:, None, None, :]

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * out.shape[-1]).to(query.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        out, text_out = out[:, :num_image_tokens], out[:, num_image_tokens:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return attn.to_out[1](attn.to_out[0](out)), text_out


_NOT_SET = object()


def _is_adapter_layer(module: torch.nn.Module) -> bool:
    """A PEFT wrapper around a base layer: an adapter layer (e.g. a LoRA `Linear`) or a `modules_to_save` copy."""
    return (hasattr(module, "base_layer") and hasattr(module, "get_base_layer")) or (
        hasattr(module, "original_module") and hasattr(module, "modules_to_save")
    )


def _plain_layer(module: torch.nn.Module) -> torch.nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module.original_module


@dataclass
class UAEReconstructionPipelineOutput(BaseOutput):
    """Output of [`UAEReconstructionPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`): the reconstructions, item-major
            (`num_images_per_prompt` consecutive images per caption).
        captions (`list[str]`): the caption each reconstruction was drawn from (one per input).
        truncated (`list[bool]`, *optional*): text mode only, whether a decoder text encoder cut the caption.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    captions: list[str]
    truncated: list[bool] | None = None


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from diffusers import DiffusionPipeline
        >>> from PIL import Image

        >>> pipe = DiffusionPipeline.from_pretrained("path/to/uae-pipeline", trust_remote_code=True)
        >>> out = pipe(image=Image.open("photo.jpg"), generator=torch.Generator().manual_seed(0))
        >>> out.captions[0], out.images[0]
        ```
"""


class UAEReconstructionPipeline(StableDiffusion3Pipeline):
    r"""Image → caption → image with a vision-language encoder and an SD3-family decoder (the UAE round trip).

    Components are SD3's own (`transformer`, `vae`, `scheduler`, CLIP-L/G `text_encoder(_2)`/`tokenizer(_2)`, optional
    T5 `text_encoder_3`/`tokenizer_3`) plus the encoder `vlm`, its `processor` and the `projector`.

    Args:
        conditioning_mode (`str`, defaults to `"embeddings"`): `"embeddings"` conditions the decoder on the encoder
            LLM's hidden states of the caption through the projector (UAE-native); `"text"` uses the caption as an
            ordinary SD3 prompt through the decoder's own text encoders.
        conditioning_with_encoder_adapters (`bool`, defaults to `True`): whether an adapter loaded on the encoder
            also changes how the decoder reads captions. `False` reads them with the LLM's base weights, as a decoder
            trained with the encoder adapter disabled (the trainer's `decoder_text_encoder="frozen"`) expects.
    """

    model_cpu_offload_seq = "vlm->text_encoder->text_encoder_2->text_encoder_3->projector->transformer->vae"
    _optional_components = [
        "text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor", "vlm", "processor", "projector"
    ]

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        vlm: PreTrainedModel = None,
        processor: ProcessorMixin = None,
        projector: ModelMixin = None,
        text_encoder_3: T5EncoderModel = None,
        tokenizer_3: T5TokenizerFast = None,
        image_encoder: SiglipVisionModel = None,
        feature_extractor: SiglipImageProcessor = None,
        conditioning_mode: str = "embeddings",
        conditioning_with_encoder_adapters: bool = True,
    ):
        super().__init__(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.register_modules(vlm=vlm, processor=processor, projector=projector)
        self._check_conditioning_mode(conditioning_mode)
        self.register_to_config(
            conditioning_mode=conditioning_mode, conditioning_with_encoder_adapters=conditioning_with_encoder_adapters
        )
        if projector is not None and transformer is not None:
            width, expected = projector.config.out_features, transformer.config.joint_attention_dim
            if width != expected:
                raise ValueError(
                    f"projector output width ({width}) != transformer.config.joint_attention_dim ({expected}): "
                    "the projector was trained for another decoder"
                )
        if projector is not None and vlm is not None:
            width, expected = projector.config.in_features, vlm.config.get_text_config().hidden_size
            if width != expected:
                raise ValueError(
                    f"projector input width ({width}) != the encoder LLM's hidden_size ({expected}): the projector "
                    "was trained for another encoder"
                )
        if transformer is not None:
            transformer.set_attn_processor(MaskedJointAttnProcessor())
        self._pooled_cache = None
        self._warned_float32 = False
        self._warn_if_float32_on_accelerator()

    def to(self, *args, **kwargs):
        """diffusers' `to`, then a one-time warning if large float32 weights now sit on a CUDA device."""
        pipeline = super().to(*args, **kwargs)
        pipeline._warn_if_float32_on_accelerator()
        return pipeline

    def _warn_if_float32_on_accelerator(self) -> None:
        if self._warned_float32:
            return
        count = sum(
            parameter.numel()
            for module in self.components.values() if isinstance(module, torch.nn.Module)
            for parameter in module.parameters()
            if parameter.dtype == torch.float32 and parameter.device.type in FLOAT32_WARNING_DEVICES
        )
        if count > FLOAT32_WARNING_PARAMETERS:
            self._warned_float32 = True
            warnings.warn(
                f"{count / 1e9:.1f}B parameters of this pipeline are float32 on a GPU: twice the memory and several "
                "times slower than bfloat16. Load with torch_dtype=torch.bfloat16 (or pipe.to(dtype=torch.bfloat16))",
                UserWarning,
                stacklevel=3,
            )

    @classmethod
    def from_pipe(cls, pipeline, dtype: torch.dtype | None = None, torch_dtype: torch.dtype | None = None, **kwargs):
        """A UAE pipeline sharing `pipeline`'s components (no copies), e.g. from a `StableDiffusion3Pipeline`.

        Unlike diffusers' `DiffusionPipeline.from_pipe`, which casts every component to `dtype` (float32 when it is
        not given, silently upcasting a bf16 pipeline and the shared modules of `pipeline` with it), each component
        keeps its own dtype unless `dtype` is given. Keyword arguments replace components (`vlm=`,
        `processor=`, `projector=`, ...) or set options (`conditioning_mode=`); the rest, projector and options
        included, carries over from `pipeline`.

        Args:
            pipeline (`DiffusionPipeline`): an SD3-family pipeline (a `UAEReconstructionPipeline` included).
            dtype (`torch.dtype`, *optional*): cast every model component to this dtype (shared modules are cast in
                place, so `pipeline` sees it too); `torch_dtype` is accepted as its other name, as in diffusers.
        """
        component_names, option_names = cls._get_signature_keys(cls)
        unknown = set(kwargs) - set(component_names) - set(option_names)
        if unknown:
            raise TypeError(f"from_pipe got unknown arguments {sorted(unknown)}; components are {sorted(component_names)} "
                            f"and options {sorted(option_names)}")
        components = {name: value for name, value in pipeline.components.items() if name in component_names}
        options = {name: pipeline.config[name] for name in option_names if name in pipeline.config}
        new_pipeline = cls(**(components | options | kwargs))
        if pipeline.config.get("_name_or_path") is not None:
            new_pipeline.register_to_config(_name_or_path=pipeline.config["_name_or_path"])
        if (dtype or torch_dtype) is not None:
            new_pipeline.to(dtype=dtype or torch_dtype)
        return new_pipeline

    def _check_conditioning_mode(self, mode):
        if mode not in CONDITIONING_MODES:
            raise ValueError(f"conditioning_mode={mode!r} is not one of {CONDITIONING_MODES}")
        if mode == "embeddings" and (self.projector is None or self.vlm is None or self.processor is None):
            raise ValueError(
                'conditioning_mode="embeddings" needs the encoder `vlm`, its `processor` and a `projector`; pass them '
                'or use conditioning_mode="text"'
            )

    def uae_pooled_prompt_embeds(self) -> torch.Tensor:
        """The constant pooled embedding (CLIP-L/G of the empty prompt), computed once per pipeline."""
        if self._pooled_cache is None:
            text_encoders = [self.text_encoder, self.text_encoder_2]
            self._pooled_cache = clip_pooled_embeds(text_encoders, [self.tokenizer, self.tokenizer_2]).cpu()
        return self._pooled_cache

    @staticmethod
    def _as_image_list(image) -> list[PIL.Image.Image]:
        images = image if isinstance(image, (list, tuple)) else [image]
        if len(images) == 0:
            raise ValueError("`image` is an empty list: pass at least one image")
        converted = []
        for index, item in enumerate(images):
            if isinstance(item, np.ndarray):
                item = array_to_image(item, f"image[{index}]")
            if not isinstance(item, PIL.Image.Image):
                raise TypeError(
                    f"`image[{index}]` is a {type(item).__name__}; pass PIL images or HxW(xC) numpy arrays"
                )
            converted.append(to_rgb(item, f"image[{index}]"))
        return converted

    def caption(
        self,
        image,
        instruction: str = CAPTION_INSTRUCTION,
        max_new_tokens: int = 512,
        do_sample: bool = True,
        temperature: float = 0.7,
        top_p: float | None = None,
        **generate_kwargs,
    ) -> list[str]:
        """Caption one image or a list of images in one batch (see [`caption_images`] for the arguments)."""
        images = self._as_image_list(image)
        if self.vlm is None or self.processor is None:
            raise ValueError("this pipeline has no encoder (`vlm` and `processor`): pass `captions=` to skip captioning")
        return caption_images(
            self.vlm, self.processor, images, instruction, max_new_tokens, do_sample, temperature, top_p,
            **generate_kwargs,
        )

    def caption_truncation(self, captions: list[str], max_sequence_length: int = 256) -> list[bool]:
        """Whether each caption is longer than a decoder text encoder reads (CLIP: 77 tokens; T5: `max_sequence_length`)."""
        limits = [(self.tokenizer, self.tokenizer.model_max_length), (self.tokenizer_2, self.tokenizer_2.model_max_length)]
        if self.tokenizer_3 is not None:
            limits.append((self.tokenizer_3, max_sequence_length))
        lengths = [[len(ids) for ids in tokenizer(captions)["input_ids"]] for tokenizer, _ in limits]
        return [any(per_tokenizer[i] > limit for per_tokenizer, (_, limit) in zip(lengths, limits)) for i in range(len(captions))]

    @torch.no_grad()
    def generate(
        self,
        captions: str | list[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 40,
        guidance_scale: float = 5.0,
        negative_prompt: str | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        conditioning_mode: str | None = None,
        max_sequence_length: int = 256,
        return_dict: bool = True,
    ):
        """Draw images from captions (the decoder half of the round trip), all captions in one batch.

        Args:
            captions (`str` or `list[str]`): the captions.
            height, width (`int`, *optional*): output size; defaults to the decoder's native size (1024 for SD3.5).
            num_inference_steps (`int`, defaults to 40), guidance_scale (`float`, defaults to 5.0): the paper's values.
            negative_prompt (`str`, *optional*): defaults to the UAE negative prompt in embeddings mode and to SD3's
                empty prompt in text mode.
            num_images_per_prompt (`int`, defaults to 1): images per caption.
            generator (`torch.Generator` or a list of one per image, *optional*): for reproducible noise.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"`.
            conditioning_mode (`str`, *optional*): overrides the pipeline's mode for this call.
            max_sequence_length (`int`, defaults to 256): T5 length in text mode.

        Returns:
            [`UAEReconstructionPipelineOutput`] (or a tuple `(images, captions)` if `return_dict=False`).
        """
        captions = [captions] if isinstance(captions, str) else list(captions)
        mode = conditioning_mode or self.config.conditioning_mode
        conditioning = self.encode_captions(captions, mode, negative_prompt, num_images_per_prompt, max_sequence_length)
        images = StableDiffusion3Pipeline.__call__(
            self,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            latents=latents,
            output_type=output_type,
            num_images_per_prompt=1,
            return_dict=False,
            **conditioning,
        )[0]
        truncated = self.caption_truncation(captions, max_sequence_length) if mode == "text" else None
        if not return_dict:
            return images, captions
        return UAEReconstructionPipelineOutput(images=images, captions=captions, truncated=truncated)

    def generate_conditioning(self, captions: list[str], negative_prompt: str | None = None) -> GenerateConditioning:
        """[`encode_generate_prompts`] with this pipeline's `vlm`, tokenizer and `projector`, reading captions with or
        without encoder adapters as `conditioning_with_encoder_adapters` says. Gradients flow if enabled."""
        return encode_generate_prompts(
            self.vlm, self.processor.tokenizer, self.projector, captions, negative_prompt or NEGATIVE_PROMPT,
            with_adapters=self.config.get("conditioning_with_encoder_adapters", True),
        )

    def encode_captions(
        self,
        captions: list[str],
        conditioning_mode: str | None = None,
        negative_prompt: str | None = None,
        num_images_per_prompt: int = 1,
        max_sequence_length: int = 256,
    ) -> dict:
        """The decoder's conditioning for captions (item-major, `num_images_per_prompt` rows per caption).

        Returns the keyword arguments SD3's denoising takes: `prompt_embeds`, `negative_prompt_embeds`,
        `pooled_prompt_embeds`, `negative_pooled_prompt_embeds` and `joint_attention_kwargs` (the text key mask when
        captions of different lengths share the batch, else `None`). Gradients flow if enabled.
        """
        if len(captions) == 0:
            raise ValueError("`captions` is empty: pass at least one caption")
        for index, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise TypeError(f"captions[{index}] is a {type(caption).__name__}: pass a string or a list of strings")
        mode = conditioning_mode or self.config.conditioning_mode
        self._check_conditioning_mode(mode)
        repeat = num_images_per_prompt
        if mode == "text":
            embeds, negative_embeds, pooled, negative_pooled = self.encode_prompt(
                prompt=captions,
                prompt_2=None,
                prompt_3=None,
                negative_prompt=negative_prompt,
                do_classifier_free_guidance=True,
                num_images_per_prompt=repeat,
                max_sequence_length=max_sequence_length,
            )
            return dict(
                prompt_embeds=embeds,
                negative_prompt_embeds=negative_embeds,
                pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled,
                joint_attention_kwargs=None,
            )
        conditioning = self.generate_conditioning(captions, negative_prompt)
        dtype = self.transformer.dtype
        prompt_embeds = conditioning.prompt_embeds.to(dtype).repeat_interleave(repeat, dim=0)
        negative_embeds = conditioning.negative_prompt_embeds.to(dtype).repeat_interleave(repeat, dim=0)
        pooled = self.uae_pooled_prompt_embeds().to(prompt_embeds.device, dtype).expand(len(prompt_embeds), -1)
        lengths = conditioning.lengths
        attention_kwargs = None
        if bool((lengths != lengths.max()).any()):
            attention_kwargs = {"encoder_attention_mask": conditioning.text_mask().repeat_interleave(repeat, dim=0)}
        return dict(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            pooled_prompt_embeds=pooled,
            negative_pooled_prompt_embeds=pooled,
            joint_attention_kwargs=attention_kwargs,
        )

    @torch.no_grad()
    def __call__(
        self,
        image=None,
        captions: list[str] | None = None,
        instruction: str = CAPTION_INSTRUCTION,
        max_new_tokens: int = 512,
        do_sample: bool = True,
        temperature: float = 0.7,
        top_p: float | None = None,
        **generate_kwargs,
    ):
        """Reconstruct images: caption each with the encoder, then redraw it with the decoder.

        Args:
            image (`PIL.Image.Image`, `np.ndarray` or a list of them): the originals, converted to RGB by [`to_rgb`]
                and [`array_to_image`] (any PIL mode; uint8, uint16 or [0, 1] float arrays).
            captions (`list[str]`, *optional*): skip captioning and use these (one per image when images are given;
                none may be blank).
            instruction, max_new_tokens, do_sample, temperature, top_p: caption sampling (paper: 0.7, 512 tokens),
                with the checkpoint's own `generation_config` for the rest; each caption is drawn with a generator
                seeded from that image's `generator` (which is not advanced), so a seeded call is reproducible.
            **generate_kwargs: passed to [`~UAEReconstructionPipeline.generate`] (`height`, `width`,
                `num_inference_steps`, `guidance_scale`, `num_images_per_prompt`, `generator`, `output_type`, ...).

        Examples:
        """
        if image is None and captions is None:
            raise ValueError("pass `image` (to caption and reconstruct) or `captions` (to skip captioning)")
        if captions is None:
            caption_generator = _derived_generators(generate_kwargs.get("generator"))
            captions = self.caption(image, instruction, max_new_tokens, do_sample, temperature, top_p,
                                    generator=caption_generator)
        else:
            captions = [captions] if isinstance(captions, str) else list(captions)
            for index, caption in enumerate(captions):
                if isinstance(caption, str) and not caption.strip():
                    raise ValueError(
                        f"captions[{index}] is empty or whitespace-only: the decoder draws from the caption alone; "
                        "pass a description, or leave `captions` out to caption `image`"
                    )
            if image is not None and len(captions) != len(self._as_image_list(image)):
                raise ValueError(
                    f"`captions` has {len(captions)} entries but `image` has {len(self._as_image_list(image))}: "
                    "pass one caption per image"
                )
        return self.generate(captions, **generate_kwargs)

    __call__.__doc__ += EXAMPLE_DOC_STRING

    def load_encoder_adapter(self, adapter_path: str, adapter_name: str = "default", **kwargs) -> None:
        """Attach a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`) to the encoder and
        make it active. Captioning and embeddings-mode conditioning then run through it."""
        if not getattr(self.vlm, "peft_config", None):
            # transformers installs checkpoint key renamings for the adapter that would also rename the base
            # weights when saving later: keep what was there to restore it when the last adapter goes
            self._vlm_weight_conversions = vars(self.vlm).get("_weight_conversions", _NOT_SET)
        self.vlm.load_adapter(adapter_path, adapter_name=adapter_name, **kwargs)
        self.vlm.set_adapter(adapter_name)

    def disable_encoder_adapters(self) -> None:
        """Run the encoder's base weights (adapters stay loaded)."""
        self.vlm.disable_adapters()

    def enable_encoder_adapters(self) -> None:
        self.vlm.enable_adapters()

    def unload_encoder_adapter(self, adapter_name: str = "default") -> None:
        """Remove an adapter from the encoder; after the last one, the plain layers are put back."""
        self.vlm.delete_adapter(adapter_name)
        if not getattr(self.vlm, "peft_config", None):
            for name, module in list(self.vlm.named_modules()):
                if _is_adapter_layer(module):
                    parent, _, child = name.rpartition(".")
                    setattr(self.vlm.get_submodule(parent), child, _plain_layer(module))
            self.vlm._hf_peft_config_loaded = False
            vars(self.vlm).pop("peft_config", None)
            saved = getattr(self, "_vlm_weight_conversions", _NOT_SET)
            if saved is _NOT_SET:
                vars(self.vlm).pop("_weight_conversions", None)
            else:
                self.vlm._weight_conversions = saved

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, **kwargs):
        """diffusers' SD3 LoRA loading, failing loudly when nothing reaches the decoder transformer.

        A PEFT-format folder (`adapter_model.safetensors`) is not a diffusers LoRA file: diffusers would load nothing
        from it without a word.
        """
        before = set(self.get_list_adapters().get("transformer", []))
        super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)
        if set(self.get_list_adapters().get("transformer", [])) == before:
            raise ValueError(
                f"no LoRA weights for the decoder transformer were found in {pretrained_model_name_or_path_or_dict!r} "
                f"(weight_name={kwargs.get('weight_name')!r}); pass a diffusers LoRA file such as "
                "`pytorch_lora_weights.safetensors` written by `save_lora_weights`, not a PEFT adapter folder"
            )

    def save_pretrained(self, save_directory, model_card: str | None = None, **kwargs):
        """Save as a self-loading folder: components, this file as `pipeline.py`, the projector's code beside it.

        The folder reloads with `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`, without
        `uae_hf` installed. `model_card` (Markdown with a YAML header), if given, is written as `README.md`. The saved
        configs name their source (`_name_or_path`) only when it is a Hub id, never a folder of this machine.
        """
        if self.vlm is not None and any(_is_adapter_layer(module) for module in self.vlm.modules()):
            raise ValueError(
                "the encoder has PEFT adapters loaded; saving would write the adapter in place of the model. Save the "
                "adapter itself (`pipe.vlm.save_pretrained(dir)`), or merge it first, then unload it"
            )
        if any(_is_adapter_layer(module) for module in self.transformer.modules()):
            raise ValueError(
                "the decoder transformer has LoRA layers loaded; save them with `save_lora_weights`, or "
                "`fuse_lora()` then `unload_lora_weights()` to save merged weights"
            )
        if kwargs.pop("push_to_hub", False):
            raise ValueError("use `push_to_hub(repo_id, model_card=...)` to upload a UAE pipeline")
        super().save_pretrained(save_directory, **kwargs)
        save_directory = Path(save_directory)
        shutil.copyfile(inspect.getfile(UAEReconstructionPipeline), save_directory / "pipeline.py")
        index_path = save_directory / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = ["pipeline", type(self).__name__]
        if self.projector is not None:
            source = Path(inspect.getfile(type(self.projector)))
            shutil.copyfile(source, save_directory / "projector" / source.name)
            index["projector"] = [source.stem, type(self.projector).__name__]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        # diffusers writes where the pipeline and each model were loaded from (`_name_or_path`): keep a Hub id, drop
        # a local folder (a path of the machine that saved; a Hub download's is its cache snapshot). Loading never
        # reads it: `from_pretrained` records the folder it loads from.
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        def is_hub_id(name) -> bool:
            if not isinstance(name, str):
                return False
            try:
                validate_repo_id(name)
            except HFValidationError:
                return False
            return not Path(name).exists()

        for config_path in sorted(save_directory.rglob("*.json")):
            text = config_path.read_text()
            if "name_or_path" not in text:
                continue
            config = json.loads(text)
            if not isinstance(config, dict):
                continue
            local = [key for key in ("_name_or_path", "name_or_path") if key in config and not is_hub_id(config[key])]
            for key in local:
                del config[key]
            if local:  # in the layout diffusers wrote it (key order kept, two-space indent)
                config_path.write_text(json.dumps(config, indent=2) + "\n")
        if model_card is not None:
            (save_directory / "README.md").write_text(model_card)

    def push_to_hub(
        self,
        repo_id: str,
        model_card: str | None = None,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
    ) -> str:
        """Upload the self-loading folder (see `save_pretrained`) to the Hub and return the commit URL."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, model_card=model_card)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or "Upload UAEReconstructionPipeline",
                create_pr=create_pr,
            )
