"""Load a [`UAEReconstructionPipeline`]: assembled from separately stored parts (encoder, decoder, projector), or
from a saved folder without executing the code saved in it."""

import importlib
import json
from collections import Counter
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from ...models.projector import UAEProjector
from .attention_processor import MaskedJointAttnProcessor
from .captioning import ENCODER_REQUIREMENT, NotAnEncoderError, check_encoder
from .pipeline_uae_reconstruction import UAEReconstructionPipeline

_SAFETENSORS_FLOATS = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def stored_dtype(folder: str | Path) -> torch.dtype | None:
    """The floating dtype most tensors of a model folder's `*.safetensors` files are stored in, read from their
    headers (no weights are loaded); `None` for a folder without any (a scheduler, a tokenizer)."""
    counts = Counter()
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                dtype = _SAFETENSORS_FLOATS.get(handle.get_slice(key).get_dtype())
                if dtype is not None:
                    counts[dtype] += 1
    return counts.most_common(1)[0][0] if counts else None


def component_dtypes(folder: str | Path, torch_dtype: torch.dtype | None = None) -> torch.dtype | dict:
    """`torch_dtype` if given; otherwise each component subfolder's stored dtype, as diffusers' per-component
    `torch_dtype` mapping (diffusers alone would load every diffusers model in float32)."""
    if torch_dtype is not None:
        return torch_dtype
    stored = {path.name: stored_dtype(path) for path in Path(folder).iterdir() if path.is_dir()}
    return {name: dtype for name, dtype in stored.items() if dtype is not None}


def _mask_for_good(pipeline: UAEReconstructionPipeline) -> UAEReconstructionPipeline:
    """Masked attention in every layer of a transformer this module loaded (no one else holds it): a direct call of
    the DiT (SD3's own `__call__`, a sampler, a trainer) then honours `encoder_attention_mask` without
    `pipeline.masked_attention()`. Without a mask the processor computes what diffusers' default one does."""
    pipeline.transformer.set_attn_processor(MaskedJointAttnProcessor())
    return pipeline


def _local_folder(path_or_repo: str | Path, download=None, **download_kwargs) -> Path:
    """A local folder as is; a Hub repo downloaded with `download` (default: `huggingface_hub.snapshot_download`)."""
    if Path(path_or_repo).is_dir():
        return Path(path_or_repo)
    if download is None:
        from huggingface_hub import snapshot_download as download
    return Path(download(str(path_or_repo), **download_kwargs))


def load_encoder(name_or_path: str | Path, dtype=None):
    """A chat VLM (`AutoModelForImageTextToText`, in eval mode) and its processor, from a folder or Hub id; a model
    that cannot caption images (text-only, no chat template) is refused in one line. `dtype` as `from_pretrained`'s."""
    try:
        vlm = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype).eval()
    except ValueError as error:
        if "Unrecognized configuration class" not in str(error):
            raise
        model_type = AutoConfig.from_pretrained(name_or_path).model_type
        raise NotAnEncoderError(f"{name_or_path} cannot caption images: AutoModelForImageTextToText does not load its "
                                f"model type {model_type!r} (a text-only model); {ENCODER_REQUIREMENT}") from None
    processor = AutoProcessor.from_pretrained(name_or_path)
    check_encoder(vlm, processor, str(name_or_path))
    return vlm, processor


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
        encoder (`str`): a chat VLM folder or Hub id (e.g. `"Qwen/Qwen2.5-VL-3B-Instruct"`, `"Qwen/Qwen3-VL-4B-Instruct"`,
            `"google/gemma-3-4b-it"`).
        projector (`str`, *optional*): a [`UAEProjector`] folder; required when `conditioning_mode="embeddings"`.
        conditioning_mode (`str`, defaults to `"embeddings"`): `"embeddings"` or `"text"`.
        torch_dtype (`torch.dtype`, *optional*): dtype of every model (`torch.bfloat16` on GPU); by default each
            model keeps the dtype its weights are stored in.
        load_t5 (`bool`, *optional*): load the decoder's T5 encoder; by default only in text mode (embeddings mode
            never uses it, and SD3.5's T5-XXL alone has 4.7B parameters).

    The transformer, loaded here for this pipeline alone, keeps [`MaskedJointAttnProcessor`] for good: a direct call
    with `encoder_attention_mask` masks even outside `pipe.masked_attention()`.
    """
    if load_t5 is None:
        load_t5 = conditioning_mode == "text"
    skip_t5 = {} if load_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    decoder = _local_folder(decoder, StableDiffusion3Pipeline.download, **skip_t5)  # T5's files only when loaded
    sd3 = StableDiffusion3Pipeline.from_pretrained(decoder, dtype=component_dtypes(decoder, torch_dtype), **skip_t5)
    vlm, processor = load_encoder(encoder, torch_dtype)
    projector_model = None
    if projector:
        projector = _local_folder(projector)
        projector_model = UAEProjector.from_pretrained(projector, dtype=torch_dtype or stored_dtype(projector))
    return _mask_for_good(UAEReconstructionPipeline.from_pipe(
        sd3, vlm=vlm, processor=processor, projector=projector_model, conditioning_mode=conditioning_mode
    ))


def load_saved_pipeline(path_or_repo: str | Path, trust_remote_code: bool = False, torch_dtype=None, **download_kwargs):
    """Load a saved pipeline folder (or Hub repo) without running code from it.

    A folder written by `UAEReconstructionPipeline.save_pretrained` is rebuilt from `uae_hf`'s own classes (none of
    its code, `pipeline.py`, the modules beside it, `projector/projector.py`, is executed; its transformer keeps
    [`MaskedJointAttnProcessor`] for good, as with [`load_uae_pipeline`]); any other diffusers pipeline loads as
    usual. With `trust_remote_code=True`, diffusers loads the folder's own code instead, as `DiffusionPipeline`
    would. Every model is loaded in `torch_dtype` if given, else in the dtype its weights are stored in.
    """
    folder = _local_folder(path_or_repo, **download_kwargs)
    dtypes = component_dtypes(folder, torch_dtype)
    if trust_remote_code:
        return DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, dtype=dtypes)
    index = json.loads((folder / "model_index.json").read_text())
    class_name = index.get("_class_name")
    if not (isinstance(class_name, list) and class_name[1] == UAEReconstructionPipeline.__name__):
        return DiffusionPipeline.from_pretrained(folder, dtype=dtypes)
    components = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue
        library, component_class = entry
        dtype = dtypes.get(name) if isinstance(dtypes, dict) else dtypes
        if library is None:
            components[name] = None
        elif name == "projector":
            components[name] = UAEProjector.from_pretrained(folder / name, dtype=dtype)
        elif library in ("diffusers", "transformers"):
            cls = getattr(importlib.import_module(library), component_class)
            loads_weights = hasattr(cls, "save_pretrained") and (folder / name / "config.json").exists()
            components[name] = cls.from_pretrained(folder / name, **({"dtype": dtype} if loads_weights else {}))
        else:
            raise ValueError(f"{folder}: component {name!r} comes from {library!r}; load it with trust_remote_code=True "
                             "if you trust that code")
    options = {key: value for key, value in index.items() if not key.startswith("_") and not isinstance(value, list)}
    return _mask_for_good(UAEReconstructionPipeline(**components, **options))
