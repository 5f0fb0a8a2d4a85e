"""[`WeightCopy`]: a copy of a module's trained weights that follows them at a rate: an EMA of the weights, or
DiffusionNFT's old policy."""

import contextlib

import torch

from .sharded_parameters import assign, full_value, kept, trained_parameters


class WeightCopy:
    """A copy of every trainable parameter of `module` (by name), blended towards the live weights on demand.

    `blend(module, decay)` sets `copy ← decay·copy + (1 - decay)·live`; `swapped_in(module)` runs the module with the
    copy in place of its weights (no gradients; the live weights are back on exit, also on error). The copy holds whole
    values, the same on every process, whether or not an engine (FSDP2, DeepSpeed ZeRO-3) shards the live weights; under
    those engines both methods are collective (every process calls them).
    """

    def __init__(self, module: torch.nn.Module):
        self.weights = {name: full_value(p) for name, p in trained_parameters(module).items()}

    @torch.no_grad()
    def blend(self, module: torch.nn.Module, decay: float) -> None:
        for name, parameter in trained_parameters(module).items():
            if name in self.weights:
                self.weights[name].lerp_(full_value(parameter).to(self.weights[name].dtype), 1 - decay)

    @contextlib.contextmanager
    def swapped_in(self, module: torch.nn.Module):
        """`module` computes with the copy inside the block. Compute anything that needs gradients through the live
        weights after the block, not before: the swap writes the tensors a saved graph would read."""
        parameters = {name: p for name, p in trained_parameters(module).items() if name in self.weights}
        with kept(parameters), torch.no_grad():
            for name, parameter in parameters.items():
                assign(parameter, self.weights[name])
            yield module
