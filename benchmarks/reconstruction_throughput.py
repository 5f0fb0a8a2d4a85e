"""Round-trip throughput of UAEReconstructionPipeline on the tiny twins: batch 1 vs batch 8, side by side.

    python benchmarks/reconstruction_throughput.py [--images 16] [--steps 10] [--max-new-tokens 32]

Prints images/s for each batch size and their ratio. Both use the same images, seeds and settings in one process.
"""

import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import PIL.Image  # noqa: E402
import torch  # noqa: E402
from skimage import data  # noqa: E402

import benchmark_cli  # noqa: E402  (a sibling module: benchmarks run as scripts)
from uae_hf import build_tiny_models, load_uae_pipeline  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "immunohistochemistry", "hubble_deep_field")


def images_per_second(pipe, images, batch_size, repeats, **kwargs) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for first in range(0, len(images), batch_size):
            batch = images[first : first + batch_size]
            generators = [torch.Generator().manual_seed(first + i) for i in range(len(batch))]
            torch.manual_seed(0)
            pipe(image=batch, generator=generators, **kwargs)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def measure(images: int = 16, steps: int = 10, max_new_tokens: int = 32, repeats: int = 3) -> dict:
    photos = [PIL.Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]
    batch = [photos[i % len(photos)] for i in range(images)]
    kwargs = dict(num_inference_steps=steps, max_new_tokens=max_new_tokens, output_type="np")
    with tempfile.TemporaryDirectory() as folder:
        twins = build_tiny_models(folder)
        pipe = load_uae_pipeline(twins / "decoder", twins / "encoder", twins / "projector")
    pipe.set_progress_bar_config(disable=True)
    images_per_second(pipe, batch[:2], 2, 1, **kwargs)  # warm-up
    single = images_per_second(pipe, batch, 1, repeats, **kwargs)
    batched = images_per_second(pipe, batch, 8, repeats, **kwargs)
    return {"images": images, "steps": steps, "max_new_tokens": max_new_tokens, "threads": torch.get_num_threads(),
            "batch_1_images_per_s": single, "batch_8_images_per_s": batched, "batch_8_over_batch_1": batched / single}


def report(figures: dict) -> None:
    print(f"{'setting':<12}{'images/s':>10}")
    print(f"{'batch 1':<12}{figures['batch_1_images_per_s']:>10.2f}")
    print(f"{'batch 8':<12}{figures['batch_8_images_per_s']:>10.2f}")
    print(f"ratio batch 8 / batch 1: {figures['batch_8_over_batch_1']:.2f}x")


if __name__ == "__main__":
    benchmark_cli.run(__doc__, measure, report, dict(images=16, steps=10, max_new_tokens=32, repeats=3))
