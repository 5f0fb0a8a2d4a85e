"""Every stage on two CPU processes (gloo) under `accelerate launch` with each accelerate config we ship: DDP
(`multi_gpu.yaml`), FSDP2 (`fsdp.yaml`), DeepSpeed ZeRO-2 and ZeRO-3. Weights stay identical across processes, each
training step is one optimizer step, rewards are gathered, logged metrics are means over all processes, checkpoints
hold every process's part, the saved artefacts load without the engine, and the sharding engines train what DDP
trains."""

import json
import os
import subprocess
import sys
from itertools import count
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration

from uae_hf import UAEProjector, load_uae_pipeline
from uae_hf.trainer.decoder_trainer import LORA_WEIGHT_NAME, RESUME_STATE_NAME

HERE = Path(__file__).parent
SHIPPED = HERE.parents[1] / "examples" / "accelerate"
STAGES = ["understanding", "generation", "generation_nft", "pretrain", "cold_start"]
# engine → (shipped config, the distributed type accelerate must report: proof that the engine, not DDP, ran)
ENGINES = {
    "ddp": ("multi_gpu.yaml", "MULTI_CPU"),
    "fsdp2": ("fsdp.yaml", "FSDP"),
    "zero2": ("deepspeed_zero2.yaml", "DEEPSPEED"),
    "zero3": ("deepspeed_zero3.yaml", "DEEPSPEED"),
}
TRAINING_STEPS = 3  # two_process_stage.py's max_steps
# ‖Δ_engine - Δ_DDP‖ / ‖Δ_DDP‖ allowed, from the spread measured over FSDP2, ZeRO-2 and ZeRO-3 in two full runs on this
# machine's own kernels (AVX-512) and one under ATEN_CPU_CAPABILITY=avx2 (2026-12-03): pre-training and cold start 0 to
# 2.1e-5, Flow-GRPO ≤ 0.009, DiffusionNFT ≤ 0.004 (sums in another order). GRPO 1.3e-5 to 2.2e-4 under AVX-512, AVX2
# (ATen, oneDNN and MKL capped) and default kernels (2026-12-04), with the exact extra reward two_process_stage.py
# gives it; from the decoder's rewards alone it was 0.05-0.41 (a group's rewards agree to ~5e-5, the engines' to ~1e-6).
UPDATE_TOLERANCE = {"understanding": 2e-3, "generation": 0.02, "generation_nft": 0.02, "pretrain": 2e-4,
                    "cold_start": 2e-4}
# The frozen decoder's rewards of the same captions under an engine and under DDP: ≤ 3.8e-6 apart, measured as above.
FROZEN_DECODER_REWARD_TOLERANCE = 5e-5
PORTS = count(29610)


def cpu_config(engine: str, folder: Path) -> Path:
    """The shipped config of `engine` for 2 CPU processes: 2 processes, full precision (the twins train in fp32 here)
    unless `engine` ends in "-bf16" (the shipped bf16), and DDP with `use_cpu` (accelerate's own CPU DDP); everything
    else as shipped."""
    engine, _, precision = engine.partition("-")
    config = yaml.safe_load((SHIPPED / ENGINES[engine][0]).read_text())
    config |= {"num_processes": 2, "use_cpu": engine == "ddp"} | ({} if precision else {"mixed_precision": "no"})
    config.pop("gpu_ids", None)
    path = folder / f"{engine}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(stage: str, engine: str, tiny_dir, out: Path, *extra: str) -> list[dict]:
    out.mkdir(parents=True)
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cpu_config(engine, out)),
         "--main_process_port", str(next(PORTS)), str(HERE / "two_process_stage.py"), stage, str(tiny_dir), str(out),
         engine, *extra],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1",  # a crashing worker prints its stacks
                 PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    """`runs(stage, engine)`: the output folder and records of that two-process run (each run once per module)."""
    done = {}

    def run(stage: str, engine: str) -> tuple[Path, list[dict]]:
        if (stage, engine) not in done:
            out = tmp_path_factory.mktemp(f"{stage}-{engine}") / "records"
            done[stage, engine] = out, launch(stage, engine, tiny_dir, out)
        return done[stage, engine]

    return run


def assert_identical_trained_weights(out: Path) -> dict[str, torch.Tensor]:
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and len(rank0) > 0
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    initial = load_file(out / "initial0.safetensors")
    assert any(not torch.equal(rank0[key], initial[key]) for key in rank0)  # they trained, together
    return rank0


def step_logs(records: list[dict]) -> list[dict]:
    return [entry for entry in records[0]["log_history"] if "loss" in entry]


def lora_parameters(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + name: p.detach() for name, p in module.named_parameters() if "lora_" in name}


def reloaded_weights(stage: str, checkpoint: Path, tiny_dir) -> dict[str, torch.Tensor]:
    """The trained weights as the checkpoint's artefacts give them back through their own loaders (PEFT, diffusers,
    `UAEProjector`), with no engine, named as the trainer's model names its parameters."""
    if stage == "understanding":
        base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "encoder")
        return lora_parameters(PeftModel.from_pretrained(base, checkpoint))
    pipe = load_uae_pipeline(tiny_dir / "decoder", tiny_dir / "encoder", tiny_dir / "projector")
    wrapped = stage in ("pretrain", "cold_start")  # their model holds the parts as submodules
    weights = {}
    if (checkpoint / "projector").is_dir():
        projector = UAEProjector.from_pretrained(checkpoint / "projector")
        weights |= {f"projector.{name}": p.detach() for name, p in projector.named_parameters()}
    if (checkpoint / LORA_WEIGHT_NAME).is_file():
        pipe.load_lora_weights(checkpoint, weight_name=LORA_WEIGHT_NAME, adapter_name="default")
        weights |= lora_parameters(pipe.transformer, "transformer." if wrapped else "")
    if (checkpoint / "encoder_adapter").is_dir():
        pipe.load_encoder_adapter(str(checkpoint / "encoder_adapter"))
        weights |= lora_parameters(pipe.vlm, "vlm.")
    return weights


def saved_weights(stage: str, checkpoint: Path, final: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the checkpoint's artefacts must hold: the final weights, or their EMA where the stage keeps one (its resume
    state holds both, whole)."""
    resume_state = load_file(checkpoint / RESUME_STATE_NAME) if stage != "understanding" else {}
    assert all(torch.equal(resume_state[name], final[name]) for name in resume_state if name in final)
    ema = {name.removeprefix("ema."): value for name, value in resume_state.items() if name.startswith("ema.")}
    assert bool(ema) == stage.startswith("generation")  # Flow-GRPO's set by two_process_stage.py, DiffusionNFT's default
    return ema or final


def update_difference(out: Path, reference: Path) -> float:
    """‖Δ - Δ_ref‖ / ‖Δ_ref‖ over every trained weight, Δ being what training changed."""
    initial, final, final_ref = (load_file(path) for path in
                                 (out / "initial0.safetensors", out / "rank0.safetensors", reference / "rank0.safetensors"))
    delta = torch.cat([(final[k] - initial[k]).flatten() for k in sorted(initial)])
    delta_ref = torch.cat([(final_ref[k] - initial[k]).flatten() for k in sorted(initial)])
    return float((delta - delta_ref).norm() / delta_ref.norm())


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_train_one_model(stage, runs):
    out, records = runs(stage, "ddp")
    assert [record["world_size"] for record in records] == [2, 2]
    assert [record["optimizer_steps"] for record in records] == [TRAINING_STEPS] * 2
    assert_identical_trained_weights(out)
    run = out / "run"  # checkpoints complete with both processes' RNG states, renamed into place
    assert sorted(path.name for path in run.iterdir() if "checkpoint" in path.name) == ["checkpoint-2", "checkpoint-3"]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {path.name for path in (run / "checkpoint-3").iterdir()}
    logs = step_logs(records)
    assert len(logs) == 3
    for step, logged in enumerate(logs):
        local = [record["local"][step] for record in records]
        if stage == "pretrain":  # its one metric (the caption-dropout rate) may well agree on both processes
            continue
        if stage != "cold_start":  # the logged reward is the mean over both processes' completions
            everyone = local[0]["rewards"] + local[1]["rewards"]
            logged_reward = logged["rewards/reconstruction/mean" if stage == "understanding" else "reward"]
            assert logged_reward == pytest.approx(np.nanmean(everyone), abs=1e-5)
            assert np.nanmean(local[0]["rewards"]) != pytest.approx(np.nanmean(local[1]["rewards"]), abs=1e-6)
        if stage == "understanding":  # an extra reward of weight 0: 0 on process 0, 1 on process 1
            assert logged["rewards/rank_marker/mean"] == pytest.approx(0.5)
        else:  # the stage's own metrics are recorded per process and logged as their mean
            name = "semantic_similarity" if stage == "cold_start" else "reconstruction/clip"
            values = [entry["metrics"][name] for entry in local]
            assert values[0] != pytest.approx(values[1], abs=1e-6)
            assert logged[name] == pytest.approx(np.mean(values), abs=1e-6)


@pytest.mark.slow
@pytest.mark.outcome  # its bounds on the difference from DDP are rounding that kernels move
@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
@pytest.mark.parametrize("stage", STAGES)
def test_sharding_engines_train_as_ddp_does(stage, engine, runs, tiny_dir):
    out, records = runs(stage, engine)
    assert [record["distributed_type"] for record in records] == [f"DistributedType.{ENGINES[engine][1]}"] * 2
    # one optimizer step per training step, however many backward passes a step takes (stage 3: one per timestep)
    assert [record["optimizer_steps"] for record in records] == [TRAINING_STEPS] * 2
    assert len(step_logs(records)) == TRAINING_STEPS
    final = assert_identical_trained_weights(out)  # gathered whole on each process: the ranks agree
    # under FSDP2 every frozen model (encoder, decoder parts) is sharded for inference too (shard_frozen_models)
    for record in records:
        frozen = record["frozen_models"]
        assert "vae" in frozen["sharded" if engine == "fsdp2" else "whole"]
        assert frozen["whole" if engine == "fsdp2" else "sharded"] == []
        if stage in ("generation", "generation_nft", "pretrain"):  # they caption / read captions with the encoder
            assert "encoder" in frozen["sharded" if engine == "fsdp2" else "whole"]

    checkpoint = out / "run" / "checkpoint-3"
    assert checkpoint.is_dir() and not any(path.name.startswith("tmp-") for path in (out / "run").iterdir())
    saved = saved_weights(stage, checkpoint, final)
    reloaded = reloaded_weights(stage, checkpoint, tiny_dir)
    assert reloaded.keys() == final.keys()
    assert all(torch.equal(reloaded[name], saved[name]) for name in final)  # whole tensors, written once

    # the same training as DDP: what training changed differs from DDP's by at most UPDATE_TOLERANCE of it
    ddp_out, ddp_records = runs(stage, "ddp")
    assert update_difference(out, ddp_out) < UPDATE_TOLERANCE[stage]
    if stage == "understanding":  # the frozen decoder scores each process's captions as it does under DDP
        for record, ddp_record in zip(records, ddp_records):
            for step, ddp_step in zip(record["local"], ddp_record["local"], strict=True):
                assert step["rewards"] == pytest.approx(ddp_step["rewards"], abs=FROZEN_DECODER_REWARD_TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("stage", STAGES)
def test_engines_resume_exactly(stage, engine, runs, tiny_dir):
    """Resumed from checkpoint 2 of 3, a run ends where the uninterrupted one did, bit for bit: the trained weights
    and their copies (EMA, old policy), on both processes."""
    out, _ = runs(stage, engine)
    resumed = out.parent / "resumed"
    records = launch(stage, engine, tiny_dir, resumed, str(out / "run" / "checkpoint-2"))
    assert [record["optimizer_steps"] for record in records] == [1, 1]  # the one step left
    final, resumed_final = load_file(out / "rank0.safetensors"), assert_identical_trained_weights(resumed)
    assert all(torch.equal(resumed_final[name], final[name]) for name in final)
    if stage != "understanding":  # what our trainers keep beside the weights
        state = load_file(out / "run" / "checkpoint-3" / RESUME_STATE_NAME)
        resumed_state = load_file(resumed / "run" / "checkpoint-3" / RESUME_STATE_NAME)
        assert state.keys() == resumed_state.keys()
        assert all(torch.equal(resumed_state[name], state[name]) for name in state)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["generation", "pretrain"])
def test_fsdp2_in_bf16_keeps_the_dtype_rules(stage, tiny_dir, tmp_path):
    """Every model loaded in bf16 and the shipped bf16 mixed precision: FSDP2 shards fp32 master weights of what
    trains (LoRA, projector) and leaves every frozen weight in bf16."""
    records = launch(stage, "fsdp2-bf16", tiny_dir, tmp_path / stage)
    assert [record["distributed_type"] for record in records] == ["DistributedType.FSDP"] * 2
    assert [record["optimizer_steps"] for record in records] == [TRAINING_STEPS] * 2
    assert [record["dtypes"] for record in records] == [{"trained": ["torch.float32"], "frozen": ["torch.bfloat16"]}] * 2
    final = assert_identical_trained_weights(tmp_path / stage)
    checkpoint = tmp_path / stage / "run" / "checkpoint-3"
    saved, reloaded = saved_weights(stage, checkpoint, final), reloaded_weights(stage, checkpoint, tiny_dir)
    assert all(reloaded[name].dtype == torch.float32 and torch.equal(reloaded[name], saved[name]) for name in final)


def engine_environment(tmp_path: Path) -> dict:
    """The environment of a launcher whose processes run an engine on this CPU host: a `sitecustomize` imports
    cpu_engines.py (the one flipped guard) in every Python process started under it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import cpu_engines  # noqa: F401\n")
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1",
                PYTHONPATH=os.pathsep.join([str(site), str(HERE), os.environ.get("PYTHONPATH", "")]))


def recipe_flags(tiny_dir, output_dir: Path) -> list[str]:
    """Flags that turn a tiny recipe into a 2-step run of the engine on the CPU host."""
    return ["--use_cpu", "false", "--max_steps", "2", "--logging_steps", "1", "--output_dir", str(output_dir),
            "--tiny_models_dir", str(tiny_dir)]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["understanding", "generation"])
def test_uae_hf_train_runs_under_zero3(stage, tiny_dir, tmp_path):
    """`uae-hf train` builds its models once DeepSpeed's ZeRO-3 config is live (transformers would partition each
    model it loads, and a frozen one would never be gathered): it loads them whole, the engine partitions the
    trained one, and the saved adapter loads without DeepSpeed."""
    output_dir = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cpu_config("zero3", tmp_path)),
         "--main_process_port", str(next(PORTS)), "-m", "uae_hf.cli", "train",
         "--config", str(HERE.parents[1] / "examples" / "recipes" / f"{stage}_tiny.yaml"),
         *recipe_flags(tiny_dir, output_dir)],
        capture_output=True, text=True, timeout=600, env=engine_environment(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 2
    if stage == "understanding":  # a PEFT adapter of the encoder
        base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "encoder")
        assert lora_parameters(PeftModel.from_pretrained(base, output_dir))
    else:  # the DiT LoRA, whole
        saved = load_file(output_dir / LORA_WEIGHT_NAME)
        pipe = load_uae_pipeline(tiny_dir / "decoder", tiny_dir / "encoder", tiny_dir / "projector")
        pipe.load_lora_weights(output_dir, weight_name=LORA_WEIGHT_NAME, adapter_name="default")
        assert len(lora_parameters(pipe.transformer)) == len(saved) > 0


@pytest.mark.slow
def test_slurm_example_runs_the_multi_node_config(tiny_dir, tmp_path):
    """examples/slurm/uae_train.sbatch as SLURM would run it on 2 machines (here: `srun` and `scontrol` stand-ins that
    start its per-machine command twice on this host, one process per "machine"), with
    examples/accelerate/multi_node.yaml as shipped (FSDP2, bf16): both machines train one model and process 0
    writes the parts."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    (stubs / "srun").write_text(  # srun --kill-on-bad-exit=1 COMMAND...: COMMAND once per node (SLURM_NODEID set),
        # each in its own process group; the first to fail ends the others, as --kill-on-bad-exit does
        "#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\npids=()\n"
        "for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node setsid \"$@\" & pids+=($!); done\n"
        "for _ in \"${pids[@]}\"; do if ! wait -n; then\n"
        "  for pid in \"${pids[@]}\"; do kill -TERM -- -$pid 2>/dev/null; done; wait; exit 1\nfi; done\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = engine_environment(tmp_path) | {
        "PATH": os.pathsep.join([str(stubs), str(Path(sys.executable).parent), os.environ["PATH"]]),
        "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_NNODES": "2", "GPUS_PER_NODE": "1", "MASTER_PORT": str(next(PORTS))}
    output_dir = tmp_path / "out"
    result = subprocess.run(
        ["bash", str(HERE.parents[1] / "examples" / "slurm" / "uae_train.sbatch"), "examples/recipes/pretrain_tiny.yaml",
         *recipe_flags(tiny_dir, output_dir), "--dtype", "bfloat16", "--save_strategy", "steps", "--save_steps", "2"],
        capture_output=True, text=True, timeout=600, env=env, cwd=HERE.parents[1],
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # both machines' processes checkpointed, and FSDP (its own model state file) trained
    checkpoint = {path.name for path in (output_dir / "checkpoint-2").iterdir()}
    assert {"rng_state_0.pth", "rng_state_1.pth", "pytorch_model_fsdp.bin"} <= checkpoint
    projector = UAEProjector.from_pretrained(output_dir / "projector")  # written once, whole, fp32 masters
    assert {p.dtype for p in projector.parameters()} == {torch.float32}
    assert {t.dtype for t in load_file(output_dir / LORA_WEIGHT_NAME).values()} == {torch.float32}


@pytest.mark.slow
def test_sharded_frozen_models_compute_what_they_compute_whole(tiny_dir, tmp_path):
    """Every frozen model of a UAE pipeline sharded on 2 processes (each holding half of it) captions and redraws
    as it does whole; one process's captioning ends before the other's (synced generation)."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(next(PORTS)),
         str(HERE / "sharded_inference.py"), str(tiny_dir), str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for record in records:
        assert all(record["sharded"].values()) and len(record["sharded"]) == 6  # DiT, VAE, 2 CLIPs, VLM, projector
        assert all(share == pytest.approx(0.5, abs=0.01) for share in record["local_share"].values())
        whole, sharded = record["captions"]
        assert sharded == whole and whole[0]
        # measured 0 (LLM embeddings) and ≤ 1.4e-6 (CLIP text encoders), AVX-512 and AVX2 kernels, 1 and 2 threads
        assert max(record["max_image_difference"].values()) < 1e-5
    assert len(records[0]["captions"][0][0]) != len(records[1]["captions"][0][0])


def test_shard_for_inference_refuses_a_model_that_trains():
    from uae_hf.trainer.frozen_sharding import shard_for_inference

    with pytest.raises(ValueError, match="frozen models only"):
        shard_for_inference(torch.nn.Linear(2, 2))
