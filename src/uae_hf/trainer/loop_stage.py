"""Common ground of the stages that run on transformers' `Trainer` loop instead of GRPO's rollout machinery
("generation", "pretrain", "cold_start"): the decoder and encoder handles, data loading, metric logging, and
handing the decoder back with its plain forward after training."""

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from diffusers.training_utils import cast_training_params
from huggingface_hub import ModelCard, ModelCardData
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer

from ..hub import MODEL_CARDS, model_source
from ..pipelines.uae_reconstruction.pipeline_uae_reconstruction import UAEReconstructionPipeline
from .unified_grpo_config import DIT_LORA_TARGETS, UnifiedGRPOConfig
from .unified_grpo_trainer import UnifiedGRPOTrainer, as_decoder, check_image_column

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
RESUME_STATE_NAME = "resume_state.safetensors"


def dataset_captions(rows: list[dict], column: str) -> list[str | None]:
    """Each row's caption from `column`; `None` where it is missing, empty or only whitespace."""
    captions = []
    for row in rows:
        value = row.get(column)
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{column!r} holds a {type(value).__name__} ({str(value)[:60]!r}); captions must be strings")
        captions.append(value if value and value.strip() else None)
    return captions


class TrainerLoopStage(UnifiedGRPOTrainer):
    """Base of the non-GRPO stages; subclasses build `model` (what trains) and define `training_step`/`compute_loss`."""

    _ema: dict[str, torch.Tensor] | None = None  # EMA of the trained weights (stage "generation")

    def _setup_parts(self, model, decoder, args: UnifiedGRPOConfig, train_dataset, processing_class, reward_funcs):
        if reward_funcs:
            raise ValueError(f'stage "{args.stage}" has its own objective; reward_funcs are for stage "understanding"')
        check_image_column(train_dataset, "train_dataset")
        self.decoder = as_decoder(decoder)
        self.decoder.set_progress_bar_config(disable=True)
        if isinstance(model, str):
            processing_class = processing_class or AutoProcessor.from_pretrained(model)
            model = AutoModelForImageTextToText.from_pretrained(model)
        self.encoder = model if model is not None else self.decoder.vlm
        self.caption_processor = processing_class or self.decoder.processor
        for component in [*self.decoder.components.values(), self.encoder]:
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False).eval()
        if args.activation_checkpointing:  # diffusers' API, not transformers': the stage enables it itself
            self.decoder.transformer.enable_gradient_checkpointing()
            args.activation_checkpointing = args.gradient_checkpointing = False
        self._stage_metrics = defaultdict(list)

    def _init_trainer(self, model, args, train_dataset, eval_dataset, callbacks, optimizers, images_per_device):
        full_dit = args.pretrain_full_dit if args.stage == "pretrain" else args.decoder_full_finetune
        if not (full_dit and args.stage in ("pretrain", "generation")):
            # adapters and the projector keep float32 master weights (as PEFT keeps adapters), whatever dtype the
            # frozen models run in: bf16 AdamW updates would round away. A fully fine-tuned DiT keeps its own dtype
            # (fp32 masters for it are FSDP's or DeepSpeed's mixed precision).
            cast_training_params(model, torch.float32)
        Trainer.__init__(self, model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         data_collator=list, callbacks=callbacks, optimizers=optimizers)
        self._train_batch_size = images_per_device
        self.decoder.to(self.accelerator.device)
        if self.encoder is not None:
            self.encoder.to(self.accelerator.device)

    @staticmethod
    def add_dit_lora(transformer, args: UnifiedGRPOConfig, peft_config=None) -> None:
        """The DiT LoRA: `peft_config`, or r=`decoder_lora_r`/alpha=`decoder_lora_alpha` on the joint attention."""
        lora = peft_config or LoraConfig(r=args.decoder_lora_r, lora_alpha=args.decoder_lora_alpha,
                                         init_lora_weights="gaussian", target_modules=DIT_LORA_TARGETS)
        with torch.random.fork_rng():  # a seeded init that leaves the global RNG alone
            torch.manual_seed(args.seed)
            transformer.add_adapter(lora)

    @staticmethod
    def save_dit_lora(transformer, output_dir: Path, weights: dict | None = None) -> None:
        """The DiT LoRA as a diffusers LoRA file, with its adapter metadata so `alpha` survives."""
        state = dict(transformer.state_dict()) | (weights or {})
        UAEReconstructionPipeline.save_lora_weights(
            output_dir, transformer_lora_layers=get_peft_model_state_dict(transformer, state_dict=state),
            transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
            weight_name=LORA_WEIGHT_NAME,
        )

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """What `save_parts` writes, plus the training arguments, as `Trainer` saves them."""
        output_dir = Path(output_dir or self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.save_parts(output_dir)
        torch.save(self.args, output_dir / "training_args.bin")

    def _save_resume_state(self, folder: Path) -> None:
        """The trained weights as they are (the saved parts may hold their EMA instead) and the EMA, exactly."""
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        state = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
        state |= {f"ema.{name}": value.contiguous() for name, value in (self._ema or {}).items()}
        save_file(state, folder / RESUME_STATE_NAME)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        path = Path(resume_from_checkpoint) / RESUME_STATE_NAME
        if not path.is_file():
            raise ValueError(f"{resume_from_checkpoint} has no {RESUME_STATE_NAME}: resume from a checkpoint-N folder "
                             f'that stage "{self.args.stage}" wrote during training')
        state = load_file(path)
        parameters = dict(self.accelerator.unwrap_model(model or self.model).named_parameters())
        trained = {name for name, p in parameters.items() if p.requires_grad}
        saved = {name for name in state if not name.startswith("ema.")}
        if saved != trained:
            raise ValueError(
                f"{path} does not match this run's trained weights (missing: {sorted(trained - saved)[:3]}, "
                f"unexpected: {sorted(saved - trained)[:3]}): resume with the stage settings of the original run"
            )
        with torch.no_grad():
            for name in trained:
                parameters[name].copy_(state[name])
            for name, value in (self._ema or {}).items():
                value.copy_(state[f"ema.{name}"])

    def save_parts(self, output_dir: Path) -> None:
        """Write the trained parts, each in the layout its loader reads (defined by each stage)."""
        raise NotImplementedError

    def train(self, *args, **kwargs):
        """Trainer's loop; afterwards the trained modules' forwards are restored (accelerate wraps them for mixed
        precision), so the pipeline computes exactly what the saved weights compute in a fresh pipeline."""
        try:
            return Trainer.train(self, *args, **kwargs)
        finally:
            self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)

    # Trainer's own step (GRPO's buffers generations), data loading (GRPO's repeats prompts per generation) and
    # checkpoints (GRPO's add the state of its own rollout machinery).
    def _write_checkpoint(self, model, trial) -> None:
        Trainer._save_checkpoint(self, model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        Trainer._load_optimizer_and_scheduler(self, checkpoint)

    def _prepare_inputs(self, inputs):
        return inputs

    def training_step(self, model, inputs, num_items_in_batch=None):
        return Trainer.training_step(self, model, inputs, num_items_in_batch)

    def _step_generator(self) -> torch.Generator:
        """This step's and process's random stream; with `reward_fixed_noise`, the same one at every step."""
        step = 0 if self.args.reward_fixed_noise else self.state.global_step
        return torch.Generator().manual_seed(self.args.seed * 1_000_003 + step * 10_007 + self.accelerator.process_index)

    def get_train_dataloader(self):
        return Trainer.get_train_dataloader(self)

    def _get_train_sampler(self, dataset=None):
        return Trainer._get_train_sampler(self, dataset)

    def _set_signature_columns_if_needed(self):
        self._signature_columns = ["image", "images"]

    _STAGE_DESCRIPTIONS = {
        "pretrain": "rectified-flow pre-training of projector and DiT on long captions",
        "cold_start": "semantic reconstruction loss through a short sampler",
    }

    def saved_files(self) -> list[tuple[str, str, str]]:
        """(path, content, how to load) for each artefact `_save` writes."""
        parts = set(self.args.cold_start_trainable) if self.args.stage == "cold_start" else {"projector", "dit_lora"}
        if self.args.stage == "pretrain" and self.args.pretrain_full_dit:
            parts = {"projector", "transformer"}
        rows = {
            "projector": ("projector/", "UAEProjector", "`UAEProjector.from_pretrained(...)` or `projector=` of a pipeline"),
            "dit_lora": (LORA_WEIGHT_NAME, "DiT LoRA (diffusers format)",
                         f'`pipe.load_lora_weights(..., weight_name="{LORA_WEIGHT_NAME}")`'),
            "transformer": ("transformer/", "full SD3Transformer2DModel", "`SD3Transformer2DModel.from_pretrained`"),
            "llm_lora": ("encoder_adapter/", "LLM LoRA (PEFT adapter)", "`pipe.load_encoder_adapter(...)`"),
        }
        return [rows[part] for part in ("projector", "transformer", "dit_lora", "llm_lora") if part in parts]

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None):
        """Write `output_dir/README.md`: what was trained and how each saved file loads."""
        if not self.is_world_process_zero():
            return
        card = ModelCard.from_template(
            ModelCardData(library_name="diffusers", license="other", tags=self._card_tags(tags),
                          datasets=[dataset_name] if dataset_name else None),
            template_path=str(MODEL_CARDS / "uae_stage_weights.md"),
            model_name=model_name or Path(self.args.output_dir).name,
            stage=self.args.stage,
            stage_description=self._STAGE_DESCRIPTIONS.get(self.args.stage, self.args.stage),
            decoder=model_source(self.decoder.transformer),
            files=self.saved_files(),
            metrics=self._latest_metrics(),
        )
        card.save(Path(self.args.output_dir, "README.md"))

    def _record(self, metrics: dict) -> None:
        for name, value in metrics.items():
            self._stage_metrics[name].append(value)

    def log(self, logs: dict, start_time=None) -> None:
        """Log the stage's metrics averaged over the logging window and over all processes."""
        local = {name: float(np.mean(values)) for name, values in self._stage_metrics.items()}
        self._stage_metrics.clear()
        everyone = gather_object([local]) if self.accelerator.num_processes > 1 else [local]
        names = sorted(set().union(*everyone))
        metrics = {name: float(np.mean([values[name] for values in everyone if name in values])) for name in names}
        Trainer.log(self, {**logs, **metrics}, start_time)
