"""Load a [`UAEReconstructionPipeline`]: assembled from separately stored parts (encoder, decoder, projector), or
from a saved folder without executing the code saved in it."""

import importlib
import json
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline
from transformers import AutoModelForImageTextToText, AutoProcessor

from ...models.projector import UAEProjector
from .pipeline_uae_reconstruction import UAEReconstructionPipeline


def load_uae_pipeline(
    decoder: str,
    encoder: str,
    projector: str | None = None,
    conditioning_mode: str = "embeddings",
    torch_dtype: torch.dtype | None = None,
    load_t5: bool | None = None,
) -> UAEReconstructionPipeline:
    """Load an SD3-family decoder, a chat VLM encoder and (for embeddings mode) a projector into one pipeline.

    Args:
        decoder (`str`): an SD3/SD3.5 pipeline folder or Hub id (e.g. `"stabilityai/stable-diffusion-3.5-large"`).
        encoder (`str`): a chat VLM folder or Hub id (e.g. `"Qwen/Qwen2.5-VL-3B-Instruct"`).
        projector (`str`, *optional*): a [`UAEProjector`] folder; required when `conditioning_mode="embeddings"`.
        conditioning_mode (`str`, defaults to `"embeddings"`): `"embeddings"` or `"text"`.
        torch_dtype (`torch.dtype`, *optional*): dtype of every model (e.g. `torch.bfloat16` on GPU).
        load_t5 (`bool`, *optional*): load the decoder's T5 encoder; by default only in text mode (embeddings mode
            never uses it, and SD3.5's T5-XXL alone has 4.7B parameters).
    """
    if load_t5 is None:
        load_t5 = conditioning_mode == "text"
    skip_t5 = {} if load_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    sd3 = StableDiffusion3Pipeline.from_pretrained(decoder, torch_dtype=torch_dtype, **skip_t5)
    vlm = AutoModelForImageTextToText.from_pretrained(encoder, dtype=torch_dtype).eval()
    processor = AutoProcessor.from_pretrained(encoder)
    projector_model = UAEProjector.from_pretrained(projector, torch_dtype=torch_dtype) if projector else None
    return UAEReconstructionPipeline.from_pipe(
        sd3, vlm=vlm, processor=processor, projector=projector_model, conditioning_mode=conditioning_mode
    )


def load_saved_pipeline(path_or_repo: str | Path, trust_remote_code: bool = False, torch_dtype=None, **download_kwargs):
    """Load a saved pipeline folder (or Hub repo) without running code from it.

    A folder written by `UAEReconstructionPipeline.save_pretrained` is rebuilt from `uae_hf`'s own classes (its
    `pipeline.py` and `projector/projector.py` are not executed); any other diffusers pipeline loads as usual. With
    `trust_remote_code=True`, diffusers loads the folder's own code instead, as `DiffusionPipeline` would.
    """
    folder = Path(path_or_repo)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(str(path_or_repo), **download_kwargs))
    if trust_remote_code:
        return DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, torch_dtype=torch_dtype)
    index = json.loads((folder / "model_index.json").read_text())
    class_name = index.get("_class_name")
    if not (isinstance(class_name, list) and class_name[1] == UAEReconstructionPipeline.__name__):
        return DiffusionPipeline.from_pretrained(folder, torch_dtype=torch_dtype)
    components = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue
        library, component_class = entry
        if library is None:
            components[name] = None
        elif name == "projector":
            components[name] = UAEProjector.from_pretrained(folder / name, torch_dtype=torch_dtype)
        elif library in ("diffusers", "transformers"):
            cls = getattr(importlib.import_module(library), component_class)
            dtype = {"torch_dtype": torch_dtype} if library == "diffusers" else {"dtype": torch_dtype}
            loads_weights = hasattr(cls, "save_pretrained") and (folder / name / "config.json").exists()
            components[name] = cls.from_pretrained(folder / name, **(dtype if loads_weights else {}))
        else:
            raise ValueError(f"{folder}: component {name!r} comes from {library!r}; load it with trust_remote_code=True "
                             "if you trust that code")
    options = {key: value for key, value in index.items() if not key.startswith("_") and not isinstance(value, list)}
    return UAEReconstructionPipeline(**components, **options)
