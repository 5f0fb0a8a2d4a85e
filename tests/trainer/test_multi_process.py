"""Every stage on two CPU processes (gloo): weights stay identical across processes, rewards are gathered, logged
metrics are means over all processes, checkpoints hold every process's part."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent


def launch(stage: str, tiny_dir, out: Path, port: int) -> list[dict]:
    out.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(HERE / "two_process_stage.py"), stage, str(tiny_dir), str(out)],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1"),  # a crashing worker prints its stacks
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def assert_identical_trained_weights(out: Path) -> None:
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    initial = load_file(out / "initial0.safetensors")
    assert any(not torch.equal(rank0[key], initial[key]) for key in rank0)  # they trained, together


def step_logs(records: list[dict]) -> list[dict]:
    return [entry for entry in records[0]["log_history"] if "loss" in entry]


@pytest.mark.slow
@pytest.mark.parametrize("stage, port", [("understanding", 29533), ("generation", 29534), ("cold_start", 29535),
                                         ("pretrain", 29536), ("generation_nft", 29537)])
def test_two_processes_train_one_model(stage, port, tiny_dir, tmp_path):
    records = launch(stage, tiny_dir, tmp_path / stage, port)
    assert [record["world_size"] for record in records] == [2, 2]
    assert_identical_trained_weights(tmp_path / stage)
    run = tmp_path / stage / "run"  # one checkpoint, complete with both processes' RNG states, renamed into place
    assert sorted(path.name for path in run.iterdir() if "checkpoint" in path.name) == ["checkpoint-3"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {path.name for path in (run / "checkpoint-3").iterdir()}
    logs = step_logs(records)
    assert len(logs) == 3
    for step, logged in enumerate(logs):
        local = [record["local"][step] for record in records]
        if stage == "pretrain":  # its one metric (the caption-dropout rate) may well agree on both processes
            continue
        if stage != "cold_start":  # the logged reward is the mean over both processes' completions
            everyone = local[0]["rewards"] + local[1]["rewards"]
            assert logged["reward"] == pytest.approx(np.nanmean(everyone), abs=1e-5)
            assert np.nanmean(local[0]["rewards"]) != pytest.approx(np.nanmean(local[1]["rewards"]), abs=1e-6)
        if stage == "understanding":  # an extra reward of weight 0: 0 on process 0, 1 on process 1
            assert logged["rewards/rank_marker/mean"] == pytest.approx(0.5)
        else:  # the stage's own metrics are recorded per process and logged as their mean
            name = "semantic_similarity" if stage == "cold_start" else "reconstruction/clip"
            values = [entry["metrics"][name] for entry in local]
            assert values[0] != pytest.approx(values[1], abs=1e-6)
            assert logged[name] == pytest.approx(np.mean(values), abs=1e-6)
