"""One stage on several processes (run by tests/trainer/test_multi_process.py under `accelerate launch`, through
forked_runs.py, on CPU with gloo). Each process writes its trained weights (whole, gathered where an engine
shards them) before and after training, what it computed locally at each step, how many optimizer steps it took,
and (process 0) the logged history.

Usage: two_process_stage.py STAGE TINY_MODELS_DIR OUTPUT_DIR [ENGINE [RESUME_FROM]]

STAGE: a stage of `uae-hf train`, or "pretrain-full" (pre-training of the whole DiT, not a LoRA), or a stage-3 stage on
another decoder family's twin, "generation-<family>" / "generation_nft-<family>" (e.g. "generation-flux1": its stock
pipeline, the encoder twin captioning), or stage 2 on another encoder family's twin, "understanding-enc:<family>"
(e.g. "understanding-enc:gemma3": its LoRA trains, the UAE twin's decoder scores). ENGINE: "fsdp2",
"zero2" or "zero3" under `accelerate launch` with the matching config of examples/accelerate/ (the CPU host runs that
engine: cpu_engines.py); "ddp" or none: DDP on the CPU (`use_cpu`). RESUME_FROM: a checkpoint folder of an earlier
run of the same stage and engine to resume from. Flow-GRPO keeps an EMA (blended every step) as
DiffusionNFT does by default, so that the copies of the trained weights (EMA, DiffusionNFT's old policy) are saved,
resumed and gathered under every engine.
"""

import json
import os
import sys

engine = sys.argv[4] if len(sys.argv) > 4 else "ddp"
resume_from = sys.argv[5] if len(sys.argv) > 5 else None
if engine != "ddp":
    import cpu_engines  # noqa: F401  (before accelerate builds its state)

import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from tiny_trainer_configs import STAGES, tiny_config
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback

from uae_hf import load_uae_pipeline
from uae_hf.pipelines.uae_reconstruction import load_encoder
from uae_hf.sample_data import skimage_photos
from uae_hf.trainer.frozen_sharding import decoder_models
from uae_hf.trainer.sharded_parameters import full_values, trained_parameters

(stage, _, variant), tiny_dir, out = sys.argv[1].partition("-"), sys.argv[2], sys.argv[3]
rank = int(os.environ["RANK"])
encoder_family = variant.removeprefix("enc:") if variant.startswith("enc:") else None
family = variant if variant and variant != "full" and not encoder_family else None
if family:  # another family's stock pipeline, read in text mode; the encoder twin captions
    pipe = DiffusionPipeline.from_pretrained(f"{tiny_dir}/decoders/{family}")
    encoder, processor = (AutoModelForImageTextToText.from_pretrained(f"{tiny_dir}/encoder"),
                          AutoProcessor.from_pretrained(f"{tiny_dir}/encoder"))
else:
    pipe = load_uae_pipeline(f"{tiny_dir}/decoder", f"{tiny_dir}/encoder", f"{tiny_dir}/projector")
    encoder, processor = pipe.vlm, pipe.processor
if encoder_family:  # stage 2 trains another encoder family's twin; the UAE twin's decoder (its own LLM) scores it
    encoder, processor = load_encoder(f"{tiny_dir}/encoders/{encoder_family}")
settings = dict(
    max_steps=3, learning_rate=5e-2 if stage in ("understanding", "generation") else 1e-3, save_strategy="steps",
    save_steps=2, decoder_num_inference_steps=3, ddp_backend="gloo", use_cpu=engine == "ddp",
)


def rank_marker(completions, **kwargs):
    """An extra reward of weight 0 that reveals which process scored each completion."""
    return [float(rank)] * len(completions)


def even_token_share(completions, completion_ids, **kwargs):
    """An extra reward of weight 1, exact given the tokens (the share of even token ids): its spread keeps GRPO's
    advantages, and so the comparison with DDP, well conditioned (why: UPDATE_TOLERANCE in test_multi_process.py)."""
    return [sum(token % 2 == 0 for token in ids) / max(len(ids), 1) for ids in completion_ids]


extra = {}
if stage == "understanding":
    settings |= dict(reward_weights=[1.0, 0.0, 1.0])
    extra = dict(reward_funcs=[rank_marker, even_token_share],
                 peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
else:
    settings |= dict(decoder_lora_r=4, decoder_lora_alpha=8)
if stage == "generation":
    settings |= dict(ema_decay=0.5, ema_update_interval=1)
if stage == "cold_start":
    settings |= dict(cold_start_trainable=["projector", "llm_lora"])
if variant == "full":
    settings |= dict(pretrain_full_dit=True)
trainer_class = STAGES[stage][1]
if family:  # the family's own default guidance and size
    settings |= dict(decoder_guidance_scale=2.0, decoder_height=32, decoder_width=32)
trainer = trainer_class(model=encoder, decoder=pipe, args=tiny_config(stage, tiny_dir, f"{out}/run", **settings),
                        train_dataset=skimage_photos(32), processing_class=processor, **extra)


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


class CountOptimizerSteps(TrainerCallback):
    """Counts the optimizer steps this run takes: DeepSpeed's engine counts its own (its ZeRO optimizer steps the torch
    optimizer once per parameter group, and a resumed engine starts from the checkpoint's count); otherwise the torch
    optimizer inside accelerate's wrapper is counted."""

    def __init__(self):
        self.hooked_steps = self.engine_steps_at_start = 0

    @property
    def steps(self) -> int:
        if trainer.is_deepspeed_enabled:
            return trainer.deepspeed.global_steps - self.engine_steps_at_start
        return self.hooked_steps

    def on_train_begin(self, args, state, control, **kwargs):
        if trainer.is_deepspeed_enabled:
            self.engine_steps_at_start = trainer.deepspeed.global_steps
        else:
            trainer.optimizer.optimizer.register_step_post_hook(
                lambda *_: setattr(self, "hooked_steps", self.hooked_steps + 1))


record, optimizer_steps = RecordLocal(), CountOptimizerSteps()
trainer.add_callback(record)
trainer.add_callback(optimizer_steps)


def trained_weights():
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {name: value.contiguous() for name, value in full_values(trained_parameters(model)).items()}


def frozen_models() -> dict[str, list[str]]:
    """The frozen models the stage runs (those with no trained weight): which are sharded (all their weights DTensors,
    FSDP2's shards), which whole."""
    models = decoder_models(pipe) | {"encoder": getattr(trainer, "encoder", None)}
    frozen = {name: [*model.parameters()] for name, model in models.items() if isinstance(model, torch.nn.Module)
              and not any(p.requires_grad for p in model.parameters())}
    sharded = sorted(name for name, weights in frozen.items() if all(isinstance(p, DTensor) for p in weights))
    return {"sharded": sharded, "whole": sorted(frozen.keys() - set(sharded))}


os.makedirs(out, exist_ok=True)
save_file(trained_weights(), f"{out}/initial{rank}.safetensors")
trainer.train(resume_from_checkpoint=resume_from)
save_file(trained_weights(), f"{out}/rank{rank}.safetensors")
with open(f"{out}/rank{rank}.json", "w") as file:
    json.dump({"local": record.steps, "log_history": trainer.state.log_history,
               "world_size": trainer.accelerator.num_processes, "optimizer_steps": optimizer_steps.steps,
               "frozen_models": frozen_models(),
               "distributed_type": str(trainer.accelerator.distributed_type),
               # FSDP's checkpoint format (e.g. set for one run of a launch: forked_runs.py's NAME=VALUE)
               "state_dict_type": getattr(getattr(getattr(trainer.accelerator.state, "fsdp_plugin", None),
                                                  "state_dict_type", None), "name", None)}, file)
trainer.accelerator.end_training()  # tears the process group down before exit (gloo's threads can abort at exit)
