"""Seeds: every random stream uae_hf draws is a `torch.Generator` seeded by one formula from the integers that name
it (the run's seed, the step, the process, what the stream is for, the item)."""

from collections.abc import Iterable

import torch


def stream_seed(*parts: int) -> int:
    """A 63-bit seed naming one random stream, e.g. `stream_seed(seed, step, process, purpose)`; distinct names give
    unrelated streams as long as every part but the first stays below 1,000,003."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % 2**63
    return value


def seeded_generators(seeds: Iterable[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per seed (one per image, so an item's randomness does not depend on its batch)."""
    return [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]
