"""Every stage on two CPU processes (gloo) under `accelerate launch` with each accelerate config we ship: DDP
(`multi_gpu.yaml`), FSDP2 (`fsdp.yaml`), DeepSpeed ZeRO-2 and ZeRO-3. Weights stay identical across processes, each
training step is one optimizer step, rewards are gathered, logged metrics are means over all processes, checkpoints
hold every process's part (under FSDP2, what trains), the saved artefacts load without the engine, runs resumed under
FSDP2 and ZeRO-3 end bit-identical, and the sharding engines train what DDP trains. Every real-size recipe takes its
first optimizer step, with its own accumulation, under the FSDP2 and DeepSpeed configs as shipped, through
`uae-hf train`. Each launch runs several trainings in fresh processes of their own (forked_runs.py: imports are most of
a launch's time)."""

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
from datasets import concatenate_datasets
from peft import PeftModel
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration

from uae_hf import UAEProjector, load_uae_pipeline
from uae_hf.sample_data import skimage_photos
from uae_hf.trainer.decoder_trainer import LORA_WEIGHT_NAME, RESUME_STATE_NAME

HERE = Path(__file__).parent
SHIPPED = HERE.parents[1] / "examples" / "accelerate"
RECIPES = HERE.parents[1] / "examples" / "recipes"
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
PORTS = count(29610)  # a launch takes its own port and one per run it forks


# where a worker's own report of its death starts: a Python exception, a fatal signal (PYTHONFAULTHANDLER prints its
# stacks), or a C++ exception that ended the process (gloo's transport errors arrive this way, as SIGABRT)
FAILURE_MARKERS = ("Traceback (most recent call last)", "Fatal Python error", "terminate called", "what():")


def launch_failure(stderr: str, limit: int = 6000) -> str:
    """What a failed launch's stderr says about the failure: its first worker report (the launcher's own
    traceback and summary come after it and would push it out of a plain tail), then the tail."""
    starts = [index for index in (stderr.find(marker) for marker in FAILURE_MARKERS) if index >= 0]
    if not starts or min(starts) >= len(stderr) - limit:
        return stderr[-limit:]
    return f"{stderr[min(starts):min(starts) + limit // 2]}\n[...]\n{stderr[-limit // 2:]}"


def cpu_config(engine: str, folder: Path, mixed_precision: str | None = "no", **fsdp_config) -> Path:
    """The shipped config of `engine` for 2 CPU processes: 2 processes, `mixed_precision` (the twins train in fp32
    here; `None`: as shipped), DDP with `use_cpu` (accelerate's own CPU DDP), `fsdp_config` over the shipped one;
    everything else as shipped."""
    config = yaml.safe_load((SHIPPED / ENGINES[engine][0]).read_text())
    config |= {"num_processes": 2, "use_cpu": engine == "ddp"}
    if mixed_precision is not None:
        config["mixed_precision"] = mixed_precision
    if fsdp_config:
        config["fsdp_config"] |= fsdp_config
    config.pop("gpu_ids", None)
    path = folder / f"{engine}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def accelerate_launch(config: Path, runs: list[list[str]]) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file config` of forked_runs.py with `runs` (each a script and its arguments), on
    this host: the launch's port and one per run after it."""
    port = next(PORTS)
    for _ in runs:
        next(PORTS)
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port",
         str(port), str(HERE / "forked_runs.py"), *[arg for index, run in enumerate(runs)
                                                    for arg in [*(["--next"] if index else []), *run]]],
        capture_output=True, text=True, timeout=1800,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1",  # a crashing worker prints its stacks
                 PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])),
    )


def run_records(folder: Path, launch: subprocess.CompletedProcess) -> list[dict]:
    """Both processes' records of the run that wrote into `folder`, or the failure of its launch."""
    if not all((folder / f"rank{rank}.json").is_file() for rank in (0, 1)):
        pytest.fail(f"no records in {folder} (launch status {launch.returncode}):\n{launch_failure(launch.stderr)}")
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]


# the engines whose launch also resumes every stage: the sharding ones, whose checkpoints are not a single process's
# (FSDP2: the trained state only; ZeRO-3: DeepSpeed's partitions of parameters and optimizer). DDP's checkpoint is a
# single process's (tests/trainer/test_resume.py) with each process's RNG state, which these resumes restore too;
# ZeRO-2's is ZeRO-3's without the parameter partitions.
RESUMING_ENGINES = ("fsdp2", "zero3")


def stage_runs(stage: str, engine: str, tiny_dir, folder: Path) -> list[list[str]]:
    """two_process_stage.py's run of `stage` under `engine` (records in `folder/records`), then, for a resuming
    engine, the same run resumed from its checkpoint 2 (records in `folder/resumed`)."""
    script, run = str(HERE / "two_process_stage.py"), folder / "records"
    return [[script, stage, str(tiny_dir), str(run), engine],
            *([[script, stage, str(tiny_dir), str(folder / "resumed"), engine, str(run / "run" / "checkpoint-2")]]
              if engine in RESUMING_ENGINES else [])]


# the other decoder families' twins, each trained with both stage-3 objectives under DDP and FSDP2
FAMILY_RUNS = [f"{stage}-{family}" for family in ("flux1", "qwen_image", "flux2_klein")
               for stage in ("generation", "generation_nft")]
# the other encoder families' twins, each trained in stage 2 (its LoRA) under DDP and FSDP2: what is family-specific is
# the encoder's own inputs (Qwen3-VL's grid and DeepStack, Gemma 3's token type ids) and, under FSDP2, the sharding of
# its blocks (its `_no_split_modules`); no resumed run (the trainer's resumption is the family-independent one)
ENCODER_RUNS = ["understanding-enc:qwen3_vl", "understanding-enc:gemma3"]


# each real-size recipe → what its twin run changes to be feasible on 2 CPU processes, besides the models, data and
# sizes every run swaps (`twin_flags`). Stage 3's recipes are written for one GPU and say how to keep the images per
# optimizer step on N ("set gradient_accumulation_steps to 24 / N"): here as a user of the shipped configs (8 GPUs)
# sets it, 3 and 6 (more than 1, as DeepSpeed once refused; 2 processes' 12 and 24 took 100 s more of the engine
# launches for the same check). Their groups of 24 reconstructions shrink to 2: 3 and 6 micro-batches of 24 would still
# be 72 and 144 rollouts per process and step on a CPU (the accumulation, and so the count of micro-batches, stays).
SHIPPED_GPUS = yaml.safe_load((SHIPPED / "fsdp.yaml").read_text())["num_processes"]
SMALL_GROUPS = {"per_device_train_batch_size": 2, "num_generations": 2}
REAL_SIZE_RECIPES = {"understanding_qwen2.5-vl-3b_sd3.5": {},
                     "generation_sd3.5": SMALL_GROUPS | {"gradient_accumulation_steps": 24 // SHIPPED_GPUS},
                     "generation_nft_sd3.5": SMALL_GROUPS | {"gradient_accumulation_steps": 48 // SHIPPED_GPUS},
                     "pretrain_sd3.5": {}, "cold_start_sd3.5": {}}


def twin_flags(recipe: str, tiny_dir, photos: Path, output_dir: Path) -> list[str]:
    """What turns a real-size recipe into a run of the twins that stops after its first optimizer step: the twins for
    the models (for pre-training, the twins' plain SD3 pipeline in place of SD3.5-Large, with the recipe's new
    projector), 96 photos of 32 px, 32 px reconstructions of 2 sampler steps, captions of at most 8 tokens, nothing
    saved but the final parts. Everything else is the recipe's: accumulation, per-device batch, LoRA ranks and
    targets, trained parts, schedules, EMA, activation checkpointing, bf16 weights and bf16 training."""
    decoder = str(tiny_dir / "decoder") if recipe.startswith("pretrain") else "tiny"
    return ["--model_name_or_path", "tiny", "--decoder", decoder, "--tiny_models_dir", str(tiny_dir),
            "--dataset_name", str(photos), "--output_dir", str(output_dir), "--max_steps", "1", "--save_strategy",
            "no", "--report_to", "none", "--logging_steps", "1", "--decoder_height", "32", "--decoder_width", "32",
            "--decoder_num_inference_steps", "2", "--max_completion_length", "8",
            *[arg for name, value in REAL_SIZE_RECIPES[recipe].items() for arg in (f"--{name}", str(value))]]


# what `fsdp.yaml` ships is FULL_STATE_DICT; a run of the fsdp2 launch checkpoints with the other kind accelerate has
SHARDED = "SHARDED_STATE_DICT"


@pytest.fixture(scope="module")
def launches(tiny_dir, tmp_path_factory):
    """`launches(name)`: the folder and result of one launch, launched once per module (one xdist worker runs the
    whole module, one launch at a time: conftest's `LAUNCHING_MODULES`). Each engine's launch runs every stage (and,
    under `RESUMING_ENGINES`, its resumed run) in full precision; "ddp" and "fsdp2" also the other decoder and encoder
    families' runs, "ddp" also sharded_inference.py, "fsdp2" also the whole DiT's pre-training checkpointed with
    `SHARDED_STATE_DICT` and resumed; "zero2" and "zero3" also every real-size recipe, under their configs as shipped
    (which leave precision to the runs: the recipes' bf16); "fsdp2-recipes" the real-size recipes under fsdp.yaml as
    shipped (bf16)."""
    done = {}

    def launch(name: str) -> tuple[Path, subprocess.CompletedProcess]:
        if name in done:
            return done[name]
        folder = tmp_path_factory.mktemp(name)
        engine = name.removesuffix("-recipes")
        runs = [] if name == "fsdp2-recipes" else [
            run for stage in STAGES for run in stage_runs(stage, engine, tiny_dir, folder / stage)]
        if engine in ("ddp", "fsdp2") and not name.endswith("-recipes"):
            runs += [[str(HERE / "two_process_stage.py"), run, str(tiny_dir), str(folder / run / "records"), engine]
                     for run in [*FAMILY_RUNS, *ENCODER_RUNS]]
        if name == "ddp":  # the frozen models sharded for inference (no engine: its own gloo group)
            runs += [[str(HERE / "sharded_inference.py"), str(tiny_dir), str(folder / "sharded_inference")]]
        if name == "fsdp2":  # the whole DiT, checkpointed as each process's shards (accelerate's own format)
            runs += [[f"FSDP_STATE_DICT_TYPE={SHARDED}", *run]
                     for run in stage_runs("pretrain-full", engine, tiny_dir, folder / "sharded_state_dict")]
        shipped = name.endswith("-recipes") or engine.startswith("zero")
        if shipped:
            photos = folder / "photos"
            concatenate_datasets([skimage_photos(32)] * 12).save_to_disk(photos)
            runs += [[str(HERE / "recipe_first_step.py"), str(folder / recipe), "--config",
                      str(RECIPES / f"{recipe}.yaml"), *twin_flags(recipe, tiny_dir, photos, folder / recipe / "run")]
                     for recipe in REAL_SIZE_RECIPES]
        done[name] = folder, accelerate_launch(cpu_config(engine, folder, mixed_precision=None if shipped else "no"),
                                               runs)
        return done[name]

    return launch


@pytest.fixture(scope="module")
def runs(launches):
    """`runs(stage, engine)`: the output folder and records of that two-process run (its resumed run's records beside
    it, in `out.parent / "resumed"`)."""

    def run(stage: str, engine: str) -> tuple[Path, list[dict]]:
        folder, launch = launches(engine)
        return folder / stage / "records", run_records(folder / stage / "records", launch)

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


def checkpoint_weight_names(checkpoint: Path) -> set[str]:
    """The names of the weights a checkpoint's files hold (its optimizer, scheduler and RNG states aside), a copy's
    (EMA, old policy) as the weight's, the projector folder's under `projector.`."""
    names = set()
    for path in [*checkpoint.rglob("*.safetensors"), *checkpoint.glob("pytorch_model_fsdp*.bin")]:
        weights = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
        prefix = "projector." if path.parent.name == "projector" else ""
        names |= {prefix + name.removeprefix("ema.").removeprefix("old_policy.") for name in weights}
    return names


def update_difference(out: Path, reference: Path) -> float:
    """‖Δ - Δ_ref‖ / ‖Δ_ref‖ over every trained weight, Δ being what training changed."""
    initial, final, final_ref = (load_file(path) for path in
                                 (out / "initial0.safetensors", out / "rank0.safetensors", reference / "rank0.safetensors"))
    delta = torch.cat([(final[k] - initial[k]).flatten() for k in sorted(initial)])
    delta_ref = torch.cat([(final_ref[k] - initial[k]).flatten() for k in sorted(initial)])
    return float((delta - delta_ref).norm() / delta_ref.norm())


class ResumeChecks:
    """What a resuming engine's launch must show besides (`RESUMING_ENGINES`)."""

    engine = ""

    @pytest.mark.parametrize("stage", STAGES)
    def test_resumes_exactly(self, stage, runs, launches):
        """Resumed from checkpoint 2 of 3, a run ends where the uninterrupted one did, bit for bit: the trained weights
        and their copies (EMA, old policy), on both processes."""
        engine = self.engine
        out, _ = runs(stage, engine)
        resumed = out.parent / "resumed"
        resumed_records = run_records(resumed, launches(engine)[1])
        assert [record["optimizer_steps"] for record in resumed_records] == [1, 1]  # the one step left
        final, resumed_final = load_file(out / "rank0.safetensors"), assert_identical_trained_weights(resumed)
        assert all(torch.equal(resumed_final[name], final[name]) for name in final)
        if stage != "understanding":  # what our trainers keep beside the weights
            state = load_file(out / "run" / "checkpoint-3" / RESUME_STATE_NAME)
            resumed_state = load_file(resumed / "run" / "checkpoint-3" / RESUME_STATE_NAME)
            assert state.keys() == resumed_state.keys()
            assert all(torch.equal(resumed_state[name], state[name]) for name in state)


@pytest.mark.slow
class TestDDP:
    """`multi_gpu.yaml`: accelerate's CPU DDP, the reference of the sharding engines."""

    engine = "ddp"

    @pytest.mark.parametrize("stage", STAGES)
    def test_two_processes_train_one_model(self, stage, runs):
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


class ShardingEngineChecks:
    """What a sharding engine's launch must show besides: it trains what DDP trains; one subclass per engine."""

    engine = ""

    @pytest.mark.outcome  # its bounds on the difference from DDP are rounding that kernels move
    @pytest.mark.parametrize("stage", STAGES)
    def test_trains_as_ddp_does(self, stage, runs, tiny_dir):
        engine = self.engine
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
        if engine == "fsdp2":  # what trains, not the frozen base gathered to process 0 (before: 115 tensors, LoRA 30)
            assert checkpoint_weight_names(checkpoint) and all(
                "lora_" in name or name.startswith("projector.") for name in checkpoint_weight_names(checkpoint))
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
class TestFSDP2(ShardingEngineChecks, ResumeChecks):
    engine = "fsdp2"


@pytest.mark.slow
class TestZeRO2(ShardingEngineChecks):
    engine = "zero2"


@pytest.mark.slow
class TestZeRO3(ShardingEngineChecks, ResumeChecks):
    engine = "zero3"


@pytest.mark.slow
class TestDecoderFamilies:
    """FLUX.1, Qwen-Image and FLUX.2 [klein] twins (their stock pipelines) trained by both stage-3 trainers under
    `multi_gpu.yaml` (DDP) and `fsdp.yaml`: one optimizer step per step, identical ranks, under FSDP2 every frozen model
    sharded for inference (the family's text encoders and VAE, the encoder captioning), and a checkpoint whose LoRA the
    stock pipeline loads."""

    @pytest.mark.parametrize("run", FAMILY_RUNS)
    @pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
    def test_trains_one_model_and_saves_what_the_stock_pipeline_loads(self, engine, run, launches, tiny_dir):
        from diffusers import DiffusionPipeline

        folder, launch = launches(engine)
        out = folder / run / "records"
        records = run_records(out, launch)
        assert [record["distributed_type"] for record in records] == [f"DistributedType.{ENGINES[engine][1]}"] * 2
        assert [record["optimizer_steps"] for record in records] == [TRAINING_STEPS] * 2
        final = assert_identical_trained_weights(out)
        if engine == "fsdp2":
            for record in records:
                assert record["frozen_models"]["whole"] == []
                assert {"vae", "text_encoder", "encoder"} <= set(record["frozen_models"]["sharded"])
        stage, _, family = run.partition("-")
        checkpoint = out / "run" / "checkpoint-3"
        saved = saved_weights(stage, checkpoint, final)
        pipe = DiffusionPipeline.from_pretrained(tiny_dir / "decoders" / family)
        pipe.load_lora_weights(checkpoint, weight_name=LORA_WEIGHT_NAME, adapter_name="default")
        reloaded = lora_parameters(pipe.transformer)
        assert reloaded.keys() == final.keys()
        assert all(torch.equal(reloaded[name], saved[name]) for name in final)


@pytest.mark.slow
class TestEncoderFamiliesUnderDDPAndFSDP2:
    """Qwen3-VL and Gemma 3 twins trained by stage 2 (their LoRA, the UAE twin's decoder as reward) under
    `multi_gpu.yaml` and `fsdp.yaml`: one optimizer step per step, identical ranks, trained, and a checkpoint whose
    adapter PEFT loads on the family's own base model."""

    @pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
    @pytest.mark.parametrize("run", ENCODER_RUNS)
    def test_trains_one_model_and_saves_an_adapter_peft_loads(self, run, engine, launches, tiny_dir):
        from transformers import AutoModelForImageTextToText

        folder, launch = launches(engine)
        out = folder / run / "records"
        records = run_records(out, launch)
        assert [record["distributed_type"] for record in records] == [f"DistributedType.{ENGINES[engine][1]}"] * 2
        assert [record["optimizer_steps"] for record in records] == [TRAINING_STEPS] * 2
        final = assert_identical_trained_weights(out)
        if engine == "fsdp2":  # the encoder shards at its own blocks; the frozen decoder (its LLM too) for inference
            assert all(record["frozen_models"]["whole"] == [] for record in records)
        base = AutoModelForImageTextToText.from_pretrained(tiny_dir / "encoders" / run.partition(":")[2])
        reloaded = lora_parameters(PeftModel.from_pretrained(base, out / "run" / "checkpoint-3"))
        assert reloaded.keys() == final.keys()
        assert all(torch.equal(reloaded[name], final[name]) for name in final)


class RealSizeRecipeChecks:
    """Every real-size recipe's first optimizer step under one engine's config as shipped; one subclass per engine."""

    engine = ""

    @pytest.mark.parametrize("recipe", list(REAL_SIZE_RECIPES))
    def test_real_size_recipes_take_their_first_optimizer_step(self, recipe, launches, tiny_dir):
        """Each real-size recipe with its own settings (the twins in place of its models) through `uae-hf train`, under each
        shipped FSDP2 and DeepSpeed config as shipped: the engine takes its accumulation, batch size and bf16 from the
        recipe (DeepSpeed's "auto" values; before, both DeepSpeed configs fixed an accumulation of 1 and transformers
        refused every recipe), and its first optimizer step comes after the recipe's number of micro-batches (stage 3:
        for the shipped configs' 8 GPUs, as the recipe says), once."""
        settings = yaml.safe_load((RECIPES / f"{recipe}.yaml").read_text())
        engine = self.engine
        folder, launch = launches("fsdp2-recipes" if engine == "fsdp2" else engine)
        out = folder / recipe
        accumulation = settings["gradient_accumulation_steps"]
        if "gradient_accumulation_steps" in REAL_SIZE_RECIPES[recipe]:  # the recipe's own rule for the shipped GPUs
            assert f"set gradient_accumulation_steps to {accumulation} / N" in (RECIPES / f"{recipe}.yaml").read_text()
            accumulation = REAL_SIZE_RECIPES[recipe]["gradient_accumulation_steps"]
            assert accumulation == settings["gradient_accumulation_steps"] // SHIPPED_GPUS > 1
        batch = REAL_SIZE_RECIPES[recipe].get("per_device_train_batch_size", settings["per_device_train_batch_size"])
        for record in run_records(out, launch):
            assert record["distributed_type"] == f"DistributedType.{ENGINES[engine][1]}"
            assert record["gradient_accumulation_steps"] == record["micro_batches"] == accumulation
            assert record["per_device_train_batch_size"] == batch
            assert record["optimizer_steps"] == [1] and record["global_step"] == 1
            assert settings["bf16"] and record["mixed_precision"] == "bf16"
            if engine == "fsdp2":  # fp32 masters of what trains, every frozen weight bf16
                assert record["dtypes"] == {"trained": ["torch.float32"], "frozen": ["torch.bfloat16"]}
            else:  # DeepSpeed's bf16 mode: bf16 weights (its fp32 masters live in its optimizer)
                assert record["deepspeed"] == {"gradient_accumulation_steps": accumulation,
                                               "train_micro_batch_size_per_gpu": batch, "bf16": {"enabled": True}}
                assert record["dtypes"] == {"trained": ["torch.bfloat16"], "frozen": ["torch.bfloat16"]}
        # the trained parts are saved whole (gathered), and load without the engine
        run = out / "run"
        if recipe.startswith("understanding"):
            base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "encoder")
            assert lora_parameters(PeftModel.from_pretrained(base, run))
        else:
            saved = load_file(run / LORA_WEIGHT_NAME)  # stage 3 saves its EMA: fp32 under every engine
            assert saved and {value.dtype for value in saved.values()} == {
                torch.float32 if engine == "fsdp2" or recipe.startswith("generation") else torch.bfloat16}
        if recipe.startswith(("pretrain", "cold_start")):
            assert sum(p.numel() for p in UAEProjector.from_pretrained(run / "projector").parameters()) > 0


@pytest.mark.slow
class TestRecipesUnderFSDP2(RealSizeRecipeChecks):
    engine = "fsdp2"


@pytest.mark.slow
class TestRecipesUnderZeRO2(RealSizeRecipeChecks):
    engine = "zero2"


@pytest.mark.slow
class TestRecipesUnderZeRO3(RealSizeRecipeChecks):
    engine = "zero3"


@pytest.mark.slow
def test_fsdp2_checkpoints_a_wholly_trained_model_sharded_when_asked(launches):
    """The whole DiT pre-trained under FSDP2 with `fsdp_state_dict_type: SHARDED_STATE_DICT`: each checkpoint holds the
    model as each process's shards (accelerate's own format; no whole copy, in the resume state or as saved parts),
    and the run resumed from checkpoint 2 ends bit-identical."""
    folder, launch = launches("fsdp2")
    out = folder / "sharded_state_dict" / "records"
    assert {record["state_dict_type"] for record in run_records(out, launch)} == {SHARDED}
    resumed = run_records(out.parent / "resumed", launch)
    assert [record["optimizer_steps"] for record in resumed] == [1, 1]
    final = assert_identical_trained_weights(out)
    resumed_final = assert_identical_trained_weights(out.parent / "resumed")
    assert any(name.startswith("transformer.transformer_blocks") and "lora" not in name for name in final)
    assert all(torch.equal(resumed_final[name], final[name]) for name in final)
    checkpoint = out / "run" / "checkpoint-2"
    shards = sorted(path.name for path in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # written by each process
    assert load_file(checkpoint / RESUME_STATE_NAME) == {}
    assert not {"pytorch_model_fsdp.bin", "transformer", "projector"} & {path.name for path in checkpoint.iterdir()}


def engine_environment(tmp_path: Path) -> dict:
    """The environment of a launcher whose processes run an engine on this CPU host: a `sitecustomize` imports
    cpu_engines.py (the flipped guards) in every Python process started under it."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import cpu_engines  # noqa: F401\n")
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1",
                PYTHONPATH=os.pathsep.join([str(site), str(HERE), os.environ.get("PYTHONPATH", "")]))


def recipe_flags(tiny_dir, output_dir: Path) -> list[str]:
    """Flags that turn a tiny recipe into a 2-step run on the twins."""
    return ["--max_steps", "2", "--logging_steps", "1", "--output_dir", str(output_dir), "--tiny_models_dir",
            str(tiny_dir)]


@pytest.mark.slow
def test_slurm_example_runs_the_multi_node_config(tiny_dir, tmp_path):
    """examples/slurm/uae_train.sbatch as SLURM would run it on 2 machines (here: `srun` and `scontrol` stand-ins that
    start its per-machine command twice on this host, one process per "machine"), with
    examples/accelerate/multi_node.yaml as shipped (FSDP2, bf16): both machines train one model and process 0
    writes the parts. The tiny recipe no longer forces the CPU (`use_cpu: true` made FSDP2 CPU DDP), and an output
    folder with a space in its name reaches `uae-hf train` whole."""
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
        "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "1",
        "MASTER_PORT": str(next(PORTS))}
    output_dir = tmp_path / "run output"
    result = subprocess.run(
        ["bash", str(HERE.parents[1] / "examples" / "slurm" / "uae_train.sbatch"), "examples/recipes/pretrain_tiny.yaml",
         *recipe_flags(tiny_dir, output_dir), "--dtype", "bfloat16", "--save_strategy", "steps", "--save_steps", "2"],
        capture_output=True, text=True, timeout=600, env=env, cwd=HERE.parents[1],
    )
    assert result.returncode == 0, launch_failure(result.stderr)
    # both machines' processes checkpointed, and FSDP trained (its optimizer file; DDP's would be optimizer.pt)
    checkpoint = {path.name for path in (output_dir / "checkpoint-2").iterdir()}
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.bin", "resume_state.safetensors"} <= checkpoint
    projector = UAEProjector.from_pretrained(output_dir / "projector")  # written once, whole, fp32 masters
    assert {p.dtype for p in projector.parameters()} == {torch.float32}
    assert {t.dtype for t in load_file(output_dir / LORA_WEIGHT_NAME).values()} == {torch.float32}


@pytest.mark.slow
def test_sharded_frozen_models_compute_what_they_compute_whole(launches):
    """Every frozen model of a UAE pipeline sharded on 2 processes (each holding half of it) captions and redraws
    as it does whole; one process's captioning ends before the other's (synced generation)."""
    folder, launch = launches("ddp")
    records = run_records(folder / "sharded_inference", launch)
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
