"""Start-up time: `import uae_hf` and `uae-hf --help`, each in a fresh interpreter (target: 3 s or less).

    python benchmarks/import_time.py [--repeats 5]

Each figure is the best of `repeats` wall-clock runs of a new process, interpreter start-up included (what a user
waits for); a bare interpreter is timed the same way for reference. The library imports behind the public names
(torch, diffusers, TRL, evaluate) happen on first use, not here.
"""

import os
import subprocess
import sys
import time

import benchmark_cli  # a sibling module: benchmarks run as scripts

COMMANDS = {
    "python": "pass",
    "import uae_hf": "import uae_hf",
    # what the `uae-hf` console script runs
    "uae-hf --help": "import sys; from uae_hf.cli import main; sys.argv[0] = 'uae-hf'; main(['--help'])",
}
TARGET_S = 3.0


def best_time(code: str, repeats: int) -> float:
    """Fastest of `repeats` runs of `python -c code` in a fresh process, in seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return min(times)


def measure(repeats: int = 5) -> dict:
    figures = {name: best_time(code, repeats) for name, code in COMMANDS.items()}
    return {"repeats": repeats, "target_s": TARGET_S, "seconds": figures}


def report(figures: dict) -> None:
    print(f"{'fresh process':<20}{'best s':>10}{'target':>10}")
    for name, seconds in figures["seconds"].items():
        target = "" if name == "python" else f"<={figures['target_s']:g}"
        print(f"{name:<20}{seconds:>10.2f}{target:>10}")
    print(f"best of {figures['repeats']} runs each")


if __name__ == "__main__":
    benchmark_cli.run(__doc__, measure, report, dict(repeats=5))
