"""Stage 3 objectives side by side: a Flow-GRPO step and a DiffusionNFT step with the same settings (tiny twins, CPU).

    python benchmarks/decoder_rl_step.py [--steps 6] [--sampling-steps 10] [--batch 8] [--size 64]

Both trainers run in one process on the same data, seeds, group size (4), resolution, sampler steps and trained
steps (the first 9 of 10); each objective keeps its own defaults otherwise (Flow-GRPO: SDE rollouts with CFG, log-prob
ratio updates; DiffusionNFT: unguided ODE rollouts, forward-process updates against its old policy, plus the reference
term). Prints the mean seconds per image of the rollout, the reward and the update, then the peak memory a step adds
per image (each objective in a fresh process, as `stage_memory.py` measures it), and DiffusionNFT / Flow-GRPO.
"""

import os
import statistics
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import benchmark_cli  # noqa: E402  (sibling modules: benchmarks run as scripts)
import stage_memory  # noqa: E402
from uae_hf import build_tiny_models, load_uae_pipeline  # noqa: E402
from uae_hf.trainer import TRAINERS  # noqa: E402
from uae_hf.sample_data import skimage_photos  # noqa: E402

PARTS = ("timing/rollout_s", "timing/reward_s", "timing/update_s")
OBJECTIVES = {"Flow-GRPO": "generation", "DiffusionNFT": "generation_nft"}


def seconds_per_image(twins, stage: str, steps: int, sampling_steps: int, batch: int, size: int, out: str) -> dict:
    config_class, trainer_class = TRAINERS[stage]
    pipe = load_uae_pipeline(twins / "decoder", twins / "encoder", twins / "projector")
    args = config_class(
        output_dir=out, max_steps=steps + 1, per_device_train_batch_size=batch, num_generations=4,
        max_completion_length=16, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, bf16=False, seed=0,
        save_strategy="no", decoder_height=size, decoder_width=size, decoder_num_inference_steps=sampling_steps,
        timestep_fraction=0.99, backbone_checkpoints={"clip": str(twins / "backbones" / "clip")},
        log_reconstructions_steps=0,
    )
    trainer = trainer_class(model=pipe.vlm, decoder=pipe, args=args, train_dataset=skimage_photos(size),
                            processing_class=pipe.processor)
    trainer.train()
    records = [record for record in trainer.state.log_history if PARTS[0] in record][1:]  # skip the warm-up step
    return {part: statistics.mean(record[part] for record in records) / batch for part in PARTS}


def measure(steps: int = 6, sampling_steps: int = 10, batch: int = 8, size: int = 64) -> dict:
    figures = {"threads": torch.get_num_threads(), "batch": batch, "size": size, "sampling_steps": sampling_steps}
    with tempfile.TemporaryDirectory() as folder:
        twins = build_tiny_models(f"{folder}/twins")
        for name, stage in OBJECTIVES.items():
            times = seconds_per_image(twins, stage, steps, sampling_steps, batch, size, f"{folder}/{stage}")
            memory = stage_memory.step_memory(str(twins), stage, "plain", size, sampling_steps, batch, folder)
            figures[name] = times | {"total_s": sum(times.values()), "step_mb": memory / batch}
    flow, nft = figures["Flow-GRPO"], figures["DiffusionNFT"]
    figures["nft_over_flow_grpo_time"] = nft["total_s"] / flow["total_s"]
    figures["nft_over_flow_grpo_memory"] = nft["step_mb"] / flow["step_mb"]
    return figures


def report(figures: dict) -> None:
    print(f"per image ({figures['size']} px, {figures['sampling_steps']} sampler steps, batch {figures['batch']}, "
          f"{figures['threads']} threads)")
    print(f"{'':<22}{'Flow-GRPO':>12}{'DiffusionNFT':>14}")
    for part in PARTS:
        label = part.split("/")[1][:-2] + " (s)"
        print(f"{label:<22}{figures['Flow-GRPO'][part]:>12.4f}{figures['DiffusionNFT'][part]:>14.4f}")
    print(f"{'step (s)':<22}{figures['Flow-GRPO']['total_s']:>12.4f}{figures['DiffusionNFT']['total_s']:>14.4f}")
    print(f"{'step memory (MB)':<22}{figures['Flow-GRPO']['step_mb']:>12.1f}{figures['DiffusionNFT']['step_mb']:>14.1f}")
    print(f"DiffusionNFT / Flow-GRPO: time {figures['nft_over_flow_grpo_time']:.2f}, "
          f"memory {figures['nft_over_flow_grpo_memory']:.2f}")


if __name__ == "__main__":
    benchmark_cli.run(__doc__, measure, report, dict(steps=6, sampling_steps=10, batch=8, size=64))
