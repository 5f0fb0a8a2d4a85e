"""Time to the one-line error for `uae-hf` argument mistakes, each in a fresh `uae-hf` process (target: 2 s or less
for the mistakes that need no model; docs/reliability.md, "Argument mistakes").

    python benchmarks/cli_argument_errors.py [--repeats 3] [--workdir /tmp/uae-cli-errors]

Builds the tiny twins and a UAE pipeline from them in `workdir` (once, not timed), then runs each mistake with
`HF_HUB_OFFLINE=1` and records the best wall-clock seconds of `repeats` runs, interpreter start-up included (what a
user waits for), the exit status and the last line of stderr. `uae-hf --help` is timed the same way for reference.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import benchmark_cli  # a sibling module: benchmarks run as scripts

TARGET_S = 2.0
RECIPE = Path(__file__).parents[1] / "examples" / "recipes" / "understanding_tiny.yaml"


def prepare(workdir: Path) -> dict[str, Path]:
    """The twins, a UAE pipeline, an image, an empty folder, a folder that is no pipeline, reconstructions that match
    no reference."""
    import PIL.Image

    from uae_hf import build_tiny_models, load_uae_pipeline

    twins = workdir / "twins"
    if not (twins / "decoder" / "model_index.json").is_file():
        build_tiny_models(twins)
    pipeline = workdir / "pipeline"
    if not (pipeline / "model_index.json").is_file():
        load_uae_pipeline(twins / "decoder", twins / "encoder", twins / "projector").save_pretrained(pipeline)
    images, empty, no_pipeline, unmatched = (workdir / name for name in ("images", "empty", "no-pipeline", "unmatched"))
    for folder in (images, empty, no_pipeline, unmatched):
        folder.mkdir(exist_ok=True)
    PIL.Image.new("RGB", (32, 32), (200, 80, 20)).save(images / "photo.png")
    PIL.Image.new("RGB", (32, 32), (20, 80, 200)).save(unmatched / "other.png")
    (no_pipeline / "notes.txt").write_text("not a pipeline\n")
    return {"twins": twins, "pipeline": pipeline, "image": images / "photo.png", "images": images, "empty": empty,
            "no_pipeline": no_pipeline, "unmatched": unmatched, "out": workdir / "out"}


def mistakes(paths: dict[str, Path]) -> dict[str, list[str]]:
    """Each mistake's `uae-hf` arguments."""
    image, pipeline, out = str(paths["image"]), str(paths["pipeline"]), ["--output-dir", str(paths["out"])]
    bench = ["bench", "--images-dir", str(paths["images"])]
    train = ["train", "--config", str(RECIPE), "--tiny_models_dir", str(paths["twins"]), "--output_dir",
             str(paths["out"] / "train")]
    return {
        "--help (reference)": ["--help"],
        "reconstruct: missing image": ["reconstruct", str(paths["images"] / "missing.png"), "--pipeline", pipeline, *out],
        "reconstruct: folder without model_index.json": ["reconstruct", image, "--pipeline", str(paths["no_pipeline"]),
                                                         *out],
        "reconstruct: plain SD3 folder, no --encoder": ["reconstruct", image, "--pipeline",
                                                        str(paths["twins"] / "decoder"), *out],
        "reconstruct: --batch-size 0": ["reconstruct", image, "--pipeline", pipeline, "--batch-size", "0", *out],
        "bench: empty --images-dir": ["bench", "--images-dir", str(paths["empty"]), "--pipeline", pipeline, *out],
        "bench: unknown backbone": [*bench, "--reconstructions", str(paths["unmatched"]), "--backbones", "clip+dino",
                                    *out],
        "bench: folder without model_index.json": [*bench, "--pipeline", str(paths["no_pipeline"]), *out],
        "bench: no reconstruction matches": [*bench, "--reconstructions", str(paths["unmatched"]), "--backbones", "clip",
                                             "--checkpoint", f"clip={paths['twins'] / 'backbones' / 'clip'}", *out],
        "app: folder without model_index.json": ["app", "--pipeline", str(paths["no_pipeline"])],
        "train: --max_steps 0": [*train, "--max_steps", "0"],
        "train: --per_device_train_batch_size -1": [*train, "--per_device_train_batch_size", "-1"],
    }


def run_once(argv: list[str], cwd: Path) -> tuple[float, int, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
    command = [str(Path(sys.executable).with_name("uae-hf")), *argv]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    lines = result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or [""]
    return seconds, result.returncode, lines[-1]


def measure(repeats: int = 3, workdir: str = "/tmp/uae-cli-errors", only: str = "") -> dict:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = prepare(workdir)
    rows = {}
    for name, argv in mistakes(paths).items():
        if only and only not in name:
            continue
        times = []
        for _ in range(repeats):
            shutil.rmtree(paths["out"], ignore_errors=True)
            seconds, status, last_line = run_once(argv, workdir)
            times.append(seconds)
        rows[name] = {"seconds": min(times), "status": status, "message": last_line}
    return {"repeats": repeats, "target_s": TARGET_S, "load_average": os.getloadavg(), "cpus": os.cpu_count(),
            "mistakes": rows}


def report(figures: dict) -> None:
    for name, row in figures["mistakes"].items():
        print(f"{name:<45}{row['seconds']:>7.2f} s  exit {row['status']}  {row['message'][:150]}")
    print(f"best of {figures['repeats']} runs each; {figures['cpus']} CPUs, load average {figures['load_average']}")


if __name__ == "__main__":
    benchmark_cli.run(__doc__, measure, report, dict(repeats=3, workdir="/tmp/uae-cli-errors", only=""))
