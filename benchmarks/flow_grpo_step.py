"""Stage "generation" (Flow-GRPO) step-time split on the tiny twins, and the update cost of timestep_fraction.

    python benchmarks/flow_grpo_step.py [--steps 6] [--sampling-steps 10]

Runs the trainer twice in one process, with timestep_fraction 1.0 and 0.5 (same data, seeds and settings), and
prints the mean time per step of the rollout (captioning + SDE sampling + VAE decode), the reward (backbone
scoring + advantages) and the update (recomputed log-probs, loss, backward), then update(0.5) / update(1.0).
"""

import os
import statistics
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import benchmark_cli  # noqa: E402  (a sibling module: benchmarks run as scripts)
from uae_hf import FlowGRPOConfig, FlowGRPOTrainer, build_tiny_models, load_uae_pipeline  # noqa: E402
from uae_hf.sample_data import skimage_photos  # noqa: E402

PARTS = ("timing/rollout_s", "timing/reward_s", "timing/update_s")


def run(twins, fraction: float, steps: int, sampling_steps: int, output_dir: str) -> dict[str, float]:
    pipe = load_uae_pipeline(twins / "decoder", twins / "encoder", twins / "projector")
    args = FlowGRPOConfig(
        output_dir=output_dir, max_steps=steps + 1, per_device_train_batch_size=8,
        num_generations=4, max_completion_length=16, learning_rate=1e-3, logging_steps=1, report_to=[],
        use_cpu=True, bf16=False, seed=0, save_strategy="no", decoder_height=64, decoder_width=64,
        decoder_num_inference_steps=sampling_steps, decoder_guidance_scale=4.5, timestep_fraction=fraction,
        backbone_checkpoints={"clip": str(twins / "backbones" / "clip")}, log_reconstructions_steps=0, beta=0.04,
    )
    trainer = FlowGRPOTrainer(model=pipe.vlm, decoder=pipe, args=args, train_dataset=skimage_photos(64),
                              processing_class=pipe.processor)
    trainer.train()
    records = [record for record in trainer.state.log_history if PARTS[0] in record][1:]  # skip the warm-up step
    return {part: statistics.mean(record[part] for record in records) for part in PARTS}


def measure(steps: int = 6, sampling_steps: int = 10) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        twins = build_tiny_models(f"{folder}/twins")
        full = run(twins, 1.0, steps, sampling_steps, f"{folder}/full")
        half = run(twins, 0.5, steps, sampling_steps, f"{folder}/half")
    return {"fraction_1.0": full, "fraction_0.5": half, "threads": torch.get_num_threads(),
            "update_ratio": half["timing/update_s"] / full["timing/update_s"],
            "step_ratio": sum(half.values()) / sum(full.values())}


def report(figures: dict) -> None:
    full, half = figures["fraction_1.0"], figures["fraction_0.5"]
    print(f"{'part (s/step)':<18}{'fraction 1.0':>14}{'fraction 0.5':>14}")
    for part in PARTS:
        print(f"{part.split('/')[1][:-2]:<18}{full[part]:>14.3f}{half[part]:>14.3f}")
    print(f"{'total':<18}{sum(full.values()):>14.3f}{sum(half.values()):>14.3f}")
    print(f"update time, fraction 0.5 / 1.0: {figures['update_ratio']:.2f}  (step time: {figures['step_ratio']:.2f})")


if __name__ == "__main__":
    benchmark_cli.run(__doc__, measure, report, dict(steps=6, sampling_steps=10))
