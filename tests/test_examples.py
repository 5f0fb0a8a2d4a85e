import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_round_trip_example_runs_on_the_twins(tiny_dir, photos, tmp_path):
    photo = tmp_path / "photo.png"
    photos[0].save(photo)
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "round_trip.py"), str(photo), "--decoder", str(tiny_dir / "decoder"),
         "--encoder", str(tiny_dir / "encoder"), "--projector", str(tiny_dir / "projector"), "--steps", "2",
         "--max-new-tokens", "6", "--output-prefix", str(tmp_path / "rec"), "--dtype", "bfloat16"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "rec-0.png").exists() and "→" in result.stdout


ACCELERATE_CONFIGS = {"single_gpu": "NO", "multi_gpu": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED",
                      "deepspeed_zero3": "DEEPSPEED", "multi_node": "FSDP"}


def test_every_shipped_accelerate_config_is_checked():
    assert {path.stem for path in (EXAMPLES / "accelerate").glob("*.yaml")} == set(ACCELERATE_CONFIGS)


@pytest.mark.parametrize("name", list(ACCELERATE_CONFIGS))
def test_accelerate_config_loads_as_accelerate_launch_reads_it(name, encoder, pipe):
    """Each config goes through `accelerate launch`'s own parsing into the plugin the processes would build."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = EXAMPLES / "accelerate" / f"{name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, config, _ = _validate_launch_command(args)
    assert config.distributed_type.value == ACCELERATE_CONFIGS[name]
    # DeepSpeed refuses a precision that differs from the recipe's `bf16`: its configs leave it to the recipe
    # (transformers turns `bf16: true` into accelerate's bf16, and that into DeepSpeed's bf16 mode)
    assert config.mixed_precision == ("no" if name.startswith("deepspeed") else "bf16")
    if name == "multi_gpu":
        assert args.multi_gpu and args.num_processes > 1
    if args.use_fsdp:
        with mock.patch("accelerate.utils.launch.is_port_in_use", return_value=False):  # a probe of localhost
            env = prepare_multi_gpu_env(args)
        with mock.patch.dict(os.environ, env):
            plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2
        # one config for every stage: no layer class named, the wrap policy comes from the trained model's
        # `_no_split_modules` (tests/trainer/test_multi_process.py runs it for every stage)
        assert plugin.transformer_cls_names_to_wrap is None
        assert {"Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"} <= set(encoder[0]._no_split_modules)
        assert pipe.transformer._no_split_modules == ["JointTransformerBlock"]
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join([*config.deepspeed_config, "mixed_precision"])
        with mock.patch("accelerate.utils.launch.is_port_in_use", return_value=False):
            env = prepare_deepspeed_cmd_env(args)[1]
        with mock.patch.dict(os.environ, env):
            plugin = DeepSpeedPlugin()
        assert plugin.zero_stage == int(name[-1])
        assert plugin.deepspeed_config["zero_optimization"]["stage"] == int(name[-1])
        # filled from each recipe by transformers (test_multi_process.py runs every real-size recipe under them)
        assert all(plugin.deepspeed_config[key] == "auto" for key in ("gradient_accumulation_steps", "gradient_clipping",
                                                                     "train_micro_batch_size_per_gpu"))


def test_slurm_script_hands_every_argument_over_unchanged(tmp_path):
    """examples/slurm/uae_train.sbatch's launch line as SLURM runs it on one machine of two (`srun`, `scontrol` and
    `accelerate` stand-ins; the last one writes what it was given): a value with spaces stays one argument, and the
    process count comes from the GPUs SLURM gave each machine (the one place they are set)."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "scontrol").write_text("#!/bin/bash\necho node-a\n")
    (stubs / "srun").write_text('#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\nSLURM_NODEID=1 exec "$@"\n')
    (stubs / "accelerate").write_text(f'#!/bin/bash\nprintf "%s\\0" "$@" > {tmp_path / "argv"}\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = dict(os.environ, PATH=os.pathsep.join([str(stubs), os.environ["PATH"]]), SLURM_JOB_NODELIST="node-[a-b]",
               SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4")
    extra = ["--output_dir", "/shared/my run", "--run_name", "two  spaces * and a glob", "--dataset_name", "$HOME"]
    result = subprocess.run(["bash", str(EXAMPLES / "slurm" / "uae_train.sbatch"), "recipe.yaml", *extra], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "argv").read_text().split("\0")[:-1] == [
        "launch", "--config_file", "examples/accelerate/multi_node.yaml", "--num_machines", "2", "--num_processes", "8",
        "--machine_rank", "1", "--main_process_ip", "node-a", "--main_process_port", "29500", "-m", "uae_hf.cli",
        "train", "--config", "recipe.yaml", *extra]
    lines = (EXAMPLES / "slurm" / "uae_train.sbatch").read_text().splitlines()
    assert [line for line in lines if "8" in line and not line.startswith("# ")] == ["#SBATCH --gpus-per-node=8"]
