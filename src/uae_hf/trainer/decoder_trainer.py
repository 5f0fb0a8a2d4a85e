"""[`DecoderTrainer`]: transformers' `Trainer` for the parts of a UAE decoder, the base of [`FlowGRPOTrainer`],
[`DecoderPretrainingTrainer`] and [`ColdStartTrainer`]. It holds the decoder and the encoder that captions for it,
the reconstruction reward, atomic and exactly resumable checkpoints, per-stage metric logging, the held-out round
trip of `evaluate()`, and the saving of the trained parts in their loaders' layouts."""

import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from diffusers.training_utils import cast_training_params
from huggingface_hub import ModelCard, ModelCardData, save_torch_state_dict
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import FSDPModule
from transformers import Trainer

from ..decoders import decoder_family
from ..hub import MODEL_CARDS, model_source
from ..images import load_image
from ..pipelines.uae_reconstruction.loading import load_encoder
from ..pipelines.uae_reconstruction.pipeline_uae_reconstruction import UAEReconstructionPipeline, caption_images
from ..seeding import seeded_generators, stream_seed
from .checkpointing import AtomicCheckpoints
from .decoder_reward import (
    ReconstructionGrids,
    build_reconstruction_reward,
    check_image_column,
    use_diffusers_tensorboard,
)
from .decoder_training_config import DecoderTrainingConfig
from .frozen_sharding import decoder_models, shard_frozen_models
from .model_card import card_tags, latest_metrics
from .sharded_parameters import assign, full_values, trained_parameters, whole_model_loading

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
RESUME_STATE_NAME = "resume_state.safetensors"
# (path, content, how to load) rows of the model cards
DIT_LORA_FILE = (LORA_WEIGHT_NAME, "DiT LoRA (diffusers format)",
                 f'`pipe.load_lora_weights(..., weight_name="{LORA_WEIGHT_NAME}")`')
PROJECTOR_FILE = ("projector/", "UAEProjector", "`UAEProjector.from_pretrained(...)` or `projector=` of a pipeline")
# what each random stream is for (the second part of its `stream_seed`)
TRAIN_STREAM, EVAL_STREAM, CAPTION_STREAM = 0, 1, 2


def dataset_captions(rows: list[dict], column: str) -> list[str | None]:
    """Each row's caption from `column`; `None` where it is missing, empty or only whitespace."""
    captions = []
    for row in rows:
        value = row.get(column)
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{column!r} holds a {type(value).__name__} ({str(value)[:60]!r}); captions must be strings")
        captions.append(value if value and value.strip() else None)
    return captions


def submodule_weights(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `weights` under `prefix.`, named relative to that submodule."""
    return {name.removeprefix(f"{prefix}."): value for name, value in weights.items() if name.startswith(f"{prefix}.")}


def save_diffusers_model(model, directory: Path, weights: dict[str, torch.Tensor]) -> None:
    """`model` (a diffusers `ModelMixin`) in its `save_pretrained` layout, with `weights` (whole values by name) in
    place of its parameters; its buffers as they are. (`ModelMixin.save_pretrained` takes no state dict.)"""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_config(directory)
    parameters = {name for name, _ in model.named_parameters()}
    if set(weights) != parameters:
        raise ValueError(f"weights for {type(model).__name__} miss {sorted(parameters - set(weights))[:3]}")
    state = {name: value for name, value in model.state_dict().items() if name not in parameters} | weights
    save_torch_state_dict({name: value.contiguous() for name, value in state.items()}, directory,
                          filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB")


def row_images(rows: list[dict]) -> list:
    """Each row's image (`image`, or the first of `images`) as 8-bit RGB."""
    return [load_image(row["image"] if "image" in row else row["images"][0], f"image[{index}]")
            for index, row in enumerate(rows)]


class DecoderTrainer(AtomicCheckpoints, ReconstructionGrids, Trainer):
    """Base of the trainers of a UAE decoder's parts. A subclass builds what trains in `build_trained_model`, defines
    its loss in `stage_loss` (or its own `training_step`), and writes its parts in `save_parts`.

    Args:
        model (`str`, `PreTrainedModel` or `None`): the frozen encoder that writes captions (for rollouts, for
            images without one, for `evaluate()`); `None` uses the decoder's own `vlm`.
        decoder (`DiffusionPipeline`): the decoder whose parts train: a `UAEReconstructionPipeline`, or a pipeline of
            a supported family (`uae_hf.decoders`: SD3, FLUX.1, FLUX.2 [klein], Qwen-Image), which reads captions
            as text.
        args ([`DecoderTrainingConfig`] subclass): the stage's config.
        train_dataset, eval_dataset: datasets with an `image` (or `images`) column.
        processing_class: the encoder's processor (default: the decoder's `processor`).
        peft_config (`peft.LoraConfig`, *optional*): the stage's LoRA (see each stage).
        callbacks, optimizers: as in `Trainer`.
    """

    config_class = DecoderTrainingConfig
    _tag_names = ["uae", "uae_hf"]
    _stage_description = ""

    def __init__(self, model=None, decoder=None, args: DecoderTrainingConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, peft_config=None, callbacks=None, optimizers=(None, None)):
        if decoder is None:
            raise ValueError(f"{type(self).__name__} trains parts of a decoder: pass `decoder=` (a UAE pipeline)")
        if args is None:
            args = self.config_class(output_dir=f"uae-{type(self).__name__.removesuffix('Trainer')}")
        if not isinstance(args, self.config_class):
            raise TypeError(f"args must be a {self.config_class.__name__}, got {type(args).__name__}")
        check_image_column(train_dataset, "train_dataset")
        for name, dataset in (eval_dataset.items() if isinstance(eval_dataset, dict) else [("", eval_dataset)]):
            check_image_column(dataset, f"eval_dataset[{name!r}]" if name else "eval_dataset")
        self.decoder_family = decoder_family(decoder)
        self.decoder = self.decoder_family.pipe
        self.decoder.set_progress_bar_config(disable=True)
        if isinstance(model, str):
            with whole_model_loading():  # frozen: no engine prepares it
                model, processor = load_encoder(model)
            processing_class = processing_class or processor
        self.encoder = model if model is not None else getattr(self.decoder, "vlm", None)
        self.caption_processor = processing_class or getattr(self.decoder, "processor", None)
        for component in [*self.decoder.components.values(), self.encoder]:
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False).eval()
        if args.activation_checkpointing:  # diffusers' API, not transformers': enabled here on the DiT
            self.decoder.transformer.enable_gradient_checkpointing()
            args.activation_checkpointing = args.gradient_checkpointing = False
        with whole_model_loading():  # the reward's backbones are frozen: no engine prepares them
            self.reconstruction_reward = build_reconstruction_reward(self.decoder, args)
        self.args = args  # for `build_trained_model`; `Trainer.__init__` sets it again
        trained = self.build_trained_model(peft_config, train_dataset)
        if not self.trains_full_dit:
            # adapters and the projector keep float32 master weights (as PEFT keeps adapters), whatever dtype the
            # frozen models run in: bf16 AdamW updates would round away. A fully fine-tuned DiT keeps its own dtype
            # (fp32 masters for it are FSDP's or DeepSpeed's mixed precision).
            cast_training_params(trained, torch.float32)
        super().__init__(model=trained, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         data_collator=list, callbacks=callbacks, optimizers=optimizers)
        use_diffusers_tensorboard(self)
        self.decoder.to(self.accelerator.device)
        if self.encoder is not None:
            self.encoder.to(self.accelerator.device)
        if args.shard_frozen_models:  # over the processes that shard the trained model (FSDP2 only)
            shard_frozen_models(self.frozen_models(), self.accelerator, trained=self.model)
        self._stage_metrics = defaultdict(list)

    # ------------------------------------------------------------------------------------------ what each stage defines
    trains_full_dit = False

    def build_trained_model(self, peft_config, train_dataset) -> torch.nn.Module:
        """Make the stage's parts trainable and return the module the `Trainer` optimizes."""
        raise NotImplementedError

    def frozen_models(self) -> dict[str, torch.nn.Module | None]:
        """The models the stage runs frozen, by name (those it trains are skipped where they are met)."""
        return decoder_models(self.decoder) | {"encoder": self.encoder}

    def stage_loss(self, model, rows: list[dict], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """The stage's loss on `rows` and the metrics to log with it."""
        raise NotImplementedError

    def save_parts(self, output_dir: Path, weights: dict[str, torch.Tensor]) -> None:
        """Write the trained parts, each in the layout its loader reads, from `weights` (the whole value of every
        trained parameter of the `Trainer`'s model, by name)."""
        raise NotImplementedError

    def saved_files(self) -> list[tuple[str, str, str]]:
        """(path, content, how to load) for each artefact `save_parts` writes, for the model card."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------------- parts
    def add_dit_lora(self, transformer, peft_config=None) -> None:
        """The DiT LoRA: `peft_config`, or r=`decoder_lora_r`/alpha=`decoder_lora_alpha` on the joint attention."""
        lora = peft_config or LoraConfig(r=self.args.decoder_lora_r, lora_alpha=self.args.decoder_lora_alpha,
                                         init_lora_weights="gaussian",
                                         target_modules=list(self.decoder_family.lora_target_modules))
        with torch.random.fork_rng():  # a seeded init that leaves the global RNG alone
            torch.manual_seed(self.args.seed)
            transformer.add_adapter(lora)

    def save_dit_lora(self, transformer, output_dir: Path, weights: dict[str, torch.Tensor]) -> None:
        """The DiT LoRA as the decoder family's diffusers LoRA file, with its adapter metadata so `alpha` survives;
        `weights` holds the LoRA's whole values by parameter name."""
        self.decoder_family.save_lora_weights(
            output_dir, get_peft_model_state_dict(transformer, state_dict=weights),
            transformer.peft_config["default"].to_dict(), LORA_WEIGHT_NAME,
        )

    # ----------------------------------------------------------------------------------------------------- training
    def _seed(self, stream: int, step: int | None = None) -> int:
        """The seed of random stream `stream` at `step` (default: this step) in this process."""
        step = self.state.global_step if step is None else step
        return stream_seed(self.args.seed, stream, step, self.accelerator.process_index)

    def _step_generator(self) -> torch.Generator:
        """This step's and process's training randomness; with `reward_fixed_noise`, the same at every step."""
        return seeded_generators([self._seed(TRAIN_STREAM, 0 if self.args.reward_fixed_noise else None)])[0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = self.stage_loss(model, inputs, self._step_generator())
        self._record(metrics)
        return (loss, None) if return_outputs else loss

    def train(self, *args, **kwargs):
        """`Trainer.train` with the decoder's masked joint attention installed (direct DiT calls pass text masks);
        afterwards the trained modules' forwards are restored (accelerate wraps them for mixed precision), so the
        pipeline computes exactly what the saved weights compute in a fresh pipeline."""
        try:
            with self.decoder_family.masked_attention():  # captions of different lengths share a batch in every DiT call
                return super().train(*args, **kwargs)
        finally:
            self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)

    def caption(self, images: list, generator_seed: int) -> list[str]:
        """The encoder's captions of `images`, with the config's captioning settings (one generator per image)."""
        generators = seeded_generators(stream_seed(generator_seed, index) for index in range(len(images)))
        # a sharded encoder gathers its blocks with the other processes at every token: all step until all are done
        synced = {"synced_gpus": True} if isinstance(self.encoder, FSDPModule) else {}
        return caption_images(self.encoder, self.caption_processor, images, max_new_tokens=self.args.max_completion_length,
                              do_sample=self.args.caption_do_sample, temperature=self.args.temperature,
                              generator=generators, **synced)

    # ----------------------------------------------------------------------------------------------------- evaluate
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Held-out round trips and the stage's loss: each image is captioned by the encoder, reconstructed by the
        decoder as it is now, and scored by the reward's backbones (`{prefix}_reward`, `{prefix}_reconstruction/*`);
        stages with a loss add `{prefix}_loss` on the same rows. Noise and caption randomness are fixed, so two
        evaluations of the same weights agree."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, dict):
            return {name: value for key, part in dataset.items()
                    for name, value in self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{key}").items()}
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset: pass one to the trainer or to evaluate()")
        check_image_column(dataset, "eval_dataset")
        start = time.perf_counter()
        model = self.model
        was_training = model.training
        model.eval()
        sums, count = defaultdict(float), 0
        try:
            for index, rows in enumerate(self.get_eval_dataloader(dataset)):
                with torch.no_grad(), self.decoder_family.masked_attention():
                    metrics = self.evaluation_metrics(model, rows, index)
                for name, value in metrics.items():
                    if not np.isnan(value):
                        sums[name] += value * len(rows)
                count += len(rows)
        finally:
            model.train(was_training)
        everyone = gather_object([(dict(sums), count)]) if self.accelerator.num_processes > 1 else [(dict(sums), count)]
        total = sum(n for _, n in everyone)
        names = sorted(set().union(*(part for part, _ in everyone)))
        results = {f"{metric_key_prefix}_{name}": sum(part.get(name, 0.0) for part, _ in everyone) / total
                   for name in names}
        results[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - start, 4)
        results[f"{metric_key_prefix}_samples"] = total
        super().log(results)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, results)
        return results

    def evaluation_metrics(self, model, rows: list[dict], batch_index: int) -> dict[str, float]:
        """One evaluation batch's mean round-trip similarity per backbone and mean reward, and the stage's loss."""
        seed = self._seed(EVAL_STREAM, batch_index)
        originals = row_images(rows)
        captions = self.caption(originals, seed)
        batch = self.reconstruction_reward.score(originals, captions)
        rewards = np.array(batch.rewards, dtype=float)
        metrics = {"reward": float(np.nanmean(rewards)) if np.isfinite(rewards).any() else float("nan")}
        metrics |= {name: value for name, value in batch.metrics.items() if name.startswith("reconstruction/")}
        loss = self.evaluation_loss(model, rows, seeded_generators([seed])[0])
        if loss is not None:
            metrics["loss"] = loss
        return metrics

    def evaluation_loss(self, model, rows: list[dict], generator: torch.Generator) -> float | None:
        """The stage's loss on held-out rows (`None` for a stage without a supervised loss)."""
        loss, _ = self.stage_loss(model, rows, generator)
        return float(loss)

    # ------------------------------------------------------------------------------------------------- checkpoints
    def trained_weights(self) -> dict[str, torch.Tensor]:
        """The whole value of every trained parameter of the `Trainer`'s model, by name, on every process (gathered
        when FSDP2 or ZeRO-3 shards them: collective, every process calls it)."""
        return full_values(trained_parameters(self.accelerator.unwrap_model(self.model)))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the trained parts (`save_parts`) from whole tensors, whatever engine shards them: every process
        gathers, process 0 writes (`Trainer` would gather the whole model, frozen weights included). A checkpoint of a
        model that trains whole under FSDP with `SHARDED_STATE_DICT` holds its shards only, as `Trainer`'s do; the
        final save writes it whole."""
        if _internal_call and self._fsdp_checkpoints_model() and "SHARDED" in str(
                self.accelerator.state.fsdp_plugin.state_dict_type):
            return
        weights = self.trained_weights()
        self._save(output_dir, state_dict=weights)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """What `save_parts` writes from `state_dict` (the trained weights), plus the training arguments, as `Trainer`
        saves them; on the process that saves only."""
        weights = state_dict if state_dict is not None else self.trained_weights()  # every process gathers
        if not self.args.should_save:
            return
        output_dir = Path(output_dir or self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.save_parts(output_dir, weights)
        torch.save(self.args, output_dir / "training_args.bin")

    def weight_copies(self) -> dict:
        """Copies of the trained weights that a resumed run needs exactly (`WeightCopy` by name: an EMA, an old
        policy); none here."""
        return {}

    def _save_resume_state(self, folder: Path) -> None:
        """The trained weights as they are (the saved parts may hold their EMA instead) and their copies, exactly. A
        model that trains whole under FSDP is accelerate's to checkpoint (whole or sharded, as `fsdp_state_dict_type`
        says): its copies only."""
        state = {} if self._fsdp_checkpoints_model() else self.trained_weights()
        if not self.args.should_save:
            return
        for prefix, copy in self.weight_copies().items():
            state |= {f"{prefix}.{name}": value for name, value in copy.weights.items()}
        save_file({name: value.contiguous() for name, value in state.items()}, folder / RESUME_STATE_NAME)

    def _save_trained_state(self, output_dir: str) -> None:
        """Nothing more under FSDP: `resume_state.safetensors` holds the trained weights (`_save_resume_state`)."""

    def _resume_state(self, checkpoint) -> dict[str, torch.Tensor]:
        path = Path(checkpoint) / RESUME_STATE_NAME
        if not path.is_file():
            raise ValueError(f"{checkpoint} has no {RESUME_STATE_NAME}: resume from a checkpoint-N folder "
                             f"that {type(self).__name__} wrote during training")
        return load_file(path)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """The trained weights, written into the parameters whatever engine shards them (for DeepSpeed, and for a model
        that trains whole under FSDP, `Trainer` loads the engine's checkpoint instead); the weight copies follow in
        `_load_optimizer_and_scheduler`."""
        if self._fsdp_checkpoints_model():
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        state = self._resume_state(resume_from_checkpoint)
        parameters = trained_parameters(self.accelerator.unwrap_model(model or self.model))
        saved = {name for name in state if name.partition(".")[0] not in self.weight_copies()}
        if saved != set(parameters):
            raise ValueError(
                f"{resume_from_checkpoint} does not match this run's trained weights (missing: "
                f"{sorted(set(parameters) - saved)[:3]}, unexpected: {sorted(saved - set(parameters))[:3]}): resume "
                "with the settings of the original run"
            )
        for name, parameter in parameters.items():
            assign(parameter, state[name])

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        """`Trainer`'s optimizer and scheduler states, then the weight copies (EMA, old policy): on every engine."""
        super()._load_optimizer_and_scheduler(checkpoint)
        copies = self.weight_copies()
        if checkpoint is None or not copies:
            return
        state = self._resume_state(checkpoint)
        with torch.no_grad():
            for prefix, copy in copies.items():
                for name, value in copy.weights.items():
                    value.copy_(state[f"{prefix}.{name}"])

    # ---------------------------------------------------------------------------------------------- logs and cards
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
        super().log({**logs, **metrics}, start_time)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None):
        """Write `output_dir/README.md`: what was trained and how each saved file loads."""
        if not self.is_world_process_zero():
            return
        card = ModelCard.from_template(
            ModelCardData(library_name="diffusers", license="other", tags=card_tags(self._tag_names, tags),
                          datasets=[dataset_name] if dataset_name else None),
            template_path=str(MODEL_CARDS / "uae_stage_weights.md"),
            model_name=model_name or Path(self.args.output_dir).name,
            trainer=type(self).__name__,
            stage_description=self._stage_description,
            decoder=model_source(self.decoder.transformer),
            files=self.saved_files(),
            metrics=latest_metrics(self.state.log_history),
        )
        card.save(Path(self.args.output_dir, "README.md"))
