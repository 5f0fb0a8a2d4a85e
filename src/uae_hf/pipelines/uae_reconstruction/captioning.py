"""Captioning with the encoder: the chat prompt, per-image sampling and the batched `generate` call."""

import copy

import PIL.Image
import torch
from transformers import GenerationConfig
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

from .image_input import to_rgb

# Exactly the released inference code's text: markdown bold, two spaces before each newline, a trailing space.
CAPTION_INSTRUCTION = (
    "You are an expert vision-language model.  \nYour task is: Given an input image, generate a **textual "
    "description** of the image. If there is text in the image, transcribe it inside double quotes \"\".  \n"
    "Now, carefully analyze the input image and output the full description. "
)


def caption_messages(instruction: str = CAPTION_INSTRUCTION) -> list[dict]:
    """The chat conversation that asks the encoder to caption one image (instruction first, then the image)."""
    return [{"role": "user", "content": [{"type": "text", "text": instruction}, {"type": "image"}]}]


ENCODER_REQUIREMENT = (
    "an encoder is a chat vision-language model: one that AutoModelForImageTextToText loads (e.g. Qwen2.5-VL, Qwen3-VL, "
    "Gemma 3), with a processor (AutoProcessor) that has an image processor and a chat template"
)


class NotAnEncoderError(ValueError):
    """A model (or processor) that cannot caption images was given as the encoder."""


def check_encoder(vlm, processor, name: str = "the encoder") -> None:
    """Refuse, in one line, a model and processor that cannot caption images (text-only, or without a chat template)."""
    if all(getattr(vlm.config, name, None) is None for name in ("vision_config", "vq_config")):  # Emu3: a VQ model
        problem = f"{type(vlm).__name__} is a text-only model (its config has no vision_config)"
    elif getattr(processor, "image_processor", None) is None:
        problem = f"its processor ({type(processor).__name__}) has no image processor"
    elif not getattr(processor, "chat_template", None):
        problem = f"its processor ({type(processor).__name__}) has no chat template"
    else:
        return
    raise NotAnEncoderError(f"{name} cannot caption images: {problem}; {ENCODER_REQUIREMENT}")


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
        vlm: a chat image-text-to-text model (e.g. Qwen2.5-VL, Qwen3-VL, Gemma 3; PEFT-wrapped or not); every input
            its processor returns (`image_grid_thw`, `token_type_ids`, ...) is passed to its `generate`.
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
    check_encoder(vlm, processor)
    prompt = processor.apply_chat_template(caption_messages(instruction), add_generation_prompt=True, tokenize=False)
    bos = processor.tokenizer.bos_token
    starts_with_bos = bos is not None and prompt.startswith(bos)
    images = [to_rgb(image, f"image[{index}]") for index, image in enumerate(images)]
    try:
        # one list of images per prompt (a flat list is one prompt's images to some processors, Gemma 3's); no second
        # BOS where the template writes one (Gemma 3's), as transformers' own `apply_chat_template(tokenize=True)` rules
        inputs = processor(text=[prompt] * len(images), images=[[image] for image in images], padding=True,
                           padding_side="left", return_tensors="pt", add_special_tokens=not starts_with_bos)
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
        # do_sample with them: transformers warns of sampling flags on a greedy config
        config.update(do_sample=True, temperature=temperature, **({"top_p": top_p} if top_p is not None else {}))
        processors = [*processors, PerItemSampling(config, _generators_per_image(generator, len(images)), vlm.device)]
    # our sampler decides each token and greedy decoding takes it: the warpers are the sampler's, not generate's. They
    # are set to transformers' own defaults, not None: `generate` would fill None from the checkpoint's (Qwen3-VL's
    # top_k 20, ...) and warn that greedy decoding ignores them
    defaults = GenerationConfig._get_default_generation_params()
    config.update(do_sample=False, **{name: defaults.get(name) for name, _, _ in _WARPERS})
    output_ids = vlm.generate(**inputs, generation_config=config, logits_processor=processors, **other_kwargs)
    new_tokens = output_ids[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]
