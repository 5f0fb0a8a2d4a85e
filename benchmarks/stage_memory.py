"""Peak memory of one training step of every stage, and of a cold-start step with and without per-step
checkpointing of the sampler (tiny twins, CPU).

    python benchmarks/stage_memory.py [--size 256] [--steps 10] [--batch 4]

Each measurement runs in its own fresh process: a thread samples the resident set size every millisecond during the
step, and the figure is its maximum minus the resident size just before the step (what the step itself holds;
the model loading before it does not count). The DiT's own per-block checkpointing is off everywhere, to isolate
the sampler's per-step checkpointing.
"""

import json
import subprocess
import sys
import tempfile

import benchmark_cli  # a sibling module: benchmarks run as scripts

CHILD = r"""
import json, os, sys, threading, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import uae_hf
from uae_hf import load_uae_pipeline
from uae_hf.sample_data import skimage_photos
twins, stage, mode, size, steps, batch, out = sys.argv[1:8]
size, steps, batch = int(size), int(steps), int(batch)
pipe = load_uae_pipeline(f"{twins}/decoder", f"{twins}/encoder", f"{twins}/projector")
pair, own = {
    "understanding": ("UnifiedGRPO", dict(num_generations=batch, max_completion_length=16)),
    "generation": ("FlowGRPO", dict(num_generations=batch, max_completion_length=16)),
    "generation_nft": ("DiffusionNFT", dict(num_generations=batch, max_completion_length=16)),
    "pretrain": ("DecoderPretraining", {}),
    "cold_start": ("ColdStart", dict(cold_start_checkpointing=(mode == "checkpointed"),
                                     cold_start_trainable=["projector", "llm_lora", "dit_lora"])),
}[stage]
args = getattr(uae_hf, pair + "Config")(
    output_dir=f"{out}/{stage}-{mode}", max_steps=1, per_device_train_batch_size=batch, report_to=[], use_cpu=True,
    bf16=False, activation_checkpointing=False, decoder_height=size, decoder_width=size,
    decoder_num_inference_steps=steps, backbone_checkpoints={"clip": f"{twins}/backbones/clip"},
    log_reconstructions_steps=0, save_strategy="no", logging_steps=1, **own,
)
model = pipe.vlm if stage != "understanding" else pipe.vlm.__class__.from_pretrained(f"{twins}/encoder")
trainer = getattr(uae_hf, pair + "Trainer")(model=model, decoder=pipe, args=args,
                                            train_dataset=skimage_photos(size).select(range(batch)),
                                            processing_class=pipe.processor)
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * page
before, peak, done = rss(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
sampler = threading.Thread(target=sample)
sampler.start()
trainer.train()
done.set()
sampler.join()
print(json.dumps({"step_mb": (max(peak[0], rss()) - before) / 2**20}))
"""

RUNS = [("understanding", "plain"), ("generation", "plain"), ("pretrain", "plain"), ("cold_start", "plain"),
        ("cold_start", "checkpointed")]


def step_memory(twins, stage, mode, size, steps, batch, out) -> float:
    result = subprocess.run([sys.executable, "-c", CHILD, twins, stage, mode, str(size), str(steps), str(batch), out],
                            capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{stage}/{mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["step_mb"]


def measure(size: int = 256, steps: int = 10, batch: int = 4) -> dict:
    from uae_hf import build_tiny_models

    with tempfile.TemporaryDirectory() as folder:
        twins = str(build_tiny_models(f"{folder}/twins"))
        step_mb = {f"{stage}/{mode}": step_memory(twins, stage, mode, size, steps, batch, folder)
                   for stage, mode in RUNS}
    return {"step_mb": step_mb, "size": size, "steps": steps, "batch": batch,
            "cold_start_checkpointed_over_plain": step_mb["cold_start/checkpointed"] / step_mb["cold_start/plain"]}


def report(figures: dict) -> None:
    print(f"peak memory a step adds to the loaded models (RSS, {figures['size']} px, {figures['steps']} sampler "
          f"steps, batch {figures['batch']}):")
    for name, value in figures["step_mb"].items():
        print(f"  {name:<26}{value:>8.0f} MB")
    print(f"cold-start step memory, checkpointed / plain: {figures['cold_start_checkpointed_over_plain']:.2f}")


if __name__ == "__main__":
    benchmark_cli.run(__doc__, measure, report, dict(size=256, steps=10, batch=4))
