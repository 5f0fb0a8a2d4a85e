"""The decoder families UAE trains and evaluates: one module per diffusers family behind [`DecoderFamily`], chosen
from the pipeline's class by [`decoder_family`]. Adding a family: one module with a `DecoderFamily` subclass, listed
in `FAMILIES`."""

from .base import DecoderFamily
from .flux import FluxFamily
from .qwen_image import QwenImageFamily
from .sd3 import SD3Family

FAMILIES: tuple[type[DecoderFamily], ...] = (SD3Family, FluxFamily, QwenImageFamily)


def supported_pipelines() -> str:
    """The supported pipeline classes with their family, for messages."""
    return ", ".join(f"{cls} ({family.name})" for family in FAMILIES for cls in family.pipeline_classes)


def family_class(pipeline_class_names) -> type[DecoderFamily] | None:
    """The family of a pipeline whose class (or a base class) has one of these names, else `None`."""
    names = list(pipeline_class_names)
    for family in FAMILIES:
        if any(name in family.pipeline_classes for name in names):
            return family
    return None


def decoder_family(decoder) -> DecoderFamily:
    """The [`DecoderFamily`] reading `decoder` (a diffusers pipeline, or a family already); one line naming the
    supported families for any other pipeline."""
    if isinstance(decoder, DecoderFamily):
        return decoder
    family = family_class(cls.__name__ for cls in type(decoder).__mro__)
    if family is None:
        raise TypeError(f"decoder {type(decoder).__name__} is not of a supported family; supported pipelines: "
                        f"{supported_pipelines()}")
    return family(decoder)


__all__ = ["FAMILIES", "DecoderFamily", "FluxFamily", "QwenImageFamily", "SD3Family", "decoder_family", "family_class", "supported_pipelines"]
