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
    for key in ("captions_per_s", "reconstructions_per_s", "understanding_step_s", "generation_step_s",
                "stock_reconstructions_per_s", "denoise_decode_per_s", "denoising_tflops_per_s"):
        assert figures[key] > 0, key
    # every model in the requested dtype (the default, bfloat16, also on CPU): nothing silently upcast
    assert {"vlm", "projector", "transformer", "vae", "text_encoder", "text_encoder_2"} <= set(figures["components"])
    for name, row in figures["components"].items():
        assert row["dtypes"] == ["bfloat16"] and row["parameters"] > 0, (name, row)
    # where the time goes: each phase measured, in a round trip and in a step of each training stage
    inner = {"caption_generation", "llm_conditioning", "denoising", "vae_decode", "backbone_scoring"}
    expected = {"round_trip_phases": inner, "understanding_phases": inner | {"rollout", "reward", "update", "backward",
                                                                            "optimizer_step"}}
    expected["generation_phases"] = expected["understanding_phases"] | {"dit_forward_with_grad"}
    for section, phases in expected.items():
        for phase in phases:
            assert figures[section][phase]["seconds"] > 0, (section, phase)
    assert figures["uae_vs_stock"] > 0 and figures["uae_vs_stock_denoise_decode"] > 0
    assert figures["denoising_mfu"] is None  # no peak to compare with on a CPU


def test_run_all_lists_every_benchmark_module():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import run_all
    finally:
        sys.path.remove(str(BENCHMARKS))
    scripts = {path.stem for path in BENCHMARKS.glob("*.py")} - {"run_all", "gpu_real_size", "benchmark_cli"}
    assert set(run_all.BENCHMARKS) == scripts
    assert all(callable(module.measure) and callable(module.report) for module in run_all.BENCHMARKS.values())
