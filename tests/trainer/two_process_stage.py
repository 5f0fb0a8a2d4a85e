"""One stage on several processes (run by tests/trainer/test_multi_process.py under `torch.distributed.run` or
`accelerate launch`, on CPU with gloo). Each process writes its trained weights before and after training, what it
computed locally at each step, and (process 0) the logged history.

Usage: two_process_stage.py STAGE TINY_MODELS_DIR OUTPUT_DIR
"""

import json
import os
import sys

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from tiny_trainer_configs import STAGES, tiny_config
from transformers import TrainerCallback

from uae_hf import load_uae_pipeline
from uae_hf.sample_data import skimage_photos

stage, tiny_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
rank = int(os.environ["RANK"])
pipe = load_uae_pipeline(f"{tiny_dir}/decoder", f"{tiny_dir}/encoder", f"{tiny_dir}/projector")
settings = dict(
    max_steps=3, learning_rate=5e-2 if stage in ("understanding", "generation") else 1e-3, save_strategy="steps",
    save_steps=3, decoder_num_inference_steps=3, ddp_backend="gloo",
)


def rank_marker(completions, **kwargs):
    """An extra reward of weight 0 that reveals which process scored each completion."""
    return [float(rank)] * len(completions)


extra = {}
if stage == "understanding":
    settings |= dict(reward_weights=[1.0, 0.0])
    extra = dict(reward_funcs=[rank_marker],
                 peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
else:
    settings |= dict(decoder_lora_r=4, decoder_lora_alpha=8)
if stage == "cold_start":
    settings |= dict(cold_start_trainable=["projector", "llm_lora"])
trainer_class = STAGES[stage][1]
trainer = trainer_class(model=pipe.vlm, decoder=pipe, args=tiny_config(stage, tiny_dir, f"{out}/run", **settings),
                        train_dataset=skimage_photos(32), processing_class=pipe.processor, **extra)


class RecordLocal(TrainerCallback):
    """This process's own values at each step, before `log` combines processes."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        batch = trainer.last_batch  # None in the supervised stages (pretrain, cold start), which score no batch
        stage_metrics = getattr(trainer, "_stage_metrics", {})
        self.steps.append({
            "rewards": [float(r) for r in batch.rewards] if batch is not None else [],
            "metrics": {name: float(torch.tensor(values).mean()) for name, values in stage_metrics.items()},
        })


record = RecordLocal()
trainer.add_callback(record)


def trained_weights():
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {name: p.detach().clone().contiguous() for name, p in model.named_parameters() if p.requires_grad}


save_file(trained_weights(), f"{out}/initial{rank}.safetensors")
trainer.train()
save_file(trained_weights(), f"{out}/rank{rank}.safetensors")
with open(f"{out}/rank{rank}.json", "w") as file:
    json.dump({"local": record.steps, "log_history": trainer.state.log_history,
               "world_size": trainer.accelerator.num_processes}, file)
trainer.accelerator.end_training()  # tears the process group down before exit (gloo's threads can abort at exit)
