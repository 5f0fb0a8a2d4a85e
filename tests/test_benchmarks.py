"""The benchmark scripts stay runnable (figures themselves live in docs/performance.md, not in tests)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.slow
def test_gpu_real_size_script_runs_reduced_on_cpu(tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_real_size.py"), "--reduced", "--output",
                             str(tmp_path / "gpu.json")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    figures = json.loads((tmp_path / "gpu.json").read_text())
    for key in ("captions_per_s", "reconstructions_per_s", "understanding_step_s", "generation_step_s"):
        assert figures[key] > 0, key


def test_run_all_lists_every_benchmark_module():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import run_all
    finally:
        sys.path.remove(str(BENCHMARKS))
    scripts = {path.stem for path in BENCHMARKS.glob("*.py")} - {"run_all", "gpu_real_size", "benchmark_cli"}
    assert set(run_all.BENCHMARKS) == scripts
    assert all(callable(module.measure) and callable(module.report) for module in run_all.BENCHMARKS.values())
