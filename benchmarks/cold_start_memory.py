"""Peak memory of one cold-start step with and without per-step checkpointing of the sampler (tiny twins, CPU).

    python benchmarks/cold_start_memory.py [--size 256] [--steps 10] [--batch 4]

Each setting runs in its own fresh process (peak RSS cannot be reset within one); the same step (projector + LLM
LoRA + DiT LoRA trainable, 10-step CFG sampler, CLIP loss) is measured in both, and the baseline process (models
loaded, no step) is subtracted so the ratio compares what the step itself holds. The DiT's own per-block
checkpointing is off in all three, to isolate the per-step checkpointing.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

CHILD = r"""
import os, resource, sys, json
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from uae_hf import UnifiedGRPOConfig, UnifiedGRPOTrainer, load_uae_pipeline
from uae_hf.sample_data import skimage_photos
twins, mode, size, steps, batch, out = sys.argv[1:7]
size, steps, batch = int(size), int(steps), int(batch)
pipe = load_uae_pipeline(f"{twins}/decoder", f"{twins}/encoder", f"{twins}/projector")
args = UnifiedGRPOConfig(stage="cold_start", output_dir=f"{out}/run", per_device_train_batch_size=batch,
                         report_to=[], use_cpu=True, bf16=False, decoder_height=size, decoder_width=size,
                         gradient_checkpointing=False,  # isolate the sampler-step checkpointing
                         decoder_num_inference_steps=steps, cold_start_checkpointing=(mode == "checkpointed"),
                         cold_start_trainable=["projector", "llm_lora", "dit_lora"],
                         backbone_checkpoints={"clip": f"{twins}/backbones/clip"})
data = skimage_photos(size).select(range(batch))
trainer = UnifiedGRPOTrainer(model=None, decoder=pipe, args=args, train_dataset=data)
rows = [data[i] for i in range(batch)]
if mode != "baseline":
    trainer.compute_loss(trainer.model, rows).backward()
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak(twins, mode, size, steps, batch, out) -> float:
    result = subprocess.run([sys.executable, "-c", CHILD, twins, mode, str(size), str(steps), str(batch), out],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--output", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    from uae_hf import build_tiny_models

    with tempfile.TemporaryDirectory() as folder:
        twins = str(build_tiny_models(f"{folder}/twins"))
        figures = {mode: peak(twins, mode, args.size, args.steps, args.batch, folder)
                   for mode in ("baseline", "plain", "checkpointed")}
    step = {mode: figures[mode] - figures["baseline"] for mode in ("plain", "checkpointed")}
    print(f"{'cold-start step':<28}{'peak RSS MB':>12}{'step MB':>10}")
    for mode in ("baseline", "plain", "checkpointed"):
        print(f"{mode:<28}{figures[mode]:>12.0f}{step.get(mode, 0.0):>10.0f}")
    print(f"step memory, checkpointed / plain: {step['checkpointed'] / step['plain']:.2f}")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"peak_rss_mb": figures, "step_mb": step, **vars(args)}, handle, indent=2)


if __name__ == "__main__":
    main()
