"""What each process holds, per stage, under DDP, FSDP2 and DeepSpeed ZeRO-3: 2 CPU processes (gloo), tiny twins,
the shipped accelerate configs (examples/accelerate/), side by side in one run, as ratios to DDP.

    python benchmarks/sharding_memory.py [--output sharding.json]

Each (stage, engine) is one `accelerate launch` of 2 processes that trains one step, then counts on each process the
bytes it holds, read from the tensors themselves (a twin's few MB would drown in a process's resident size):
- trained state: the trained parameters (this process's shard under FSDP2 / ZeRO-3) and the optimizer's state and
  master weights (its partition under ZeRO-2/3, its shard under FSDP2); gradients are freed after the step, not counted;
- frozen models: every other parameter the stage computes with (the decoder in stage "understanding"; the encoder,
  VAE and frozen DiT weights in the decoder stages; the reward backbones); and of them the decoder's (DiT, VAE, text
  encoders, projector), its DiT's alone, and the encoder's (the VLM: frozen in stage 3, the policy's base in stage 2).
Peak resident set size (whole process) is printed for reference. On CPU accelerate refuses FSDP and DeepSpeed; the
child flips that one guard (tests/trainer/cpu_engines.py), and the engines' own code runs.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

import benchmark_cli  # a sibling module: benchmarks run as scripts

ROOT = Path(__file__).parents[1]
STAGES = ["understanding", "generation", "generation_nft", "pretrain", "cold_start"]
ENGINES = {"ddp": "multi_gpu.yaml", "fsdp2": "fsdp.yaml", "zero3": "deepspeed_zero3.yaml"}

CHILD = r"""
import json, os, resource, sys
stage, engine, twins, out = sys.argv[1:5]
if engine != "ddp":
    import cpu_engines  # noqa: F401  (the CPU host runs the engine)
import torch
from peft import LoraConfig
from tiny_trainer_configs import STAGES, tiny_config
from uae_hf import load_uae_pipeline
from uae_hf.sample_data import skimage_photos

pipe = load_uae_pipeline(f"{twins}/decoder", f"{twins}/encoder", f"{twins}/projector")
settings = dict(max_steps=1, use_cpu=engine == "ddp", ddp_backend="gloo", decoder_num_inference_steps=3,
                save_strategy="no")
extra = {}
if stage == "understanding":
    extra = dict(peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
else:
    settings |= dict(decoder_lora_r=4, decoder_lora_alpha=8)
if stage == "cold_start":
    settings["cold_start_trainable"] = ["projector", "llm_lora"]
trainer = STAGES[stage][1](model=pipe.vlm, decoder=pipe, args=tiny_config(stage, twins, f"{out}/run", **settings),
                           train_dataset=skimage_photos(32), processing_class=pipe.processor, **extra)
trainer.train()

def local(tensor):
    if hasattr(tensor, "ds_tensor"):
        return tensor.ds_tensor
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor

def nbytes(tensors):
    seen, total = set(), 0
    for tensor in tensors:
        tensor = local(tensor)
        if tensor.numel() and tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            total += tensor.untyped_storage().nbytes()
    return total

model = trainer.accelerator.unwrap_model(trainer.model)
trained = [p for p in model.parameters() if p.requires_grad]
optimizer = trainer.optimizer
while hasattr(optimizer, "optimizer"):
    optimizer = optimizer.optimizer
state = [value for values in optimizer.state.values() for value in values.values()
         if isinstance(value, torch.Tensor) and value.ndim]
masters = [p for group in optimizer.param_groups for p in group["params"]]
def frozen_parameters(modules):
    return [p for module in modules if isinstance(module, torch.nn.Module) for p in module.parameters()
            if not p.requires_grad]

decoder = [module for name, module in pipe.components.items() if name != "vlm"]  # DiT, VAE, text encoders, projector
backbones = [embedder.model for embedder in trainer.reconstruction_reward.similarity.embedders.values()]
everything = [*pipe.components.values(), model, *backbones]
figures = {"trained_state_bytes": nbytes([*trained, *masters, *state]),
           "frozen_bytes": nbytes(frozen_parameters(everything)),
           "frozen_decoder_bytes": nbytes(frozen_parameters(decoder)),
           "frozen_dit_bytes": nbytes(frozen_parameters([pipe.transformer])),
           "frozen_encoder_bytes": nbytes(frozen_parameters([pipe.vlm])),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "distributed_type": str(trainer.accelerator.distributed_type)}
with open(f"{out}/rank{os.environ['RANK']}.json", "w") as file:
    json.dump(figures, file)
trainer.accelerator.end_training()
"""


def _config(engine: str, folder: Path) -> Path:
    config = yaml.safe_load((ROOT / "examples" / "accelerate" / ENGINES[engine]).read_text())
    config |= {"num_processes": 2, "mixed_precision": "no", "use_cpu": engine == "ddp"}
    config.pop("gpu_ids", None)
    path = folder / f"{engine}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(stage: str, engine: str, twins: Path, folder: Path, port: int) -> list[dict]:
    out = folder / f"{stage}-{engine}"
    out.mkdir()
    child = out / "child.py"
    child.write_text(CHILD)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "trainer"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                             str(_config(engine, out)), "--main_process_port", str(port), str(child), stage, engine,
                             str(twins), str(out)], capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"{stage} under {engine} failed:\n{result.stderr[-3000:]}")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def measure(stages: str = ",".join(STAGES)) -> dict:
    from uae_hf import build_tiny_models

    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        twins = build_tiny_models(folder / "twins")
        port = 29700
        for stage in stages.split(","):
            figures[stage] = {}
            for engine in ENGINES:
                ranks = _run(stage, engine, twins, folder, port)
                port += 1
                figures[stage][engine] = {key: max(rank[key] for rank in ranks) for key in ranks[0]
                                          if key.endswith("bytes")}
                figures[stage][engine]["distributed_type"] = ranks[0]["distributed_type"]
            ddp = figures[stage]["ddp"]
            for engine in ENGINES:
                row = figures[stage][engine]
                for part in ("trained_state", "frozen", "frozen_decoder", "frozen_dit", "frozen_encoder"):
                    row[f"{part}_vs_ddp"] = row[f"{part}_bytes"] / ddp[f"{part}_bytes"]
    figures["largest_trained_state_vs_ddp"] = max(figures[stage][engine]["trained_state_vs_ddp"]
                                                  for stage in stages.split(",") for engine in ("fsdp2", "zero3"))
    for part in ("decoder", "dit") if "understanding" in figures else ():
        figures[f"understanding_frozen_{part}_vs_ddp"] = min(figures["understanding"][engine][f"frozen_{part}_vs_ddp"]
                                                              for engine in ("fsdp2", "zero3"))
    stage3 = [stage for stage in ("generation", "generation_nft") if stage in figures]
    if stage3:  # the worse of the two stage-3 objectives, under the better engine
        figures["stage3_frozen_encoder_vs_ddp"] = max(min(figures[stage][engine]["frozen_encoder_vs_ddp"]
                                                          for engine in ("fsdp2", "zero3")) for stage in stage3)
    return figures


def report(figures: dict) -> None:
    print("per process, the larger of the 2; ratios to DDP (2 CPU processes, tiny twins)")
    print(f"{'stage':<16}{'engine':<8}{'trained state':>15}{'ratio':>7}{'frozen models':>15}{'ratio':>7}"
          f"{'decoder':>9}{'encoder':>9}{'peak RSS':>11}")
    for stage in [stage for stage in STAGES if stage in figures]:
        for engine, row in figures[stage].items():
            print(f"{stage:<16}{engine:<8}{row['trained_state_bytes'] / 2**20:>12.2f} MB{row['trained_state_vs_ddp']:>7.2f}"
                  f"{row['frozen_bytes'] / 2**20:>12.2f} MB{row['frozen_vs_ddp']:>7.2f}"
                  f"{row['frozen_decoder_vs_ddp']:>9.2f}{row['frozen_encoder_vs_ddp']:>9.2f}"
                  f"{row['peak_rss_bytes'] / 2**30:>8.2f} GB")
    print(f"largest trained-state ratio under FSDP2 / ZeRO-3: {figures['largest_trained_state_vs_ddp']:.2f} "
          "(target <= 0.6)")
    if "understanding_frozen_decoder_vs_ddp" in figures:
        print(f"stage 2, frozen decoder (DiT, VAE, text encoders, projector), best engine / DDP: "
              f"{figures['understanding_frozen_decoder_vs_ddp']:.2f} (target <= 0.6); its DiT alone: "
              f"{figures['understanding_frozen_dit_vs_ddp']:.2f}")
    if "stage3_frozen_encoder_vs_ddp" in figures:
        print(f"stage 3, frozen encoder (the captioning VLM), best engine / DDP: "
              f"{figures['stage3_frozen_encoder_vs_ddp']:.2f} (target <= 0.6)")


if __name__ == "__main__":
    benchmark_cli.run(__doc__, measure, report, {"stages": ",".join(STAGES)})
