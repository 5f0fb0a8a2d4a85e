"""[`WeightCopy`]: a copy of a module's trained weights that follows them at a rate: an EMA of the weights, or
DiffusionNFT's old policy."""

import contextlib

import torch


class WeightCopy:
    """A float copy of every trainable parameter of `module` (by name), blended towards the live weights on demand.

    `blend(module, decay)` sets `copy ← decay·copy + (1 - decay)·live`; `swapped_in(module)` runs the module with the
    copy in place of its weights (no gradients; the live weights are back on exit, also on error).
    """

    def __init__(self, module: torch.nn.Module):
        self.weights = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def blend(self, module: torch.nn.Module, decay: float) -> None:
        for name, parameter in module.named_parameters():
            if name in self.weights:
                self.weights[name].lerp_(parameter.detach().to(self.weights[name].dtype), 1 - decay)

    @contextlib.contextmanager
    def swapped_in(self, module: torch.nn.Module):
        """`module` computes with the copy inside the block. Compute anything that needs gradients through the live
        weights after the block, not before: the swap changes the tensors a saved graph would read."""
        parameters = {name: p for name, p in module.named_parameters() if name in self.weights}
        live = {name: p.data for name, p in parameters.items()}
        try:
            with torch.no_grad():
                for name, parameter in parameters.items():
                    parameter.data = self.weights[name].to(parameter.dtype)
                yield module
        finally:
            for name, parameter in parameters.items():
                parameter.data = live[name]
