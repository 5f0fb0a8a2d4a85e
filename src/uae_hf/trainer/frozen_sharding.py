"""Shard a frozen model across processes for inference, so that what each process holds of it falls with their number.

FSDP2 (`fully_shard`) splits the model's weights at its own blocks (`_no_split_modules`); each block is gathered for
its forward and freed after it. That is a collective: every process must run the model the same number of times, as
the trainers do (each process captions and decodes its own micro-batch, of the same size on every process; captions
are generated with `synced_gpus`, so a process whose captions end early keeps stepping with the others).
"""

import torch
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

FROZEN_DECODER_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "vlm", "projector")


def block_classes(model: torch.nn.Module) -> list[str]:
    """The classes of `model._no_split_modules` that occur in it: the blocks FSDP shards one by one. A VLM gathers its
    sub-models' lists, which may name a layer its config leaves out (Gemma 3's SigLIP tower has no pooling head, yet
    `SiglipMultiheadAttentionPoolingHead` is listed), and accelerate refuses an auto-wrap class the model lacks."""
    present = {type(module).__name__ for module in model.modules()}
    return sorted(name for name in getattr(model, "_no_split_modules", None) or [] if name in present)


def decoder_models(decoder) -> dict[str, torch.nn.Module | None]:
    """A UAE pipeline's models that the trainers run frozen, by name (those the stage trains are skipped where they
    are met)."""
    return {name: getattr(decoder, name, None) for name in FROZEN_DECODER_PARTS}


def shard_for_inference(model: torch.nn.Module, mesh=None, methods: tuple[str, ...] = ()) -> None:
    """Shard the frozen `model` in place with FSDP2 over `mesh` (default: every process); idempotent. `methods`: the
    model's entry points other than `forward` (a VAE's `encode` / `decode`), which then gather its weights too."""
    if isinstance(model, FSDPModule):
        return
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"shard_for_inference shards frozen models only; {type(model).__name__} has trainable weights")
    blocks = set(block_classes(model))
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, reshard_after_forward=True)
    # Library code runs parts of a model outside its forward: `generate` encodes images with the vision tower alone,
    # a VLM embeds tokens before its language model runs. Each such part gathers its own weights: the token embeddings
    # (one group with the output head, which may be tied to them), and every sub-model's own layers outside its blocks
    # (the sub-models stay of their class: transformers finds what their forward records by class).
    if isinstance(model, PreTrainedModel):
        embeddings = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
        _shard_each([_with_tied_modules(model, embeddings)], mesh)
        for sub_model in reversed([m for m in model.modules() if isinstance(m, PreTrainedModel)][1:]):
            _shard_each([[child] for child in sub_model.children()
                         if not isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict))], mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    # FSDP2 takes the first unit to run as its root; a part run alone first (the vision tower) would be taken for it,
    # and the whole model's first forward would then fail. Make the whole model the root now (torch has no public call).
    model._get_fsdp_state()._lazy_init()
    for method in methods:
        register_fsdp_forward_method(model, method)


def _with_tied_modules(model: torch.nn.Module, group: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """`group` and every other module of `model` that holds one of its weights (tied weights, e.g. T5's
    `encoder.embed_tokens` and `shared`): FSDP2 must shard a weight in one unit with every module that holds it."""
    held = {id(p) for module in group for p in module.parameters()}
    tied = [module for module in model.modules() if all(module is not member for member in group)
            and any(id(p) in held for p in module.parameters(recurse=False))]
    return group + tied


def _shard_each(groups: list[list[torch.nn.Module]], mesh) -> None:
    """`fully_shard` each group of modules as one unit, leaving out weights a unit already holds."""
    for group in groups:
        group = [module for module in group if any(not isinstance(p, DTensor) for p in module.parameters())]
        if group:
            fully_shard(group, mesh=mesh, reshard_after_forward=True)


def fsdp_mesh(accelerator):
    """The device mesh over which accelerate's FSDP2 shards the trained model (`None`: every process)."""
    mesh = accelerator.torch_device_mesh
    if mesh is not None:
        mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    return mesh


def shard_frozen_models(models: dict[str, torch.nn.Module | None], accelerator, trained: torch.nn.Module) -> None:
    """Under FSDP2 on several processes, shard for inference each of `models` (name → frozen model; the VAE named
    "vae") that shares no weight with `trained`, which the engine shards itself."""
    if not (accelerator.is_fsdp2 and accelerator.num_processes > 1):
        return
    mesh, engine_owned = fsdp_mesh(accelerator), {id(p) for p in trained.parameters()}
    for name, model in models.items():
        if isinstance(model, torch.nn.Module) and not any(id(p) in engine_owned for p in model.parameters()):
            shard_for_inference(model, mesh, methods=("encode", "decode") if name == "vae" else ())
