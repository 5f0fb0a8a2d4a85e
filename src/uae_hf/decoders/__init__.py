"""The decoder families UAE trains and evaluates: one module per diffusers family behind [`DecoderFamily`] (`base.py`),
chosen from the pipeline's class by [`decoder_family`].

This file is the registry and stays light (the command line checks a pipeline's class before anything heavy loads): a
family's module, which imports torch and diffusers, is imported when a pipeline of it is met. Adding a family: one
module with a `DecoderFamily` subclass, and its line in `FAMILY_OF_PIPELINE`.
"""

import importlib

# the diffusers pipeline class → (module, family class, family name)
FAMILY_OF_PIPELINE = {
    "StableDiffusion3Pipeline": ("sd3", "SD3Family", "SD3"),
    "FluxPipeline": ("flux", "FluxFamily", "FLUX.1"),
    "Flux2KleinPipeline": ("flux2_klein", "Flux2KleinFamily", "FLUX.2 [klein]"),
    "QwenImagePipeline": ("qwen_image", "QwenImageFamily", "Qwen-Image"),
}
_FAMILY_MODULES = {family: module for module, family, _ in FAMILY_OF_PIPELINE.values()} | {"DecoderFamily": "base"}


def __getattr__(name: str):
    if name in _FAMILY_MODULES:
        return getattr(importlib.import_module(f".{_FAMILY_MODULES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def supported_pipelines() -> str:
    """The supported pipeline classes with their family, for messages."""
    return ", ".join(f"{cls} ({name})" for cls, (_, _, name) in FAMILY_OF_PIPELINE.items())


def family_class(pipeline_class_names):
    """The [`DecoderFamily`] subclass of a pipeline whose class (or a base class) has one of these names, else
    `None`."""
    for name in pipeline_class_names:
        if name in FAMILY_OF_PIPELINE:
            module, family, _ = FAMILY_OF_PIPELINE[name]
            return getattr(importlib.import_module(f".{module}", __name__), family)
    return None


def decoder_family(decoder):
    """The [`DecoderFamily`] reading `decoder` (a diffusers pipeline, or a family already); one line naming the
    supported pipelines for any other."""
    if isinstance(decoder, __getattr__("DecoderFamily")):
        return decoder
    family = family_class(cls.__name__ for cls in type(decoder).__mro__)
    if family is None:
        raise TypeError(f"decoder {type(decoder).__name__} is not of a supported family; supported pipelines: "
                        f"{supported_pipelines()}")
    return family(decoder)


__all__ = ["FAMILY_OF_PIPELINE", "DecoderFamily", "decoder_family", "family_class", "supported_pipelines",
           *(family for _, family, _ in FAMILY_OF_PIPELINE.values())]
