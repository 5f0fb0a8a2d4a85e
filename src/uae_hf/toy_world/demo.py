"""`uae-hf demo`: the whole UAE recipe, from nothing, on the toy world, scored on a held-out split after every stage.

Stages, each with the library's own trainer: SFT of the encoder on mostly terse captions (TRL's `SFTTrainer`: a
stand-in for a VLM's habit of short captions), decoder pre-training on detailed captions, cold start, stage 2 (GRPO
on the encoder, the decoder as reward) and stage 3 (the decoder learns from the reward, the encoder frozen) from the
same stage-2 models three times: Flow-GRPO with its CFG sampler, Flow-GRPO without CFG (sampled as DiffusionNFT is)
and DiffusionNFT, so the report compares the objectives both ways. The final `pipeline/` fuses `stage3_objective`'s
DiT LoRA and carries the stage-2 encoder LoRA beside it (`pipeline/encoder_adapter/`); its score is on its card.

Each stage records the settings it was made with; a rerun in the same folder reloads the stages whose settings
match (and says so) and refuses the others, naming the difference, unless `overwrite` retrains them.
"""

import importlib.metadata
import json
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import datasets
import evaluate
import numpy as np
import torch
from diffusers import SD3Transformer2DModel
from peft import LoraConfig, PeftModel
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, ProgressCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from ..hub import make_adapter_config_portable, pipeline_model_card
from ..models.projector import UAEProjector
from ..pipelines.uae_reconstruction.loading import load_uae_pipeline
from ..pipelines.uae_reconstruction.pipeline_uae_reconstruction import (
    MaskedJointAttnProcessor,
    caption_messages,
)
from ..rewards.similarity import get_embedder
from ..round_trip import round_trip
from ..trainer import TRAINERS, ColdStartTrainer, DecoderPretrainingTrainer, UnifiedGRPOTrainer
from ..trainer.decoder_trainer import LORA_WEIGHT_NAME
from ..visualization import reconstruction_grid
from .backbone import attribute_accuracy, predict_attributes, train_toy_backbone
from .models import build_toy_world_models
from .report import timing_text, write_report, write_summary
from .world import (
    DETAIL_LEVELS,
    IMAGE_SIZE,
    caption_accuracy,
    ground_truth,
    toy_world_dataset,
)

STAGES = ("sft", "pretrain", "cold_start", "understanding", "generation", "generation_cfg_free", "generation_nft")
STAGE_TITLES = {
    "sft": "encoder SFT (mostly terse captions)",
    "pretrain": "decoder pre-training (detailed captions)",
    "cold_start": "cold start (semantic reconstruction loss)",
    "understanding": "stage 2: GRPO on the encoder",
    "generation": "stage 3: Flow-GRPO on the decoder",
    "generation_cfg_free": "stage 3: Flow-GRPO on the decoder (sampled without CFG)",
    "generation_nft": "stage 3: DiffusionNFT on the decoder (sampled without CFG)",
}
STAGE3 = ("generation", "generation_cfg_free", "generation_nft")  # each from the stage-2 models; LoRA dropped after
STAGE3_TRAINER = {"generation": "generation", "generation_cfg_free": "generation", "generation_nft": "generation_nft"}
CFG_FREE = ("generation_cfg_free", "generation_nft")  # trained, validated and scored without CFG
STAGE3_CURVES = ("reward", "timing/rollout_s", "timing/reward_s", "timing/update_s", "caption_words/mean")
STAGE_RECORD = "demo_stage.json"  # a finished stage: its settings, held-out scores, training curves and time
# The config fields each stage reads itself ("models": the built models and backbone); a stage's settings are these,
# its predecessors' (a stage-3 run's are those up to stage 2), the fields every stage reads, and the package versions.
STAGE_FIELDS = {
    "models": ("backbone_steps", "vae_steps", "vision_steps"),
    "sft": ("sft_steps", "sft_level_weights", "batch_size"),
    "pretrain": ("pretrain_steps", "batch_size"),
    "cold_start": ("cold_start_steps",),
    "understanding": ("understanding_steps", "understanding_beta", "group_size"),
    "generation": ("generation_steps", "generation_beta", "stage3_learning_rate", "validation_rows", "group_size"),
    "generation_cfg_free": ("generation_steps", "generation_beta", "stage3_learning_rate", "validation_rows",
                            "group_size"),
    "generation_nft": ("generation_nft_steps", "generation_nft_beta", "stage3_learning_rate", "validation_rows",
                       "group_size"),
}
SHARED_FIELDS = ("seed", "quick", "train_rows", "eval_rows", "num_inference_steps", "guidance_scale",
                 "max_caption_tokens")
PACKAGES = ("uae_hf", "torch", "transformers", "diffusers", "trl", "peft", "accelerate")
REFERENCE_ADAPTER = "ref"  # TRL's GRPO keeps its frozen copy of a PEFT model's starting adapter under this name
FINAL_ENCODER_ADAPTER = "encoder_adapter"  # pipeline/'s subfolder with the stage-2 encoder LoRA (see `_save_pipeline`)
SCORING_BATCH = 64  # held-out round trips per pipeline call
HELD_OUT = "held_out"  # the held-out scenes as PNG files, for `uae-hf bench` (the report's command)
LLM_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class ToyDemoConfig:
    """Sizes and budgets of the toy-world demo; the defaults are the full run (23.7 min measured on the project's 2-core
    CPU)."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Where models, stages and the report go."})
    seed: int = field(default=0, metadata={"help": "Seed of the world, the models and every stage."})
    train_rows: int = field(default=8000, metadata={"help": "Training scenes (shared by every stage)."})
    eval_rows: int = field(default=128, metadata={"help": "Held-out scenes scored after every stage."})
    validation_rows: int = field(default=32, metadata={"help": "Validation scenes scored during stage 3."})
    backbone_steps: int = field(default=1000, metadata={"help": "Training steps of the toy backbone."})
    vae_steps: int = field(default=400, metadata={"help": "Training steps of the toy VAE."})
    vision_steps: int = field(default=600, metadata={"help": "Pre-training steps of the encoder's vision tower."})
    batch_size: int = field(default=32, metadata={"help": "Images per step of encoder SFT and decoder pre-training."})
    sft_steps: int = field(default=400, metadata={"help": "Encoder SFT steps."})
    sft_level_weights: tuple[float, ...] = field(
        default=(0.7, 0.1, 0.1, 0.1), metadata={"help": f"SFT caption mix over {DETAIL_LEVELS}."}
    )
    pretrain_steps: int = field(default=3000, metadata={"help": "Decoder pre-training steps."})
    cold_start_steps: int = field(default=20, metadata={"help": "Cold-start steps (batch 8)."})
    group_size: int = field(
        default=8, metadata={"help": "Stages 2 and 3: images per step, and captions (2) or draws (3) per image."}
    )
    understanding_steps: int = field(default=80, metadata={"help": "Stage 2 GRPO steps (group_size² captions)."})
    understanding_beta: float = field(
        default=0.1, metadata={"help": "Stage 2 KL weight, to the encoder as SFT left it (0: no KL)."}
    )
    generation_steps: int = field(default=60, metadata={"help": "Stage 3 Flow-GRPO steps (group_size² draws)."})
    generation_nft_steps: int = field(default=60, metadata={"help": "Stage 3 DiffusionNFT steps (group_size² draws)."})
    stage3_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of every stage-3 run."})
    generation_beta: float = field(default=0.0, metadata={"help": "Stage 3 Flow-GRPO KL weight (0: no KL)."})
    generation_nft_beta: float = field(
        default=1.0, metadata={"help": "Stage 3 DiffusionNFT beta of the implicit policies v_old +- beta (v - v_old)."}
    )
    stage3_objective: str = field(
        default="generation_nft", metadata={"help": "Stage 3 run whose DiT LoRA the final pipeline keeps.",
                                            "choices": list(STAGE3)}
    )
    num_inference_steps: int = field(default=10, metadata={"help": "Decoder sampling steps everywhere."})
    guidance_scale: float = field(default=2.0, metadata={"help": "Decoder CFG scale everywhere."})
    max_caption_tokens: int = field(default=24, metadata={"help": "Caption length limit."})
    quick: bool = field(default=False, metadata={"help": "Plumbing-check budgets (set by `quick_run()`): scores mean nothing."})
    overwrite: bool = field(
        default=False, metadata={"help": "Retrain the stages in output_dir made with other settings (else refuse)."}
    )

    @classmethod
    def quick_run(cls, **overrides) -> "ToyDemoConfig":
        """The same path with tiny budgets, to check the plumbing (its scores mean nothing): for CI and a first look."""
        budgets = dict(train_rows=128, eval_rows=8, validation_rows=4, backbone_steps=15, vae_steps=10, vision_steps=10,
                       batch_size=8, sft_steps=5, pretrain_steps=10, cold_start_steps=1, understanding_steps=2,
                       generation_steps=2, generation_nft_steps=2, group_size=4, num_inference_steps=4, quick=True,
                       output_dir="outputs/demo-quick")
        return cls(**(budgets | overrides))

    @property
    def rollouts_per_step(self) -> int:
        """Captions (stage 2) or draws (stage 3) per RL step: `group_size` images, `group_size` each."""
        return self.group_size ** 2

    def __post_init__(self):
        too_small = {f.name: getattr(self, f.name) for f in fields(self)
                     if f.name.endswith(("_steps", "_rows")) and getattr(self, f.name) < 1}
        if too_small:
            raise ValueError(f"every step and row count must be at least 1, got {too_small}")
        if self.group_size < 2 or self.train_rows < self.rollouts_per_step:
            raise ValueError(f"group_size={self.group_size}, train_rows={self.train_rows}: the RL stages compare at "
                             "least 2 draws per image and draw group_size images per step; pass group_size >= 2 and "
                             "train_rows >= group_size ** 2")
        if self.stage3_learning_rate <= 0 or self.generation_beta < 0 or self.generation_nft_beta <= 0:
            raise ValueError(f"stage3_learning_rate={self.stage3_learning_rate}, generation_beta={self.generation_beta}, "
                             f"generation_nft_beta={self.generation_nft_beta}: pass a positive learning rate and "
                             "DiffusionNFT beta, and a non-negative Flow-GRPO beta")
        if self.stage3_objective not in STAGE3:
            raise ValueError(f"stage3_objective={self.stage3_objective!r}: choose one of {STAGE3}")
        weights = self.sft_level_weights
        if len(weights) != len(DETAIL_LEVELS) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"sft_level_weights={weights}: pass {len(DETAIL_LEVELS)} non-negative weights, one per "
                             f"level of {DETAIL_LEVELS}, with a positive sum")


class HeldOutScorer:
    """Round-trips the held-out split with the current pipeline; Unified-Bench (toy backbone), the attributes the
    backbone reads from each reconstruction, and the attributes each caption states."""

    def __init__(self, eval_dataset: datasets.Dataset, backbone_dir: Path, config: ToyDemoConfig):
        self.images = list(eval_dataset["image"])
        self.truth = ground_truth(eval_dataset)
        self.bench = evaluate.load("unified_bench", "toyworld", checkpoints={"toyworld": str(backbone_dir)})
        embedder = get_embedder("toyworld", str(backbone_dir))  # the very model the metric scores with: loaded once
        self.backbone, self.processor = embedder.model, embedder.processor
        self.config = config

    @torch.no_grad()
    def __call__(self, pipeline, guidance_scale: float, batch_size: int = SCORING_BATCH) -> dict:
        config = self.config
        trips = list(round_trip(
            pipeline, self.images, batch_size, config.seed, do_sample=False, max_new_tokens=config.max_caption_tokens,
            num_inference_steps=config.num_inference_steps, guidance_scale=guidance_scale, height=IMAGE_SIZE,
            width=IMAGE_SIZE,
        ))
        captions = [trip.caption for trip in trips]
        reconstructions = [trip.reconstruction for trip in trips]
        bench = self.bench.compute(predictions=reconstructions, references=self.images)
        attributes = attribute_accuracy(predict_attributes(self.backbone, self.processor, reconstructions), self.truth)
        return {
            "unified_bench": bench["unified_bench"],
            "attribute_accuracy": attributes,
            "caption": caption_accuracy(captions, self.truth) | {"words": float(np.mean([len(c.split()) for c in captions]))},
            "captions": captions,
            "reconstructions": reconstructions,
        }


def sft_lora_config() -> LoraConfig:
    """The encoder adapter of SFT, trained on in stage 2: every linear layer of the LLM, with its own copies of the
    embeddings, head and final norm (the base LLM stays as built: the decoder reads captions with it)."""
    return LoraConfig(r=32, lora_alpha=32, target_modules=LLM_LORA_TARGETS, init_lora_weights="gaussian",
                      modules_to_save=["embed_tokens", "lm_head", "language_model.norm"])


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


class StageProgress(TrainerCallback):
    """A stage's progress bar over its optimizer steps, in place of the Trainer's, which also prints every log
    dictionary (they stay in the stage's `trainer_state.json`)."""

    def __init__(self, description: str):
        self.description = description
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.description, unit="step", leave=False, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def _train(trainer) -> None:
    stage = Path(trainer.args.output_dir).name
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(StageProgress(f"{STAGES.index(stage) + 1}/{len(STAGES)} {stage}"))
    trainer.train()


def _save(trainer) -> None:
    """The stage's weights in their loaders' layouts, its `trainer_state.json` (the log history), a model card."""
    trainer.save_model()
    trainer.save_state()
    trainer.create_model_card(model_name=f"uae-toy-world-{Path(trainer.args.output_dir).name}",
                              dataset_name="uae_hf.toy_world")


def _history(trainer, *keys: str) -> dict[str, list[float]]:
    return {key: [record[key] for record in trainer.state.log_history if key in record] for key in keys}


def _common_args(config: ToyDemoConfig, output_dir: Path, **kwargs) -> dict:
    return dict(output_dir=str(output_dir), seed=config.seed, bf16=False, report_to=[], save_strategy="no",
                activation_checkpointing=False, logging_steps=1, use_cpu=not torch.cuda.is_available(),
                disable_tqdm=False, **kwargs)


class ToyWorldDemo:
    """Runs the recipe stage by stage. Each stage saves its weights, settings and scores under `stages/NAME/`;
    running again in the same folder reloads the stages finished with the same settings instead of training them
    again (delete a stage folder to redo it and every later stage)."""

    def __init__(self, config: ToyDemoConfig):
        self.config = config
        self.out = Path(config.output_dir)
        self.stages_dir = self.out / "stages"
        self.backbone_dir = self.out / "models" / "toyworld-backbone"
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.results: dict = {"config": asdict(config), "stages": {}, "curves": {}, "timings_s": {}}

    # ------------------------------------------------------------------------------------------------------ plumbing
    def _build(self, rebuild: bool) -> None:
        config, models = self.config, self.out / "models"
        self.train = toy_world_dataset(config.train_rows, "train", config.seed)
        held_out = toy_world_dataset(config.eval_rows, "test", config.seed)
        self.validation = toy_world_dataset(config.validation_rows, "validation", config.seed).select_columns(["image"])
        if rebuild:
            train_toy_backbone(self.backbone_dir, steps=config.backbone_steps, seed=config.seed)
            build_toy_world_models(models, vae_steps=config.vae_steps, vision_steps=config.vision_steps, seed=config.seed)
        self.pipeline = load_uae_pipeline(models / "decoder", models / "encoder", models / "projector").to(self.device)
        # the decoder reads captions with the LLM's base weights; encoder adapters only change the captions written
        self.pipeline.register_to_config(conditioning_with_encoder_adapters=False)
        self.pipeline.set_progress_bar_config(disable=True)
        self.score = HeldOutScorer(held_out, self.backbone_dir, config)

    def _args(self, stage: str, **kwargs):
        """The config of `stage`'s trainer with the demo's shared settings."""
        config = self.config
        shared = dict(
            decoder_height=IMAGE_SIZE, decoder_width=IMAGE_SIZE, decoder_num_inference_steps=config.num_inference_steps,
            decoder_guidance_scale=self.guidance(stage), reward_backbones=["toyworld"],
            backbone_checkpoints={"toyworld": str(self.backbone_dir)}, max_completion_length=config.max_caption_tokens,
        )
        trainer = STAGE3_TRAINER.get(stage, stage)
        return TRAINERS[trainer][0](**_common_args(config, self.stages_dir / stage, **kwargs), **shared)

    def guidance(self, stage: str) -> float:
        """The decoder's CFG scale for `stage`'s training and scoring (the `CFG_FREE` runs: none)."""
        return 1.0 if stage in CFG_FREE else self.config.guidance_scale

    def settings(self, stage: str) -> dict:
        """What `stage` was made with: the config fields it and its predecessors read, and the package versions."""
        order = ("models", *STAGES)
        before = order[:order.index("understanding") + 1] if stage in STAGE3 else order[:order.index(stage)]
        names = sorted(set(SHARED_FIELDS).union(*(STAGE_FIELDS[s] for s in (*before, stage))))
        config = asdict(self.config)
        return {name: config[name] for name in names} | {
            "versions": {package: importlib.metadata.version(package) for package in PACKAGES}
        }

    def _stages_to_train(self) -> list[str]:
        """The stages ("models" first) that are not finished here with this run's settings, and every stage after
        one of them; raises before anything is trained if a finished one was made with other settings (unless
        `overwrite`)."""
        to_train: list[str] = []
        for stage in ("models", *STAGES):
            if any(done not in STAGE3 for done in to_train) or not self._reusable(stage):
                to_train.append(stage)
        return to_train

    def _reusable(self, stage: str) -> bool:
        """Whether `stage` is finished here with this run's settings; raises if it was made with others (unless
        `overwrite`: then it is trained again)."""
        path = (self.out / "models" if stage == "models" else self.stages_dir / stage) / STAGE_RECORD
        if not path.exists():
            return False
        made_with = json.loads(path.read_text()).get("settings", {})
        wanted = json.loads(json.dumps(self.settings(stage)))  # as JSON stores it (tuples become lists)
        different = {name: (made_with.get(name, "unrecorded"), value) for name, value in wanted.items()
                     if made_with.get(name, "unrecorded") != value}
        if not different:
            return True
        if self.config.overwrite:
            return False
        named = ", ".join(f"{name} {old!r} (now {new!r})" for name, (old, new) in different.items())
        raise ValueError(f"{path.parent} was made with other settings: {named}. Pass --overwrite to retrain it and "
                         "the stages after it, or choose another --output-dir")

    def _finish(self, stage: str, seconds: float, curves: dict) -> None:
        scores = self.score(self.pipeline, self.guidance(stage))
        grid = reconstruction_grid(self.score.images[:16], scores.pop("reconstructions")[:16], scores["captions"][:16])
        grid.save(self.out / f"reconstructions_{STAGES.index(stage) + 1}_{stage}.png")
        record = {"settings": self.settings(stage), "scores": scores, "curves": curves, "seconds": seconds}
        (self.stages_dir / stage).mkdir(parents=True, exist_ok=True)
        (self.stages_dir / stage / STAGE_RECORD).write_text(json.dumps(record, indent=1))
        self._keep(stage, record)

    def _keep(self, stage: str, record: dict, reloaded: bool = False) -> None:
        """Take a finished stage's record into the results and print its one line."""
        self.results["stages"][stage] = record["scores"]
        self.results["curves"][stage] = record["curves"]
        self.results["timings_s"][stage] = record["seconds"]
        scores = record["scores"]
        made = f"reloaded (trained in {record['seconds']:.0f} s by an earlier run)" if reloaded else \
            f"trained in {record['seconds']:.0f} s"
        tqdm.write(f"[{stage}] {made}: Unified-Bench {scores['unified_bench']:.2f}, attribute accuracy "
                   f"{scores['attribute_accuracy']['mean']:.3f}, caption words {scores['caption']['words']:.2f}")

    # -------------------------------------------------------------------------------------------------------- stages
    def sft(self) -> dict:
        """TRL's SFTTrainer on an encoder LoRA (its own copies of the embeddings, head and final norm; vision tower
        frozen), mostly on terse captions. The base LLM stays as built: it is what the decoder reads captions with."""
        config, vlm = self.config, self.pipeline.vlm
        vlm.requires_grad_(False)
        vlm.add_adapter(sft_lora_config())
        trainer = SFTTrainer(
            model=vlm,
            args=SFTConfig(**_common_args(config, self.stages_dir / "sft", max_steps=config.sft_steps,
                                          per_device_train_batch_size=config.batch_size, learning_rate=3e-3,
                                          lr_scheduler_type="cosine", warmup_steps=min(20, config.sft_steps // 10),
                                          max_length=None)),
            train_dataset=sft_dataset(self.train, config.sft_level_weights, config.seed),
            processing_class=self.pipeline.processor,
        )
        _train(trainer)
        _save(trainer)
        make_adapter_config_portable(trainer.args.output_dir)  # TRL's SFTTrainer writes the base's local path
        vlm.eval()
        return _history(trainer, "loss")

    def load_sft(self) -> None:
        self.pipeline.load_encoder_adapter(str(self.stages_dir / "sft"))

    def pretrain(self) -> dict:
        """Projector + every DiT weight, rectified flow on detailed captions through the frozen encoder."""
        config = self.config
        trainer = DecoderPretrainingTrainer(decoder=self.pipeline, train_dataset=self.train, args=self._args(
            "pretrain", pretrain_full_dit=True, max_steps=config.pretrain_steps,
            per_device_train_batch_size=config.batch_size, learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=min(20, config.pretrain_steps // 10),
            adam_beta2=0.99, weight_decay=0.0, caption_column="caption"))
        _train(trainer)
        _save(trainer)
        return _history(trainer, "loss")

    def load_pretrain(self) -> None:
        folder = self.stages_dir / "pretrain"
        transformer = SD3Transformer2DModel.from_pretrained(folder / "transformer").to(self.device)
        transformer.set_attn_processor(MaskedJointAttnProcessor())  # as load_uae_pipeline does for what it loads
        self.pipeline.transformer = transformer
        self._load_projector(folder)

    def cold_start(self) -> dict:
        """The projector learns from the semantic reconstruction loss through a short sampler."""
        trainer = ColdStartTrainer(decoder=self.pipeline, train_dataset=self.train, args=self._args(
            "cold_start", max_steps=self.config.cold_start_steps, per_device_train_batch_size=8, learning_rate=1e-4,
            caption_column="caption", cold_start_trainable=["projector"]))
        _train(trainer)
        _save(trainer)
        return _history(trainer, "loss")

    def load_cold_start(self) -> None:
        self._load_projector(self.stages_dir / "cold_start")

    def _load_projector(self, folder: Path) -> None:
        self.pipeline.projector = UAEProjector.from_pretrained(folder / "projector").to(self.device)

    def understanding(self) -> dict:
        """Stage 2: GRPO on the SFT adapter, with a KL to the encoder as SFT left it; the decoder, reading captions
        with the base LLM, is the reward.

        Given a PEFT model that already has an adapter and `beta > 0`, TRL's GRPO copies that adapter into a frozen
        one named "ref" and computes the reference log-probs with it: the reference is the SFT'd encoder, not the
        untrained base the adapter-disabled model would be. The copy is dropped before saving, so the saved adapter is
        the trained policy's alone, on the same base as the SFT adapter."""
        config = self.config
        self.pipeline.unload_encoder_adapter()
        policy = PeftModel.from_pretrained(self.pipeline.vlm, self.stages_dir / "sft", is_trainable=True)
        trainer = UnifiedGRPOTrainer(
            policy, self.pipeline, train_dataset=self.train.select_columns(["image"]),
            processing_class=self.pipeline.processor,
            args=self._args("understanding", max_steps=config.understanding_steps,
                            per_device_train_batch_size=config.rollouts_per_step, num_generations=config.group_size,
                            learning_rate=1e-3, temperature=1.0, beta=config.understanding_beta,
                            decoder_text_encoder="frozen", reward_batch_size=config.rollouts_per_step,
                            log_reconstructions_steps=max(1, config.understanding_steps // 4)),
        )
        _train(trainer)
        if REFERENCE_ADAPTER in policy.peft_config:
            policy.delete_adapter(REFERENCE_ADAPTER)
        _save(trainer)
        # PEFT's unload() would keep the trained embedding/head copies as the base: reload the untouched base instead
        self._load_base_encoder()
        self.load_understanding()
        return _history(trainer, "reward", "completions/mean_length", "caption_words/mean", "kl")

    def load_understanding(self) -> None:
        if getattr(self.pipeline.vlm, "_hf_peft_config_loaded", False):  # resuming: the SFT adapter is loaded
            self.pipeline.unload_encoder_adapter()
        self.pipeline.load_encoder_adapter(str(self.stages_dir / "understanding"))

    def _load_base_encoder(self) -> None:
        base = AutoModelForImageTextToText.from_pretrained(self.out / "models" / "encoder")
        self.pipeline.vlm = base.to(self.device).eval()

    def generation(self) -> dict:
        """Stage 3 with Flow-GRPO on a DiT LoRA; captions from the frozen stage-2 encoder."""
        return self._decoder_rl("generation", self.config.generation_steps, timestep_fraction=0.5,
                                same_noise_in_group=True, beta=self.config.generation_beta)

    def generation_cfg_free(self) -> dict:
        """Stage 3 with Flow-GRPO, trained, validated and scored without CFG: sampled as DiffusionNFT is, so the two
        objectives can be compared on one sampler."""
        return self._decoder_rl("generation_cfg_free", self.config.generation_steps, timestep_fraction=0.5,
                                same_noise_in_group=True, beta=self.config.generation_beta)

    def generation_nft(self) -> dict:
        """Stage 3 with DiffusionNFT on a DiT LoRA, from the same stage-2 models (unguided ODE rollouts: the
        initial noise is what varies within a group). CFG-free: validated and scored without CFG, as it samples.
        Rollouts take the Euler step the scoring pipeline samples with: on the toy world they also score higher than
        the reference's DPM-Solver++(2M) rollouts (seed 0, first 5 steps: 0.797 against 0.768)."""
        return self._decoder_rl("generation_nft", self.config.generation_nft_steps, rollout_solver="euler",
                                nft_beta=self.config.generation_nft_beta)

    def _decoder_rl(self, stage: str, steps: int, **settings) -> dict:
        """Train stage 3 with `stage`'s trainer; validation round trips (with the sampler the objective trains for,
        `guidance(stage)`) are scored before training and every sixth of it. No EMA: what is scored is what is kept."""
        trainer = TRAINERS[STAGE3_TRAINER[stage]][1](
            self.pipeline.vlm, self.pipeline, train_dataset=self.train.select_columns(["image"]),
            eval_dataset=self.validation, processing_class=self.pipeline.processor,
            args=self._args(stage, max_steps=steps, per_device_train_batch_size=self.config.rollouts_per_step,
                            num_generations=self.config.group_size,
                            learning_rate=self.config.stage3_learning_rate, decoder_lora_r=16, decoder_lora_alpha=32,
                            eval_strategy="steps", eval_steps=max(1, steps // 6), per_device_eval_batch_size=64,
                            log_reconstructions_steps=max(1, steps // 4), ema_decay=None, **settings),
        )
        before = trainer.evaluate()  # `train()` starts a fresh log history: kept here
        _train(trainer)
        _save(trainer)
        curves = _history(trainer, *STAGE3_CURVES)
        evaluations = [dict(before, step=0)] + [record for record in trainer.state.log_history if "eval_reward" in record]
        curves["eval_step"] = [record["step"] for record in evaluations]
        curves["eval_reward"] = [record["eval_reward"] for record in evaluations]
        return curves  # the LoRA stays on for scoring; `_drop_dit_lora` removes it

    def _drop_dit_lora(self) -> None:
        self.pipeline.transformer.delete_adapters(["default"])

    def _keep_stage3(self, stage: str) -> None:
        """The final pipeline's DiT: `stage`'s LoRA fused in."""
        self.pipeline.load_lora_weights(self.stages_dir / stage, weight_name=LORA_WEIGHT_NAME)
        self.pipeline.fuse_lora()
        self.pipeline.unload_lora_weights()

    def _save_pipeline(self) -> None:
        """`pipeline/`, the final model: the decoder (the cold-start projector; stage 3's `stage3_objective` LoRA fused
        into the DiT), the encoder's base weights, which the decoder reads captions with, and in `encoder_adapter/` the
        stage-2 encoder LoRA that writes the captions. The LoRA stays an adapter: merged, it would also change how the
        decoder reads captions, which it was trained to read with the base weights. The card's score is this folder's,
        scored here as loaded that way (pipeline plus adapter)."""
        folder = self.out / "pipeline"
        self._keep_stage3(self.config.stage3_objective)
        self.pipeline.unload_encoder_adapter()  # the pipeline saves the base encoder; the adapter goes beside it
        self.pipeline.save_pretrained(folder)
        adapter = folder / FINAL_ENCODER_ADAPTER
        adapter.mkdir(exist_ok=True)
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copyfile(self.stages_dir / "understanding" / name, adapter / name)
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "../vlm"  # the pipeline's encoder: the base the LoRA was trained on
        (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        self.pipeline.load_encoder_adapter(str(adapter))
        scores = self.score(self.pipeline, self.guidance(self.config.stage3_objective))
        self.results["pipeline"] = {"unified_bench": scores["unified_bench"], "stage": self.config.stage3_objective,
                                    "guidance_scale": self.guidance(self.config.stage3_objective),
                                    "command": self._bench_command()}
        (folder / "README.md").write_text(pipeline_model_card(
            self.pipeline, "your-username/uae-toy-world", unified_bench={"toyworld": scores["unified_bench"]},
            encoder_adapter_folder=FINAL_ENCODER_ADAPTER))
        tqdm.write(f"[pipeline] Unified-Bench {scores['unified_bench']:.2f}: {folder} with its {FINAL_ENCODER_ADAPTER}")

    def _bench_command(self) -> str:
        """The `uae-hf bench` command that scores `pipeline/` (with its encoder adapter) on `held_out/` as the demo
        does: its settings, float32 (as the demo runs), one seed per scene from `seed`, greedy captions."""
        config, pipeline = self.config, self.out / "pipeline"
        arguments = [
            "uae-hf", "bench", "--images-dir", self.out / HELD_OUT, "--pipeline", pipeline,
            "--encoder-adapter", pipeline / FINAL_ENCODER_ADAPTER, "--backbones", "toyworld",
            "--checkpoint", f"toyworld={self.backbone_dir}", "--height", IMAGE_SIZE, "--width", IMAGE_SIZE,
            "--num-inference-steps", config.num_inference_steps,
            "--guidance-scale", self.guidance(config.stage3_objective), "--temperature", 0,
            "--max-new-tokens", config.max_caption_tokens, "--seed", config.seed, "--batch-size", SCORING_BATCH,
            "--dtype", "float32", "--output-dir", self.out / "bench", "--overwrite",
        ]
        return shlex.join(str(argument) for argument in arguments)

    def _save_held_out(self) -> None:
        """The held-out scenes as `held_out/scene_NNN.png`, in order: what `uae-hf bench` reads to score `pipeline/`."""
        folder = self.out / HELD_OUT
        folder.mkdir(exist_ok=True)
        for index, image in enumerate(self.score.images):
            image.save(folder / f"scene_{index:03d}.png")

    # ----------------------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        """Build (or reload) the models, run (or reload) every stage, save the final pipeline, write the report."""
        torch.set_flush_denormal(True)  # tiny models on CPU slow down several-fold on denormal floats otherwise
        self.out.mkdir(parents=True, exist_ok=True)
        to_train = self._stages_to_train()
        started = time.perf_counter()
        timings = self.results["timings_s"]
        self._build(rebuild="models" in to_train)
        models_record = self.out / "models" / STAGE_RECORD
        if "models" in to_train:
            timings["build"] = time.perf_counter() - started
            models_record.write_text(json.dumps({"settings": self.settings("models"), "seconds": timings["build"]},
                                                indent=1))
        else:  # the time it took when it was built (not recorded before the demo recorded it)
            timings["build"] = json.loads(models_record.read_text()).get("seconds", 0.0)
        self._save_held_out()
        for stage in STAGES:
            if stage not in to_train:
                if stage not in STAGE3:  # a stage-3 run leaves nothing behind for the next stage
                    getattr(self, f"load_{stage}")()
                self._keep(stage, json.loads((self.stages_dir / stage / STAGE_RECORD).read_text()), reloaded=True)
                continue
            stage_start = time.perf_counter()
            curves = getattr(self, stage)()
            self._finish(stage, time.perf_counter() - stage_start, curves)
            if stage in STAGE3:
                self._drop_dit_lora()
        self._save_pipeline()
        self.results["reloaded"] = [stage for stage in ("models", *STAGES) if stage not in to_train]
        timings["run"] = time.perf_counter() - started
        # what making everything took: reloaded parts count the time they took when they were made
        timings["total"] = timings["run"] + sum(timings["build" if stage == "models" else stage]
                                                for stage in self.results["reloaded"])
        tqdm.write(f"[time] {timing_text(self.results)}")
        write_report(self.results, self.out, STAGE_TITLES)
        return self.results


def run_demo(config: ToyDemoConfig) -> dict:
    """Build everything, run every stage, score after each, write the report; returns the results."""
    return ToyWorldDemo(config).run()


def run_demo_seeds(config: ToyDemoConfig, seeds: int) -> dict:
    """The whole demo once per seed (`config.seed`, `+1`, ...), each in `output_dir/seed-N/` with its own report, then
    `summary.md` / `summary.json` in `output_dir`: the mean and range over seeds of every table entry."""
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    runs = {}
    for seed in range(config.seed, config.seed + seeds):
        folder = Path(config.output_dir) / f"seed-{seed}"
        runs[seed] = run_demo(replace(config, seed=seed, output_dir=str(folder)))
    return write_summary(runs, Path(config.output_dir), STAGE_TITLES)


def demo_config_from_args(args) -> ToyDemoConfig:
    """A `ToyDemoConfig` from the CLI's namespace (`--quick` picks the small budgets; explicit flags win)."""
    overrides = {f.name: getattr(args, f.name) for f in fields(ToyDemoConfig) if getattr(args, f.name, None) is not None}
    return ToyDemoConfig.quick_run(**overrides) if args.quick else ToyDemoConfig(**overrides)
