"""The decoder as every UAE trainer holds it: the pipeline, the reconstruction reward built from a config, and the
grids of originals, captions and reconstructions the trainers log."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from transformers.integrations import TensorBoardCallback

from ..rewards.reconstruction import ReconstructionBatch, ReconstructionReward
from ..rewards.similarity import ImageSimilarity
from ..visualization import reconstruction_grid
from .reconstruction_arguments import ReconstructionArguments


def check_image_column(dataset, name: str) -> None:
    columns = None if dataset is None else dataset.column_names
    if columns is not None and "image" not in columns and "images" not in columns:
        raise ValueError(
            f"{name} has no 'image' (or 'images') column, but the reconstruction reward compares each caption's "
            f"reconstruction with its image; columns: {columns}"
        )


def build_similarity(names: list[str], args: ReconstructionArguments) -> ImageSimilarity:
    """The backbones `names` with the config's checkpoints, device and dtype."""
    checkpoints = args.backbone_checkpoints or {}
    return ImageSimilarity(names, {name: checkpoints[name] for name in names if name in checkpoints},
                           device=args.device, dtype=getattr(torch, args.backbone_dtype))


def backbone_weights(args: ReconstructionArguments) -> dict[str, float] | None:
    """The config's weight per rewarded backbone (`None`: equal weights)."""
    return dict(zip(args.reward_backbones, args.reward_backbone_weights)) if args.reward_backbone_weights else None


def build_reconstruction_reward(decoder, args: ReconstructionArguments) -> ReconstructionReward:
    """The reconstruction reward from the config's decoder and backbone settings."""
    return ReconstructionReward(
        decoder,
        build_similarity(args.reward_backbones, args),
        weights=backbone_weights(args),
        heldout=build_similarity(args.heldout_backbones, args) if args.heldout_backbones else None,
        reconstructions_per_caption=args.reconstructions_per_caption,
        batch_size=args.reward_batch_size,
        seed=args.seed,
        fixed_noise=args.reward_fixed_noise,
        height=args.decoder_height,
        width=args.decoder_width,
        num_inference_steps=args.decoder_num_inference_steps,
        guidance_scale=args.decoder_guidance_scale,
        conditioning_mode=args.decoder_conditioning_mode,
    )


class ReconstructionGrids:
    """Trainer mixin: keeps the latest scored batch of reconstructions (`last_batch`) and, every
    `log_reconstructions_steps` steps (from the first), saves a grid of it under `output_dir/reconstructions/step-N.png`
    and logs it to the trackers of `report_to` that take images (`log_image_to_trackers`). N is the optimizer step the
    batch is for, the step at which the Trainer logs its reward."""

    last_batch: ReconstructionBatch | None = None
    _last_grid_step = -1

    def _keep_batch(self, batch: ReconstructionBatch) -> None:
        self.last_batch = batch
        args, done = self.args, self.state.global_step
        every = args.log_reconstructions_steps
        if not every or done % every or not self.accelerator.is_main_process:
            return
        step = done + 1  # the batch feeds the coming optimizer step: the Trainer logs its reward at that step
        if step == self._last_grid_step:
            return
        self._last_grid_step = step
        count = args.num_logged_reconstructions
        blank = PIL.Image.new("RGB", (64, 64), "black")
        grid = reconstruction_grid(
            batch.originals[:count],
            [image if image is not None else blank for image in batch.reconstructions[:count]],
            [f"[reward {reward:.3f}] {caption}" for reward, caption in zip(batch.rewards[:count], batch.captions[:count])],
        )
        folder = Path(args.output_dir, "reconstructions")
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"step-{step:06d}.png")
        log_image_to_trackers(self, "train/reconstructions", grid, step)


class DiffusersTensorBoardCallback(TensorBoardCallback):
    """transformers' TensorBoard callback for a trained diffusers model: it records the model's config as text, but
    through `config.to_json_string()`, which a diffusers config (a `FrozenDict`) lacks; this records it as JSON."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        config = getattr(model, "config", None)
        if self.tb_writer is not None and state.is_world_process_zero and isinstance(config, dict):
            self.tb_writer.add_text("model_config", json.dumps(config, indent=2, sort_keys=True, default=str))


def use_diffusers_tensorboard(trainer) -> None:
    """Swap the Trainer's TensorBoard callback (`report_to` tensorboard) for `DiffusersTensorBoardCallback`."""
    callbacks = trainer.callback_handler.callbacks
    for index, callback in enumerate(callbacks):
        if type(callback) is TensorBoardCallback:
            callbacks[index] = DiffusersTensorBoardCallback(tb_writer=callback.tb_writer)


def log_image_to_trackers(trainer, tag: str, image: PIL.Image.Image, step: int) -> None:
    """Log `image` at `step` to every tracker of `trainer.args.report_to` that takes images, beside the Trainer's own
    scalars: TensorBoard through its callback's writer; wandb and trackio in the run their callbacks started, keyed by
    `train/global_step` as those callbacks key the scalars."""
    report_to = trainer.args.report_to or []
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
            callback.tb_writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            wandb.log({tag: wandb.Image(image), "train/global_step": step})
    if "trackio" in report_to:
        import trackio

        trackio.log({tag: trackio.Image(image), "train/global_step": step})
