"""Shard a frozen model across processes for inference, so that what each process holds of it falls with their number.

FSDP2 (`fully_shard`) splits the model's weights at its own blocks (`_no_split_modules`); each block is gathered for
its forward and freed after it. That is a collective: every process must run the model the same number of times, as
the reconstruction reward does (each process decodes its own captions in the same number of batches).
"""

import torch
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method


def shard_for_inference(model: torch.nn.Module, mesh=None, methods: tuple[str, ...] = ()) -> None:
    """Shard the frozen `model` in place with FSDP2 over `mesh` (default: every process); idempotent. `methods`: the
    model's entry points other than `forward` (a VAE's `encode` / `decode`), which then gather its weights too."""
    if isinstance(model, FSDPModule):
        return
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"shard_for_inference shards frozen models only; {type(model).__name__} has trainable weights")
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    for method in methods:
        register_fsdp_forward_method(model, method)
