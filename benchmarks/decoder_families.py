"""Each decoder family's sampling through `uae_hf`'s protocol against its stock diffusers pipeline, on its twin (CPU).

    python benchmarks/decoder_families.py [--captions 4] [--steps 8] [--size 64] [--repeats 3]

Per family, on the same captions, seeds, size, steps and guidance, interleaved and timed `--repeats` times (medians):
1. a Flow-GRPO rollout (captions encoded, SDE sampling with log-probs, VAE decode) ÷ the stock `__call__`;
                                                                                target <= 1.10
2. the reward's decoding (`DecoderFamily.generate`, the deterministic path) ÷ the stock `__call__`.   target <= 1.10
"""

import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402

import benchmark_cli  # noqa: E402  (a sibling module: benchmarks run as scripts)
from uae_hf import build_tiny_models  # noqa: E402
from uae_hf.decoders import decoder_family  # noqa: E402
from uae_hf.sampling import sample_trajectory  # noqa: E402
from uae_hf.seeding import seeded_generators  # noqa: E402

CAPTIONS = ["a red cup on a wooden table", "an astronaut next to a flag on the moon", "a cat asleep on a sofa",
            "a lighthouse on a cliff at dusk, waves below", "a bowl of oranges", "a bicycle leaning on a fence",
            "two dogs running on a beach", "a snowy mountain under a clear sky"]


def stock_kwargs(family, guidance_scale: float) -> dict:
    """The stock `__call__`'s arguments for what our `guidance_scale` means in that family."""
    if family.name == "Qwen-Image":  # true CFG against the family's negative prompt
        return {"true_cfg_scale": guidance_scale, "negative_prompt": family.default_negative_prompt}
    return {"guidance_scale": guidance_scale}


def time_family(pipe, captions: list[str], steps: int, size: int, repeats: int) -> dict:
    family = decoder_family(pipe)
    guidance = family.default_guidance_scale
    settings = dict(height=size, width=size, num_inference_steps=steps)

    def stock():
        pipe(prompt=captions, generator=seeded_generators(range(len(captions))), output_type="np",
             **settings, **stock_kwargs(family, guidance))

    def rollout():
        conditioning = family.encode_captions(captions, "text")
        latents = family.initial_noise(len(captions), size, size, seeded_generators(range(len(captions))), "cpu")
        with family.masked_attention():
            trajectory = sample_trajectory(family, conditioning, latents, steps, guidance, noise_level=0.7,
                                           generator=seeded_generators(range(100, 100 + len(captions))))
        family.decode(trajectory.latents[:, -1], "np")

    def reward_decoding():
        family.generate(captions, generator=seeded_generators(range(len(captions))), guidance_scale=guidance,
                        conditioning_mode="text", **settings)

    runs = {"stock": stock, "rollout": rollout, "reward_decoding": reward_decoding}
    seconds = {name: [] for name in runs}
    with torch.no_grad():
        for run in runs.values():  # warm-up
            run()
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return medians | {"guidance_scale": guidance, "rollout_over_stock": medians["rollout"] / medians["stock"],
                      "reward_over_stock": medians["reward_decoding"] / medians["stock"]}


def measure(captions: int = 4, steps: int = 8, size: int = 64, repeats: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        twins = build_tiny_models(f"{folder}/twins")
        folders = {"SD3": twins / "decoder"} | {path.name: path for path in sorted((twins / "decoders").iterdir())}
        families = {}
        for name, path in folders.items():
            pipe = DiffusionPipeline.from_pretrained(path)
            pipe.set_progress_bar_config(disable=True)
            families[decoder_family(pipe).name] = time_family(pipe, CAPTIONS[:captions], steps, size, repeats)
    return {"families": families, "threads": torch.get_num_threads(), "captions": captions, "steps": steps,
            "size": size, "worst_rollout_over_stock": max(f["rollout_over_stock"] for f in families.values()),
            "worst_reward_over_stock": max(f["reward_over_stock"] for f in families.values())}


def report(figures: dict) -> None:
    print(f"{figures['captions']} captions, {figures['steps']} steps, {figures['size']} px, "
          f"{figures['threads']} threads (medians, s)")
    print(f"{'family':<18}{'stock':>8}{'rollout':>9}{'reward':>8}{'rollout/stock':>15}{'reward/stock':>14}")
    for name, row in figures["families"].items():
        print(f"{name:<18}{row['stock']:>8.3f}{row['rollout']:>9.3f}{row['reward_decoding']:>8.3f}"
              f"{row['rollout_over_stock']:>15.2f}{row['reward_over_stock']:>14.2f}")


if __name__ == "__main__":
    benchmark_cli.run(__doc__, measure, report, {"captions": 4, "steps": 8, "size": 64, "repeats": 3})
