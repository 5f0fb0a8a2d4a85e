"""Load the released UAE model (`zhiyuanyan1/UAE` layout) into a `UAEReconstructionPipeline`, verifying everything.

Release layout (DESIGN.md §2): `SD3/` (base SD3.5 pipeline), `dit/` (full transformer), `dit_lora/` (PEFT adapter
for the DiT), `llm/` (Qwen2.5-VL whose state dict also holds `projector.0.*` / `projector.2.*`), `llm_lora/`
(shards of the whole PEFT-wrapped model, keys `model.base_model.model.layers.{i}.….lora_A.default.weight`,
LoRA r=32 / alpha=64 given by the release's code, not stored), `llm_processor/`. The release's code wraps the
language model with LoRA and loads every tensor of the `llm_lora` shards into it non-strictly, so base weights,
embeddings or norms stored there replace `llm/`'s; we do the same, then merge both adapters, `W + (alpha / r) · B @ A`,
so the pipeline computes what the release's own code computes. `ReleaseLoadReport` says what `llm_lora` replaced.
"""

import json
import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from .models.projector import UAEProjector
from .pipelines.uae_reconstruction.loading import component_dtypes, stored_dtype
from .pipelines.uae_reconstruction.pipeline_uae_reconstruction import UAEReconstructionPipeline
from .rewards.similarity import _quiet_transformers

logger = logging.getLogger(__name__)

SLOTS = {  # slot → accepted folder names: the Hub's, the release code's `Checkpoints/`, third-party loaders'
    "SD3": ("SD3", "SD3_model"),
    "dit": ("dit",),
    "dit_lora": ("dit_lora",),
    "llm": ("llm", "llm_model"),
    "llm_lora": ("llm_lora",),
    "llm_processor": ("llm_processor", "llm_model_preprocessor"),
}
LLM_LORA_PREFIX = "model.base_model.model."
LLM_LORA_SUFFIXES = (".lora_A.default.weight", ".lora_B.default.weight")


class ReleaseFormatError(ValueError):
    """The folder is not (or no longer) the UAE release layout; the message names the slot, key or shape."""


@dataclass(frozen=True)
class ReleaseLoadReport:
    """What `load_uae_release` read from where: `pipe.release_load_report`, logged, printed by `uae-hf convert-release`.

    The release's code loads every tensor of the `llm_lora` shards into its LoRA-wrapped model non-strictly, so the
    non-LoRA tensors stored there (base weights, embeddings, norms, ...) replace `llm/`'s before the LoRA applies.

    Args:
        slots (`dict[str, str]`): slot → the folder it was read from (`"llm_processor": "llm_model_preprocessor"`).
        lora_pairs (`int`): LLM LoRA pairs merged, at `lora_scale` (alpha / r).
        lora_scale (`float`): alpha / r of the LLM LoRA.
        families (`dict[str, int]`): non-LoRA tensors of `llm_lora` by key family → count: `base_layer` (the wrapped
            linear layers' own weights and biases), `embed_tokens`, `norm`, `input_layernorm`, ... (language model),
            `visual`, `lm_head`, `projector`, or the first part of a key the release's model does not have.
        replaced (`tuple[str, ...]`): pipeline weights (`vlm.…`, `projector.…`, tied names included) that `llm_lora`
            tensors overwrote.
        changed (`tuple[str, ...]`): those of `replaced` whose value (before the LoRA merge) now differs from `llm/`'s.
        ignored (`tuple[str, ...]`): `llm_lora` keys the release's model has no place for, dropped as its
            `strict=False` load drops them.
        processor_max_pixels (`int | None`): the image processor's `max_pixels`, from the release's processor slot.
    """

    slots: dict[str, str]
    lora_pairs: int
    lora_scale: float
    families: dict[str, int]
    replaced: tuple[str, ...]
    changed: tuple[str, ...]
    ignored: tuple[str, ...]
    processor_max_pixels: int | None

    def __str__(self) -> str:
        renamed = [f"{slot} ← {name}/" for slot, name in self.slots.items() if name != slot]
        lines = [
            f"UAE release ({', '.join(renamed) or 'Hub slot names'}), processor max_pixels {self.processor_max_pixels}",
            f"llm_lora: {self.lora_pairs} LoRA pairs merged (alpha/r = {self.lora_scale:g}); "
            f"{sum(self.families.values())} other tensors, by key family:",
            "  " + (", ".join(f"{family} {count}" for family, count in self.families.items()) or "(none)"),
            f"  they replaced {len(self.replaced)} weights of llm/ (as the release's non-strict load does); "
            f"{len(self.changed)} differ from llm/'s" + (":" if self.changed else ""),
        ]
        lines += [f"    {name}" for name in self.changed[:20]]
        if len(self.changed) > 20:
            lines.append(f"    ... {len(self.changed) - 20} more (release_load_report.changed)")
        if self.ignored:
            more = f", ... {len(self.ignored) - 5} more" if len(self.ignored) > 5 else ""
            shown = ", ".join(self.ignored[:5]) + more
            lines.append(f"  ignored {len(self.ignored)} key(s) the release's model does not have: {shown}")
        return "\n".join(lines)


def _read_tensors(folder: Path, slot: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a slot's safetensors files whose keys start with `prefix` (only those are read)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ReleaseFormatError(f"slot {slot!r} ({folder}) holds no .safetensors file")
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            tensors |= {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}
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


class _ReleasedModel(torch.nn.Module):
    """The module tree the release's code loads `llm_lora` into, over our own modules (loading into it loads into them).

    Its Qwen2.5-VL class in transformers 4.50's layout (`visual`, `model`, `lm_head`, in that order) plus `projector`,
    with `model` the PEFT-wrapped language model. The order matters: where `lm_head` is tied to `embed_tokens`, a
    non-strict load writes both keys into one tensor and the later one wins.
    """

    def __init__(self, vlm: Qwen2_5_VLForConditionalGeneration, wrapped: torch.nn.Module, projector: UAEProjector):
        super().__init__()
        self.visual = vlm.model.visual
        self.model = wrapped
        self.lm_head = vlm.lm_head
        self.projector = projector.projector  # the release's `projector` is the Sequential itself: keys projector.0.*


def _family(key: str) -> str:
    """`base_layer`, or the module a language-model key belongs to (`norm`, `input_layernorm`, ...), or the first
    part of any other key (`visual`, `lm_head`, `projector`, ...)."""
    if not key.startswith(LLM_LORA_PREFIX):
        return key.split(".")[0]
    parts = key[len(LLM_LORA_PREFIX):].split(".")
    return "base_layer" if "base_layer" in parts else parts[-2] if len(parts) > 1 else parts[0]


def _load_llm_lora(vlm: Qwen2_5_VLForConditionalGeneration, projector: UAEProjector, tensors: dict, rank: int,
                   alpha: int) -> dict:
    """Load `llm_lora` as the release does, then merge its LoRA; returns the `ReleaseLoadReport` fields it fills.

    The release wraps the language model with LoRA (r, alpha, all linear layers) and loads every tensor of the shards
    with `strict=False`: the base tensors there replace `llm/`'s, then the LoRA applies on top of them.
    """
    visual = [key for key in tensors if "lora_" in key and "visual" in key]
    if visual:
        raise ReleaseFormatError(f"slot 'llm_lora': LoRA on the vision tower is not part of the release: {visual[0]!r}")
    pairs = _lora_pairs(tensors, "llm_lora", LLM_LORA_PREFIX, *LLM_LORA_SUFFIXES, rank)
    expected = 7 * vlm.config.get_text_config().num_hidden_layers  # q, k, v, o, gate, up, down in every layer
    if len(pairs) != expected:
        raise ReleaseFormatError(f"slot 'llm_lora': {len(pairs)} LoRA pairs, expected {expected} (all 7 linear layers "
                                 "of each language-model layer)")

    names = {}  # tensor → every pipeline name it has (tied weights have two)
    for component, module in (("vlm", vlm), ("projector", projector)):
        for name, tensor in [*module.named_parameters(remove_duplicate=False),
                             *module.named_buffers(remove_duplicate=False)]:
            names.setdefault(id(tensor), []).append(f"{component}.{name}")
    requires_grad = {parameter: parameter.requires_grad for parameter in vlm.parameters()}  # PEFT freezes the base
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear", init_lora_weights="gaussian")
    # the gaussian init is overwritten by the shards: fork the RNG so that loading does not move the caller's seed
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # a transformers deprecation PEFT triggers, not ours to fix
        wrapped = get_peft_model(vlm.model.language_model, config)
    released = _ReleasedModel(vlm, wrapped, projector)
    layers = {name: module for name, module in wrapped.base_model.model.named_modules()
              if isinstance(module, LoraLayer)}
    for name, (lora_a, lora_b) in pairs.items():
        if name not in layers:
            raise ReleaseFormatError(f"slot 'llm_lora': LoRA key for {name!r} maps to "
                                     f"'model.language_model.{name}', which is not a Linear layer of the model")
        weight = layers[name].base_layer.weight
        if weight.shape != (lora_b.shape[0], lora_a.shape[1]):
            raise ReleaseFormatError(f"slot 'llm_lora': LoRA for {name!r} is {lora_b.shape[0]}x{lora_a.shape[1]} "
                                     f"but the layer is {tuple(weight.shape)}")

    targets = released.state_dict(keep_vars=True)
    others = [key for key in tensors if not key.endswith(LLM_LORA_SUFFIXES)]
    before = {}  # llm/'s values of the tensors a shard changes: a tied pair may still end up unchanged
    with torch.no_grad():
        for key in others:
            target = targets.get(key)
            if target is None:
                continue
            if target.shape != tensors[key].shape:
                raise ReleaseFormatError(f"slot 'llm_lora': {key!r} has shape {tuple(tensors[key].shape)}, but the "
                                         f"model's tensor there is {tuple(target.shape)}")
            if id(target) not in before and not torch.equal(target, tensors[key].to(target.dtype)):
                before[id(target)] = target.detach().clone()
        ignored = released.load_state_dict(tensors, strict=False).unexpected_keys
        loaded = {id(targets[key]): targets[key] for key in others if key in targets}
        replaced = sorted({name for tensor_id in loaded for name in names.get(tensor_id, [])})
        changed = sorted({name for tensor_id, value in before.items()
                          if not torch.equal(loaded[tensor_id], value) for name in names.get(tensor_id, [])})
        for name, (lora_a, lora_b) in pairs.items():
            weight = layers[name].base_layer.weight
            weight.copy_(_merge(weight, lora_a, lora_b, alpha / rank))
    vlm.model.language_model = wrapped.unload()  # plain layers again, the LoRA now inside their weights
    for parameter, flag in requires_grad.items():
        parameter.requires_grad_(flag)
    return dict(lora_pairs=len(pairs), lora_scale=alpha / rank,
                families=dict(sorted(Counter(_family(key) for key in others).items())),
                replaced=tuple(replaced), changed=tuple(changed), ignored=tuple(sorted(ignored)))


def _processor(folder: Path):
    """The release's own processor (its `max_pixels` decides the captions): never a stock one in its place."""
    try:
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ReleaseFormatError(f"slot 'llm_processor' ({folder}) does not hold a processor: {error}") from error
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise ReleaseFormatError(f"slot 'llm_processor' ({folder}) holds a {type(processor).__name__}, not a "
                                 "Qwen2.5-VL processor with an image processor and a tokenizer")
    return processor


def _max_pixels(image_processor) -> int | None:
    size = getattr(image_processor, "size", None) or {}  # transformers 5 keeps max_pixels as size["longest_edge"]
    size = size if isinstance(size, dict) else vars(size)
    return getattr(image_processor, "max_pixels", None) or size.get("max_pixels") or size.get("longest_edge")


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
    with torch.random.fork_rng(devices=[]):  # its random init is overwritten: loading leaves the caller's seed alone
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

    `llm_lora` loads as the release's code loads it: every tensor of its shards, non-strictly, into the LoRA-wrapped
    model, so base weights stored there replace `llm/`'s before the LoRA merges on top. What it replaced is logged
    and kept as `pipe.release_load_report` (a `ReleaseLoadReport`).

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
    processor = _processor(folders["llm_processor"])
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
    # the projector's four tensors only: the LLM's own weights are already loaded (a 3B model is not read twice)
    projector = _projector(_read_tensors(folders["llm"], "llm", prefix="projector."), hidden,
                           transformer.config.joint_attention_dim, torch_dtype)

    loaded = _load_llm_lora(vlm, projector, _read_tensors(folders["llm_lora"], "llm_lora"), llm_lora_rank,
                            llm_lora_alpha)

    adapter_config = folders["dit_lora"] / "adapter_config.json"
    if not adapter_config.exists():
        raise ReleaseFormatError(f"slot 'dit_lora' ({folders['dit_lora']}) has no adapter_config.json")
    adapter = json.loads(adapter_config.read_text())
    dit_pairs = _lora_pairs(_read_tensors(folders["dit_lora"], "dit_lora"), "dit_lora", "base_model.model.",
                            ".lora_A.weight", ".lora_B.weight", adapter["r"])
    _apply(transformer, dit_pairs, adapter["lora_alpha"] / adapter["r"], "dit_lora", "")

    report = ReleaseLoadReport(slots={slot: folder.name for slot, folder in folders.items()},
                               processor_max_pixels=_max_pixels(processor.image_processor), **loaded)
    logger.info("%s", report)
    if report.ignored:
        logger.warning("slot 'llm_lora': %d key(s) match nothing in the release's model and were dropped, as its "
                       "non-strict load drops them (%s); if the release changed its layout, check them",
                       len(report.ignored), ", ".join(report.ignored[:5]))
    pipeline = UAEReconstructionPipeline.from_pipe(sd3, vlm=vlm, processor=processor, projector=projector,
                                                   conditioning_mode="embeddings")
    pipeline.release_load_report = report
    return pipeline
