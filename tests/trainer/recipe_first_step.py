"""The first optimizer step of `uae-hf train ARGS...` under an engine (run by test_multi_process.py under
`accelerate launch` with a shipped config, through forked_runs.py, on CPU with gloo: cpu_engines.py). Each process N
writes OUTPUT_DIR/rank{N}.json: the micro-batches of the first training step and the optimizer steps the engine took
in it, and the accumulation, batch size and precision the engine got from the recipe.

Usage: recipe_first_step.py OUTPUT_DIR ARGS...  (ARGS: those of `uae-hf train`, e.g. --config RECIPE --max_steps 1)
"""

import cpu_engines  # noqa: F401  (before accelerate builds its state)

import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from uae_hf.cli import main as uae_hf
from uae_hf.trainer import TRAINERS
from uae_hf.trainer.sharded_parameters import trained_parameters

out, rank = Path(sys.argv[1]), int(os.environ["RANK"])


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's and DeepSpeed's wrappers."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class FirstStep(TrainerCallback):
    """Counts the micro-batches of the first training step and reads, at its end, how many optimizer steps each
    weight took (AdamW's own count per weight; under DeepSpeed its weights are the flat partitions of the masters)."""

    def __init__(self):
        self.record = {"micro_batches": 0}

    def on_substep_end(self, args, state, control, **kwargs):
        self.record["micro_batches"] += 1

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step == 1:
            self.record["micro_batches"] += 1
            self.record["optimizer_steps"] = sorted({int(value["step"])
                                                     for value in torch_optimizer(optimizer).state.values()})


trainers = []


def recorded(trainer_class):
    """`trainer_class` (same name) with a `FirstStep` callback; the trainer built is kept for its record."""

    def __init__(self, *args, **kwargs):
        trainer_class.__init__(self, *args, **kwargs)
        self.first_step = FirstStep()
        self.add_callback(self.first_step)
        trainers.append(self)

    return type(trainer_class.__name__, (trainer_class,), {"__init__": __init__})


TRAINERS.update({stage: (config, recorded(trainer)) for stage, (config, trainer) in TRAINERS.items()})


def record(trainer) -> dict:
    """The first step's counts, and how the engine got the recipe's accumulation, batch size and precision."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    modules = [model, *(part for part in trainer.decoder.components.values() if isinstance(part, torch.nn.Module))]
    frozen = {p.dtype for module in modules for p in module.parameters() if not p.requires_grad}
    state = trainer.accelerator.state
    deepspeed_config = state.deepspeed_plugin.deepspeed_config if trainer.is_deepspeed_enabled else {}
    return trainer.first_step.record | {
        "global_step": trainer.state.global_step,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        "per_device_train_batch_size": trainer.args.per_device_train_batch_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "mixed_precision": trainer.accelerator.mixed_precision,
        "deepspeed": {key: deepspeed_config[key] for key in ("gradient_accumulation_steps",
                                                             "train_micro_batch_size_per_gpu", "bf16")
                      if key in deepspeed_config},
        "dtypes": {"trained": sorted({str(p.dtype) for p in trained_parameters(model).values()}),
                   "frozen": sorted(map(str, frozen))},
    }


uae_hf(["train", *sys.argv[2:]])
out.mkdir(parents=True, exist_ok=True)
(out / f"rank{rank}.json").write_text(json.dumps(record(trainers[0])))
