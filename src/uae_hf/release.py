"""Load the released UAE model (`zhiyuanyan1/UAE` layout) into a `UAEReconstructionPipeline`, verifying everything.

Release layout (DESIGN.md §2): `SD3/` (base SD3.5 pipeline), `dit/` (full transformer), `dit_lora/` (PEFT adapter
for the DiT), `llm/` (Qwen2.5-VL whose state dict also holds `projector.0.*` / `projector.2.*`), `llm_lora/`
(shards of the whole PEFT-wrapped language model, keys `model.base_model.model.layers.{i}.….lora_A.default.weight`,
LoRA r=32 / alpha=64 given by the release's code, not stored), `llm_processor/`. Both adapters are merged,
`W + (alpha / r) · B @ A`, so the pipeline computes what the release's own code computes.
"""

import json
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors import safe_open
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from .models.projector import UAEProjector
from .pipelines.uae_reconstruction.loading import component_dtypes, stored_dtype
from .pipelines.uae_reconstruction.pipeline_uae_reconstruction import UAEReconstructionPipeline
from .rewards.similarity import _quiet_transformers

SLOTS = {  # slot → accepted folder names (third-party loaders rename some)
    "SD3": ("SD3", "SD3_model"),
    "dit": ("dit",),
    "dit_lora": ("dit_lora",),
    "llm": ("llm", "llm_model"),
    "llm_lora": ("llm_lora",),
    "llm_processor": ("llm_processor",),
}
LLM_LORA_PREFIX = "model.base_model.model."


class ReleaseFormatError(ValueError):
    """The folder is not (or no longer) the UAE release layout; the message names the slot, key or shape."""


def _read_tensors(folder: Path, slot: str) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ReleaseFormatError(f"slot {slot!r} ({folder}) holds no .safetensors file")
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            tensors |= {key: handle.get_tensor(key) for key in handle.keys()}
    return tensors


def resolve_release(path_or_repo: str | Path, **download_kwargs) -> dict[str, Path]:
    """The folder of each slot (downloading a Hub repo first), or a `ReleaseFormatError` naming what is missing."""
    root = Path(path_or_repo)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(str(path_or_repo), **download_kwargs))
    folders, missing = {}, []
    for slot, names in SLOTS.items():
        found = next((root / name for name in names if (root / name).is_dir()), None)
        if found is None:
            missing.append(f"{slot} (looked for {' or '.join(names)})")
        folders[slot] = found
    if missing:
        raise ReleaseFormatError(f"{root} is not a UAE release: missing slot(s) {', '.join(missing)}")
    return folders


def _merge(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """`W + scale · B @ A`, computed in float32."""
    return (weight.float() + scale * (lora_b.float() @ lora_a.float())).to(weight.dtype)


def _lora_pairs(tensors: dict, slot: str, strip: str, a_suffix: str, b_suffix: str, rank: int | None):
    """{module path: (A, B)} from adapter tensors; checks pairing, rank and that some B is non-zero."""
    pairs = {}
    for key, value in tensors.items():
        for suffix, index in ((a_suffix, 0), (b_suffix, 1)):
            if key.endswith(suffix):
                if not key.startswith(strip):
                    raise ReleaseFormatError(f"slot {slot!r}: unexpected LoRA key {key!r} (expected prefix {strip!r})")
                pairs.setdefault(key[len(strip) : -len(suffix)], [None, None])[index] = value
    if not pairs:
        raise ReleaseFormatError(f"slot {slot!r}: no LoRA tensors (keys ending in {a_suffix!r})")
    unpaired = [f"{module} ({'B' if lora_a is None else 'A'} only)" for module, (lora_a, lora_b) in pairs.items()
                if lora_a is None or lora_b is None]
    if unpaired:
        raise ReleaseFormatError(f"slot {slot!r}: LoRA keys without their other half (renamed or missing keys?): "
                                 f"{', '.join(unpaired)}")
    for module, (lora_a, lora_b) in pairs.items():
        if rank is not None and (lora_a.shape[0] != rank or lora_b.shape[1] != rank):
            raise ReleaseFormatError(
                f"slot {slot!r}: LoRA for {module!r} has rank {lora_a.shape[0]} (A {tuple(lora_a.shape)}, "
                f"B {tuple(lora_b.shape)}), expected rank {rank}"
            )
    if not any(bool(lora_b.abs().sum() > 0) for _, lora_b in pairs.values()):
        raise ReleaseFormatError(f"slot {slot!r}: every lora_B is zero, so the adapter would change nothing")
    return pairs


def _apply(model: torch.nn.Module, pairs: dict, scale: float, slot: str, module_prefix: str) -> None:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (lora_a, lora_b) in pairs.items():
            target = modules.get(module_prefix + name)
            if not isinstance(target, torch.nn.Linear):
                raise ReleaseFormatError(
                    f"slot {slot!r}: LoRA key for {name!r} maps to {module_prefix + name!r}, which is not a Linear "
                    "layer of the model"
                )
            if target.weight.shape != (lora_b.shape[0], lora_a.shape[1]):
                raise ReleaseFormatError(f"slot {slot!r}: LoRA for {name!r} is {lora_b.shape[0]}x{lora_a.shape[1]} "
                                         f"but the layer is {tuple(target.weight.shape)}")
            target.weight.copy_(_merge(target.weight, lora_a, lora_b, scale))


def _projector(tensors: dict, llm_hidden: int, joint_attention_dim: int, dtype: torch.dtype | None) -> UAEProjector:
    keys = ["projector.0.weight", "projector.0.bias", "projector.2.weight", "projector.2.bias"]
    missing = [key for key in keys if key not in tensors]
    if missing:
        raise ReleaseFormatError(f"slot 'llm': projector key(s) {missing} not found in the LLM's state dict")
    first, second = tensors["projector.0.weight"], tensors["projector.2.weight"]
    if first.shape[1] != llm_hidden or second.shape[1] != first.shape[0] or second.shape[0] != joint_attention_dim:
        raise ReleaseFormatError(
            f"slot 'llm': projector is {first.shape[1]}→{first.shape[0]}→{second.shape[0]} but the LLM hidden size "
            f"is {llm_hidden} and the DiT's joint_attention_dim is {joint_attention_dim}"
        )
    projector = UAEProjector(first.shape[1], first.shape[0], second.shape[0])
    projector.load_state_dict({key: tensors[key] for key in keys})
    return projector.to(dtype or first.dtype).eval()


def load_uae_release(
    path_or_repo: str | Path,
    llm_lora_rank: int = 32,
    llm_lora_alpha: int = 64,
    torch_dtype: torch.dtype | None = None,
    **download_kwargs,
) -> UAEReconstructionPipeline:
    """Load the released UAE model as an embeddings-mode `UAEReconstructionPipeline`, both adapters merged.

    Args:
        path_or_repo: a local copy of the release or its Hub id (`"zhiyuanyan1/UAE"`).
        llm_lora_rank (`int`, defaults to 32), llm_lora_alpha (`int`, defaults to 64): the LLM LoRA settings of the
            release's code (the shards do not store alpha).
        torch_dtype: dtype of every loaded model (`torch.bfloat16` on GPU); by default each keeps the dtype its weights
            are stored in. Merging happens in float32.
        **download_kwargs: for `huggingface_hub.snapshot_download` when `path_or_repo` is a repo id.

    Raises:
        ReleaseFormatError: a slot, key or shape is not what the release has; the message names it.
    """
    folders = resolve_release(path_or_repo, **download_kwargs)
    transformer = SD3Transformer2DModel.from_pretrained(folders["dit"],
                                                        dtype=torch_dtype or stored_dtype(folders["dit"]))
    sd3 = StableDiffusion3Pipeline.from_pretrained(folders["SD3"], transformer=transformer, text_encoder_3=None,
                                                   tokenizer_3=None, dtype=component_dtypes(folders["SD3"], torch_dtype))
    pooled = sd3.text_encoder.config.projection_dim + sd3.text_encoder_2.config.projection_dim
    if transformer.config.pooled_projection_dim != pooled:
        raise ReleaseFormatError(f"slot 'dit': pooled_projection_dim is {transformer.config.pooled_projection_dim}, "
                                 f"but SD3's CLIP-L + CLIP-G pooled embedding is {pooled} wide")

    with _quiet_transformers():  # the projector keys are not Qwen's: reported as unexpected, read separately below
        vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(folders["llm"], dtype=torch_dtype).eval()
    hidden = vlm.config.get_text_config().hidden_size
    projector = _projector(_read_tensors(folders["llm"], "llm"), hidden, transformer.config.joint_attention_dim,
                           torch_dtype)

    llm_tensors = _read_tensors(folders["llm_lora"], "llm_lora")
    visual = [key for key in llm_tensors if "lora_" in key and "visual" in key]
    if visual:
        raise ReleaseFormatError(f"slot 'llm_lora': LoRA on the vision tower is not part of the release: {visual[0]!r}")
    pairs = _lora_pairs(llm_tensors, "llm_lora", LLM_LORA_PREFIX, ".lora_A.default.weight", ".lora_B.default.weight",
                        llm_lora_rank)
    expected = 7 * vlm.config.get_text_config().num_hidden_layers  # q, k, v, o, gate, up, down in every layer
    if len(pairs) != expected:
        raise ReleaseFormatError(f"slot 'llm_lora': {len(pairs)} LoRA pairs, expected {expected} (all 7 linear layers "
                                 "of each language-model layer)")
    _apply(vlm, pairs, llm_lora_alpha / llm_lora_rank, "llm_lora", "model.language_model.")

    adapter_config = folders["dit_lora"] / "adapter_config.json"
    if not adapter_config.exists():
        raise ReleaseFormatError(f"slot 'dit_lora' ({folders['dit_lora']}) has no adapter_config.json")
    adapter = json.loads(adapter_config.read_text())
    dit_pairs = _lora_pairs(_read_tensors(folders["dit_lora"], "dit_lora"), "dit_lora", "base_model.model.",
                            ".lora_A.weight", ".lora_B.weight", adapter["r"])
    _apply(transformer, dit_pairs, adapter["lora_alpha"] / adapter["r"], "dit_lora", "")

    processor = AutoProcessor.from_pretrained(folders["llm_processor"])
    return UAEReconstructionPipeline.from_pipe(sd3, vlm=vlm, processor=processor, projector=projector,
                                               conditioning_mode="embeddings")
