"""Whole values of parameters that a training engine may shard: read them, write them, keep them.

Under DDP (or on one device) a parameter holds its whole value. FSDP2 turns it into a `DTensor` holding this process's
rows; DeepSpeed ZeRO-3 leaves it empty and keeps this process's partition in `param.ds_tensor`. Saving, the weight
copies (EMA, DiffusionNFT's old policy) and resuming need whole values on every process, so they go through these two
functions. Both are collective under FSDP2 and ZeRO-3: every process must call them, with the same parameters, in the
same order. One parameter is gathered at a time, so the extra memory is that of the largest one.
"""

import contextlib

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def _is_zero3_partitioned(parameter: torch.Tensor) -> bool:
    return hasattr(parameter, "ds_tensor")


@contextlib.contextmanager
def _zero3_gathered(parameter: torch.Tensor, modifier_rank: int | None):
    import deepspeed  # only reached when DeepSpeed partitioned the parameter

    with deepspeed.zero.GatheredParameters([parameter], modifier_rank=modifier_rank):
        yield


@torch.no_grad()
def full_value(parameter: torch.Tensor) -> torch.Tensor:
    """A detached copy of `parameter`'s whole value, on its device (gathered when an engine shards it)."""
    if isinstance(parameter, DTensor):
        return parameter.full_tensor().detach()
    if _is_zero3_partitioned(parameter):
        with _zero3_gathered(parameter, modifier_rank=None):
            return parameter.data.detach().clone()
    return parameter.detach().clone()


def full_values(parameters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`full_value` of each parameter, by name."""
    return {name: full_value(parameter) for name, parameter in parameters.items()}


@torch.no_grad()
def assign(parameter: torch.Tensor, value: torch.Tensor) -> None:
    """Set `parameter` to the whole `value` (the same on every process), in place: a sharded parameter keeps its
    sharding, and its optimizer keeps referring to it."""
    if isinstance(parameter, DTensor):
        local = distribute_tensor(value.to(parameter.device, parameter.dtype), parameter.device_mesh,
                                  parameter.placements, src_data_rank=None)  # each process slices its own rows
        _local(parameter).copy_(local.to_local())
    elif _is_zero3_partitioned(parameter):
        with _zero3_gathered(parameter, modifier_rank=0):  # re-partitioned from process 0's value on exit
            parameter.data.copy_(value.to(parameter.device, parameter.dtype))
    else:
        _local(parameter).copy_(value.to(parameter.device, parameter.dtype))


@contextlib.contextmanager
def kept(parameters: dict[str, torch.Tensor]):
    """Whatever the block writes into `parameters`, they hold their values of before it on exit (also on error).
    Without communication, except under ZeRO-3 (a parameter small enough to stay whole there computes from its whole
    value, not from its partition: both are put back)."""
    saved = {name: full_value(p) if _is_zero3_partitioned(p) else _local(p).clone() for name, p in parameters.items()}
    try:
        yield
    finally:
        for name, parameter in parameters.items():
            if _is_zero3_partitioned(parameter):
                assign(parameter, saved[name])
            else:
                with torch.no_grad():
                    _local(parameter).copy_(saved[name])


def _local(parameter: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter that is whole or a DTensor (FSDP2)."""
    return parameter.to_local() if isinstance(parameter, DTensor) else parameter.data


def trained_parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of `module` that train (`requires_grad`), by name."""
    return {name: parameter for name, parameter in module.named_parameters() if parameter.requires_grad}


@contextlib.contextmanager
def whole_model_loading():
    """Models loaded inside the block hold their whole weights even once DeepSpeed ZeRO-3 is configured (transformers
    partitions every model it loads while a ZeRO-3 config is live, and a frozen model that no engine prepares would
    never be gathered). The trained model is partitioned by the engine when the `Trainer` prepares it."""
    from transformers.integrations import deepspeed as hf_deepspeed

    live = hf_deepspeed._hf_deepspeed_config_weak_ref  # the config transformers consults when it loads
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        config = live() if live is not None else None
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)
