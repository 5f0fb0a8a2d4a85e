"""`uae-hf demo`: the whole UAE recipe, from nothing, on the toy world, scored on a held-out split after every stage.

Stages, each with the library's own trainer: SFT of the encoder on mostly terse captions (TRL's `SFTTrainer`: a
stand-in for a VLM's habit of short captions), decoder pre-training on detailed captions, cold start, stage 2 (GRPO
on the encoder, the decoder as reward) and stage 3 (Flow-GRPO on the decoder, the encoder frozen).
"""

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import datasets
import evaluate
import numpy as np
import torch
from peft import LoraConfig
from tqdm.auto import tqdm
from transformers import AutoImageProcessor
from trl import SFTConfig, SFTTrainer

from ..pipelines.uae_reconstruction.loading import load_uae_pipeline
from ..pipelines.uae_reconstruction.pipeline_uae_reconstruction import caption_messages
from ..trainer import UnifiedGRPOConfig, UnifiedGRPOTrainer
from ..visualization import reconstruction_grid
from .backbone import ToyWorldVisionModel, attribute_accuracy, predict_attributes, train_toy_backbone
from .models import build_toy_world_models
from .report import write_report
from .world import ATTRIBUTES, DETAIL_LEVELS, IMAGE_SIZE, caption_accuracy, toy_world_dataset

STAGES = ("sft", "pretrain", "cold_start", "understanding", "generation")
STAGE_TITLES = {
    "sft": "encoder SFT (mostly terse captions)",
    "pretrain": "decoder pre-training (detailed captions)",
    "cold_start": "cold start (semantic reconstruction loss)",
    "understanding": "stage 2: GRPO on the encoder",
    "generation": "stage 3: Flow-GRPO on the decoder",
}
LLM_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class ToyDemoConfig:
    """Sizes and budgets of the toy-world demo; the defaults are the full run (about 20 minutes on 2 CPU cores)."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Where models, stages and the report go."})
    seed: int = field(default=0, metadata={"help": "Seed of the world, the models and every stage."})
    train_rows: int = field(default=8000, metadata={"help": "Training scenes (shared by every stage)."})
    eval_rows: int = field(default=128, metadata={"help": "Held-out scenes scored after every stage."})
    backbone_steps: int = field(default=1000, metadata={"help": "Training steps of the toy backbone."})
    vae_steps: int = field(default=400, metadata={"help": "Training steps of the toy VAE."})
    sft_steps: int = field(default=400, metadata={"help": "Encoder SFT steps (batch 32)."})
    sft_level_weights: tuple[float, ...] = field(
        default=(0.7, 0.1, 0.1, 0.1), metadata={"help": f"SFT caption mix over {DETAIL_LEVELS}."}
    )
    pretrain_steps: int = field(default=3000, metadata={"help": "Decoder pre-training steps (batch 32)."})
    cold_start_steps: int = field(default=20, metadata={"help": "Cold-start steps (batch 8)."})
    understanding_steps: int = field(default=80, metadata={"help": "Stage 2 GRPO steps (8 images x 8 captions)."})
    generation_steps: int = field(default=60, metadata={"help": "Stage 3 Flow-GRPO steps (8 images x 8 draws)."})
    num_inference_steps: int = field(default=10, metadata={"help": "Decoder sampling steps everywhere."})
    guidance_scale: float = field(default=2.0, metadata={"help": "Decoder CFG scale everywhere."})
    max_caption_tokens: int = field(default=24, metadata={"help": "Caption length limit."})

    @classmethod
    def quick(cls, **overrides) -> "ToyDemoConfig":
        """The same path with tiny budgets (a couple of minutes): for CI and a first look."""
        budgets = dict(train_rows=512, eval_rows=16, backbone_steps=60, vae_steps=30, sft_steps=20, pretrain_steps=30,
                       cold_start_steps=2, understanding_steps=3, generation_steps=2)
        return cls(**(budgets | overrides))


class HeldOutScorer:
    """Round-trips the held-out split with the current pipeline; Unified-Bench (toy backbone), the attributes the
    backbone reads from each reconstruction, and the attributes each caption states."""

    def __init__(self, eval_dataset: datasets.Dataset, backbone_dir: Path, config: ToyDemoConfig):
        self.images = list(eval_dataset["image"])
        self.truth = {name: [eval_dataset.features[name].int2str(v) for v in eval_dataset[name]] for name in ATTRIBUTES}
        self.bench = evaluate.load("unified_bench", "toyworld", checkpoints={"toyworld": str(backbone_dir)})
        self.backbone = ToyWorldVisionModel.from_pretrained(backbone_dir).eval()
        self.processor = AutoImageProcessor.from_pretrained(backbone_dir)
        self.config = config

    @torch.no_grad()
    def __call__(self, pipeline, batch_size: int = 64) -> dict:
        captions, reconstructions = [], []
        for start in range(0, len(self.images), batch_size):
            batch = self.images[start : start + batch_size]
            output = pipeline(
                image=batch,
                do_sample=False,
                max_new_tokens=self.config.max_caption_tokens,
                num_inference_steps=self.config.num_inference_steps,
                guidance_scale=self.config.guidance_scale,
                height=IMAGE_SIZE,
                width=IMAGE_SIZE,
                generator=[torch.Generator().manual_seed(self.config.seed + start + i) for i in range(len(batch))],
            )
            captions += output.captions
            reconstructions += output.images
        bench = self.bench.compute(predictions=reconstructions, references=self.images)
        attributes = attribute_accuracy(predict_attributes(self.backbone, self.processor, reconstructions), self.truth)
        return {
            "unified_bench": bench["unified_bench"],
            "attribute_accuracy": attributes,
            "caption": caption_accuracy(captions, self.truth) | {"words": float(np.mean([len(c.split()) for c in captions]))},
            "captions": captions,
            "reconstructions": reconstructions,
        }


def sft_dataset(train: datasets.Dataset, weights, seed: int) -> datasets.Dataset:
    """Prompt-completion rows for TRL's SFT: the UAE captioning prompt, the image, a caption at a drawn level."""
    rng = np.random.default_rng(seed)
    levels = rng.choice(len(DETAIL_LEVELS), size=len(train), p=np.asarray(weights) / np.sum(weights))
    columns = {level: train["caption" if level == "full" else f"caption_{level}"] for level in DETAIL_LEVELS}
    return datasets.Dataset.from_dict({
        "images": [[image] for image in train["image"]],
        "prompt": [caption_messages()] * len(train),
        "completion": [
            [{"role": "assistant", "content": [{"type": "text", "text": columns[DETAIL_LEVELS[level]][index]}]}]
            for index, level in enumerate(levels)
        ],
    })


def _history(trainer, *keys: str) -> dict[str, list[float]]:
    return {key: [record[key] for record in trainer.state.log_history if key in record] for key in keys}


def _common_args(config: ToyDemoConfig, output_dir: Path, **kwargs) -> dict:
    return dict(output_dir=str(output_dir), seed=config.seed, bf16=False, report_to=[], save_strategy="no",
                logging_steps=1, use_cpu=not torch.cuda.is_available(), disable_tqdm=False, **kwargs)


def _uae_args(config: ToyDemoConfig, output_dir: Path, backbone_dir: Path, **kwargs) -> UnifiedGRPOConfig:
    return UnifiedGRPOConfig(
        **_common_args(config, output_dir, **kwargs),
        decoder_height=IMAGE_SIZE, decoder_width=IMAGE_SIZE,
        decoder_num_inference_steps=config.num_inference_steps, decoder_guidance_scale=config.guidance_scale,
        reward_backbones=["toyworld"], backbone_checkpoints={"toyworld": str(backbone_dir)},
        max_completion_length=config.max_caption_tokens,
    )


def run_demo(config: ToyDemoConfig) -> dict:
    """Build everything, run the five stages, score after each, write the report; returns the results."""
    torch.set_flush_denormal(True)  # tiny models on CPU slow down several-fold on denormal floats otherwise
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    timings: dict[str, float] = {}
    started = time.perf_counter()

    train = toy_world_dataset(config.train_rows, "train", config.seed)
    held_out = toy_world_dataset(config.eval_rows, "test", config.seed)
    backbone_dir = out / "models" / "toyworld-backbone"
    train_toy_backbone(backbone_dir, steps=config.backbone_steps, seed=config.seed)
    build_toy_world_models(out / "models", vae_steps=config.vae_steps, seed=config.seed)
    timings["build"] = time.perf_counter() - started

    pipeline = load_uae_pipeline(out / "models" / "decoder", out / "models" / "encoder", out / "models" / "projector")
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    encoder = pipeline.vlm
    score = HeldOutScorer(held_out, backbone_dir, config)
    stages_dir = out / "stages"
    results: dict = {"config": asdict(config), "stages": {}, "curves": {}}

    def finish(stage: str, stage_start: float, curves: dict | None = None) -> None:
        timings[stage] = time.perf_counter() - stage_start
        scores = score(pipeline)
        grid = reconstruction_grid(score.images[:16], scores.pop("reconstructions")[:16], scores["captions"][:16])
        grid.save(out / f"reconstructions_{STAGES.index(stage) + 1}_{stage}.png")
        results["stages"][stage] = scores
        results["curves"][stage] = curves or {}
        tqdm.write(f"[{stage}] Unified-Bench {scores['unified_bench']:.2f}, attribute accuracy "
                   f"{scores['attribute_accuracy']['mean']:.3f}, caption words {scores['caption']['words']:.2f}")

    # 1. encoder SFT: full fine-tuning of the from-scratch VLM, mostly on terse captions
    stage_start = time.perf_counter()
    sft = SFTTrainer(
        model=encoder,
        args=SFTConfig(**_common_args(config, stages_dir / "sft", max_steps=config.sft_steps,
                                      per_device_train_batch_size=32, learning_rate=1e-3, lr_scheduler_type="cosine",
                                      warmup_steps=min(20, config.sft_steps // 10), max_length=None)),
        train_dataset=sft_dataset(train, config.sft_level_weights, config.seed),
        processing_class=pipeline.processor,
    )
    sft.train()
    encoder.eval()
    finish("sft", stage_start, _history(sft, "loss"))

    # 2. decoder pre-training: projector + every DiT weight, on detailed captions through the frozen encoder
    stage_start = time.perf_counter()
    pretrain = UnifiedGRPOTrainer(
        None, pipeline, train_dataset=train,
        args=_uae_args(config, stages_dir / "pretrain", backbone_dir, stage="pretrain", pretrain_full_dit=True,
                       max_steps=config.pretrain_steps, per_device_train_batch_size=32, learning_rate=2e-3,
                       lr_scheduler_type="cosine", warmup_steps=min(20, config.pretrain_steps // 10), adam_beta2=0.99,
                       weight_decay=0.0, caption_column="caption"),
    )
    pretrain.train()
    finish("pretrain", stage_start, _history(pretrain, "loss"))

    # 3. cold start: the projector learns from the semantic reconstruction loss through a short sampler
    stage_start = time.perf_counter()
    cold_start = UnifiedGRPOTrainer(
        None, pipeline, train_dataset=train,
        args=_uae_args(config, stages_dir / "cold_start", backbone_dir, stage="cold_start",
                       max_steps=config.cold_start_steps, per_device_train_batch_size=8, learning_rate=1e-4,
                       caption_column="caption", cold_start_trainable=["projector"]),
    )
    cold_start.train()
    cold_start.save_model()
    finish("cold_start", stage_start, _history(cold_start, "loss"))

    # 4. stage 2: GRPO on an encoder LoRA, the decoder (reading captions through the policy) as the reward
    stage_start = time.perf_counter()
    understanding = UnifiedGRPOTrainer(
        encoder, pipeline, train_dataset=train.select_columns(["image"]), processing_class=pipeline.processor,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=LLM_LORA_TARGETS, init_lora_weights="gaussian"),
        args=_uae_args(config, stages_dir / "understanding", backbone_dir, stage="understanding",
                       max_steps=config.understanding_steps, per_device_train_batch_size=64, num_generations=8,
                       learning_rate=1e-3, temperature=1.0, beta=0.02, decoder_text_encoder="policy",
                       reward_batch_size=64, log_reconstructions_steps=max(1, config.understanding_steps // 4)),
    )
    understanding.train()
    understanding.save_model()
    encoder = understanding.accelerator.unwrap_model(understanding.model).merge_and_unload()
    pipeline.vlm = encoder
    finish("understanding", stage_start,
           _history(understanding, "reward", "completions/mean_length", "caption_words/mean"))

    # 5. stage 3: Flow-GRPO on a DiT LoRA, captions from the frozen stage-2 encoder
    stage_start = time.perf_counter()
    generation = UnifiedGRPOTrainer(
        encoder, pipeline, train_dataset=train.select_columns(["image"]), processing_class=pipeline.processor,
        args=_uae_args(config, stages_dir / "generation", backbone_dir, stage="generation",
                       max_steps=config.generation_steps, per_device_train_batch_size=64, num_generations=8,
                       learning_rate=1e-3, decoder_lora_r=16, decoder_lora_alpha=32, timestep_fraction=0.5,
                       beta=0.0, same_noise_in_group=True,
                       log_reconstructions_steps=max(1, config.generation_steps // 4)),
    )
    generation.train()
    generation.save_model()
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    finish("generation", stage_start, _history(generation, "reward", "caption_words/mean"))

    pipeline.save_pretrained(out / "pipeline")
    timings["total"] = time.perf_counter() - started
    results["timings_s"] = timings
    write_report(results, out, STAGE_TITLES)
    return results


def demo_config_from_args(args) -> ToyDemoConfig:
    """A `ToyDemoConfig` from the CLI's namespace (`--quick` picks the small budgets; explicit flags win)."""
    overrides = {f.name: getattr(args, f.name) for f in fields(ToyDemoConfig) if getattr(args, f.name, None) is not None}
    return ToyDemoConfig.quick(**overrides) if args.quick else ToyDemoConfig(**overrides)
