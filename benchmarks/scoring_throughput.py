"""Unified-Bench scoring throughput: batched + cached scorer vs a one-pair-at-a-time loop like the official one.

    python benchmarks/scoring_throughput.py [--pairs 32] [--batch-size 32]

Both score the same (reconstruction, reference) pairs with the paper's four backbones (tiny twins, CPU) in one
process. The loop embeds both images of every pair separately, as the official scorer does; ours embeds in batches
and serves references from the cache (cold: first pass; warm: a reference scored again, as in training rewards).
"""

import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import PIL.Image  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from skimage import data  # noqa: E402

import benchmark_cli  # noqa: E402  (a sibling module: benchmarks run as scripts)
from uae_hf import PAPER_BACKBONES, ImageSimilarity  # noqa: E402
from uae_hf.tiny_models import build_tiny_backbones  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "immunohistochemistry", "hubble_deep_field")


@torch.no_grad()
def one_pair_at_a_time(similarity: ImageSimilarity, predictions, references) -> dict[str, list[float]]:
    scores = {name: [] for name in similarity.embedders}
    for prediction, reference in zip(predictions, references):
        for name, embedder in similarity.embedders.items():
            pair = []
            for image in (reference, prediction):
                pixels = embedder.processor(images=[image], return_tensors="pt")["pixel_values"]
                pair.append(getattr(embedder.model(pixel_values=pixels), embedder.backbone.output))
            scores[name].append(float(F.cosine_similarity(pair[0], pair[1]).item()))
    return scores


def timed(function, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def measure(pairs: int = 32, batch_size: int = 32, repeats: int = 3) -> dict:
    photos = [PIL.Image.fromarray(getattr(data, name)()).convert("RGB").resize((256, 256)) for name in PHOTOS]
    references = [photos[i % len(photos)] for i in range(pairs)]
    predictions = [photos[(i + 1) % len(photos)].rotate(5 * (i + 1)) for i in range(pairs)]
    with tempfile.TemporaryDirectory() as folder:
        build_tiny_backbones(folder)
        checkpoints = {name: os.path.join(folder, name) for name in PAPER_BACKBONES}
        similarity = ImageSimilarity(PAPER_BACKBONES, checkpoints, batch_size=batch_size)

    def batched_cold():
        for embedder in similarity.embedders.values():
            embedder._reference_cache.clear()
        return similarity.scores(predictions, references)

    similarity.scores(predictions[:2], references[:2])  # warm-up
    loop_s, loop_scores = timed(lambda: one_pair_at_a_time(similarity, predictions, references), repeats)
    cold_s, cold_scores = timed(batched_cold, repeats)
    warm_s, _ = timed(lambda: similarity.scores(predictions, references), repeats)
    difference = max(abs(a - b) for name in loop_scores for a, b in zip(loop_scores[name], cold_scores[name].tolist()))
    return {"pairs": pairs, "backbones": list(PAPER_BACKBONES), "threads": torch.get_num_threads(),
            "loop_pairs_per_s": pairs / loop_s, "batched_cold_pairs_per_s": pairs / cold_s,
            "batched_warm_pairs_per_s": pairs / warm_s, "cold_over_loop": loop_s / cold_s,
            "warm_over_loop": loop_s / warm_s, "max_score_difference": difference}


def report(figures: dict) -> None:
    print(f"{'scorer':<28}{'pairs/s':>10}{'vs loop':>10}")
    print(f"{'one pair at a time':<28}{figures['loop_pairs_per_s']:>10.1f}{1.0:>9.2f}x")
    print(f"{'batched, cold cache':<28}{figures['batched_cold_pairs_per_s']:>10.1f}{figures['cold_over_loop']:>9.2f}x")
    print(f"{'batched, warm cache':<28}{figures['batched_warm_pairs_per_s']:>10.1f}{figures['warm_over_loop']:>9.2f}x")
    print(f"largest per-pair score difference between the two: {figures['max_score_difference']:.2e}")


if __name__ == "__main__":
    benchmark_cli.run(__doc__, measure, report, dict(pairs=32, batch_size=32, repeats=3))
