"""The decoder as every UAE trainer holds it: the pipeline, the reconstruction reward built from a config, and the
grids of originals, captions and reconstructions the trainers log."""

from pathlib import Path

import PIL.Image
import torch
from diffusers import StableDiffusion3Pipeline

from ..pipelines.uae_reconstruction.pipeline_uae_reconstruction import UAEReconstructionPipeline
from ..rewards.reconstruction import ReconstructionBatch, ReconstructionReward
from ..rewards.similarity import ImageSimilarity
from ..visualization import reconstruction_grid
from .reconstruction_arguments import ReconstructionArguments


def as_decoder(decoder) -> StableDiffusion3Pipeline:
    """A UAE reconstruction pipeline (loaded from `uae_hf` or as remote code) or a plain SD3-family pipeline, which
    then decodes in text mode."""
    if isinstance(decoder, StableDiffusion3Pipeline) and hasattr(decoder, "generate"):
        return decoder
    if isinstance(decoder, StableDiffusion3Pipeline):
        return UAEReconstructionPipeline.from_pipe(decoder, conditioning_mode="text")
    raise TypeError(
        f"decoder must be a UAEReconstructionPipeline or a diffusers StableDiffusion3Pipeline, got "
        f"{type(decoder).__name__}"
    )


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
    `log_reconstructions_steps` steps, saves a grid of it under `output_dir/reconstructions/step-N.png` (and to wandb
    when it is active)."""

    last_batch: ReconstructionBatch | None = None
    _last_grid_step = -1

    def _keep_batch(self, batch: ReconstructionBatch) -> None:
        self.last_batch = batch
        args, step = self.args, self.state.global_step
        every = args.log_reconstructions_steps
        if not every or step % every or step == self._last_grid_step or not self.accelerator.is_main_process:
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
        if args.report_to and "wandb" in args.report_to:
            import wandb

            if wandb.run is not None:
                wandb.log({"reconstructions": wandb.Image(grid)}, step=step)
