"""[`DecoderPretrainingTrainer`]: teach the decoder to read long captions through the UAE-native path.

Projector + DiT (LoRA or full) train with SD3's rectified-flow objective on (image, long caption) pairs; the caption
reaches the DiT as the frozen LLM's "generate"-role hidden states through the projector, exactly as at inference.
"""

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from torch import nn

from ..decoders.sd3 import SD3Family
from .decoder_pretraining_config import DecoderPretrainingConfig
from .decoder_trainer import (
    DIT_LORA_FILE,
    PROJECTOR_FILE,
    DecoderTrainer,
    dataset_captions,
    row_images,
    save_diffusers_model,
    submodule_weights,
)


class DecoderPretrainingModel(nn.Module):
    """Projector + DiT with the rectified-flow loss as `forward`; the LLM and the VAE are frozen helpers."""

    def __init__(self, decoder, args: DecoderPretrainingConfig):
        super().__init__()
        self.projector = decoder.projector
        self.transformer = decoder.transformer
        # not submodules: frozen, and not the Trainer's to save or shard
        self.helpers = {"decoder": decoder, "family": SD3Family(decoder)}
        self.args = args
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(decoder.scheduler.config)

    @property
    def _no_split_modules(self) -> list[str]:
        """The DiT's blocks: the layers FSDP shards one by one (accelerate's auto-wrap policy reads this)."""
        return list(self.transformer._no_split_modules)

    def latents(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        vae = self.helpers["decoder"].vae
        with torch.no_grad():
            encoded = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator)
        return (encoded - vae.config.shift_factor) * vae.config.scaling_factor

    def forward(self, pixels: torch.Tensor, captions: list[str], generator: torch.Generator) -> torch.Tensor:
        decoder, args = self.helpers["decoder"], self.args
        latents = self.latents(pixels, generator)
        batch = latents.shape[0]
        conditioning = decoder.encode_captions(captions, "embeddings")
        density = compute_density_for_timestep_sampling(
            args.weighting_scheme, batch, args.logit_mean, args.logit_std, args.mode_scale, generator=generator
        )
        schedule = self.noise_scheduler
        indices = (density * schedule.config.num_train_timesteps).long().clamp(max=len(schedule.timesteps) - 1)
        timesteps = schedule.timesteps[indices].to(latents.device)
        sigmas = schedule.sigmas[indices].to(latents.device, latents.dtype).view(batch, 1, 1, 1)
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        prediction = self.helpers["family"].velocity(self.transformer, (1 - sigmas) * latents + sigmas * noise,
                                                     timesteps, conditioning, 1.0)
        weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas)
        per_sample = (weighting.float() * (prediction.float() - (noise - latents).float()) ** 2).flatten(1).mean(1)
        return per_sample.mean()


class DecoderPretrainingTrainer(DecoderTrainer):
    """Decoder pre-training: projector + DiT learn SD3's rectified-flow loss on (image, long caption) pairs, read
    through the frozen LLM's "generate"-role hidden states.

    Args:
        model (`str`, `PreTrainedModel` or `None`): the encoder that captions images for `evaluate()`'s round trips
            (default: the decoder's own `vlm`, which also reads the captions).
        decoder (`UAEReconstructionPipeline`): the decoder, with its `vlm`, `processor` and `projector`.
        args ([`DecoderPretrainingConfig`], *optional*): data, loss, decoder and backbone settings.
        train_dataset, eval_dataset: datasets with an `image` column and `caption_column`.
        processing_class: the encoder's processor (default: the decoder's `processor`).
        peft_config (`peft.LoraConfig`, *optional*): the DiT LoRA (default: r=`decoder_lora_r`,
            alpha=`decoder_lora_alpha` on the joint attention); ignored with `pretrain_full_dit`.
        callbacks, optimizers: as in `Trainer`.

    Example:

    ```python
    >>> from uae_hf import DecoderPretrainingConfig, DecoderPretrainingTrainer

    >>> trainer = DecoderPretrainingTrainer(decoder=decoder, args=DecoderPretrainingConfig(output_dir="uae-pretrain"),
    ...                                     train_dataset=long_caption_dataset)
    >>> trainer.train()
    ```
    """

    config_class = DecoderPretrainingConfig
    _tag_names = ["uae", "uae_hf", "lora", "diffusers", "text-to-image"]
    _stage_description = "rectified-flow pre-training of projector and DiT on long captions"

    @property
    def trains_full_dit(self) -> bool:
        return self.args.pretrain_full_dit

    def build_trained_model(self, peft_config, train_dataset) -> torch.nn.Module:
        decoder, args = self.decoder, self.args
        if getattr(decoder, "projector", None) is None or getattr(decoder, "vlm", None) is None:
            raise ValueError("DecoderPretrainingTrainer trains the UAE-native path: the decoder needs its `vlm`, "
                             "`processor` and `projector`")
        if train_dataset is not None and args.caption_column not in (train_dataset.column_names or [args.caption_column]):
            raise ValueError(f"train_dataset has no {args.caption_column!r} column (set caption_column); columns: "
                             f"{train_dataset.column_names}")
        decoder.projector.requires_grad_(True).train()
        if args.pretrain_full_dit:
            decoder.transformer.requires_grad_(True)
        else:
            self.add_dit_lora(decoder.transformer, peft_config)
        return DecoderPretrainingModel(decoder, args)

    def stage_loss(self, model, rows, generator):
        args, decoder = self.args, self.decoder
        images = row_images(rows)
        pixels = decoder.image_processor.preprocess(images, height=args.decoder_height, width=args.decoder_width)
        # captions are dropped for guidance in training only: a held-out loss reads every caption
        dropout = args.caption_dropout if model.training else 0.0
        drop = torch.rand(len(rows), generator=generator) < dropout
        captions = dataset_captions(rows, args.caption_column)
        if None in captions:
            raise ValueError(
                f"{args.caption_column!r} is empty or missing in {captions.count(None)} of {len(captions)} rows of this "
                "batch; pre-training needs a caption per image (filter such rows out, or caption them first)"
            )
        captions = ["" if dropped else caption for caption, dropped in zip(captions, drop.tolist())]
        loss = model(pixels.to(self.accelerator.device), captions, generator)
        return loss, {"caption_dropout_rate": float(drop.float().mean())}

    def save_parts(self, output_dir: Path, weights: dict[str, torch.Tensor]) -> None:
        """`projector/` (a UAEProjector folder) and the DiT LoRA (diffusers file) or `transformer/` (full)."""
        save_diffusers_model(self.decoder.projector, output_dir / "projector", submodule_weights(weights, "projector"))
        dit_weights = submodule_weights(weights, "transformer")
        if self.args.pretrain_full_dit:
            save_diffusers_model(self.decoder.transformer, output_dir / "transformer", dit_weights)
        else:
            self.save_dit_lora(self.decoder.transformer, output_dir, dit_weights)

    def saved_files(self) -> list[tuple[str, str, str]]:
        full = ("transformer/", "full SD3Transformer2DModel", "`SD3Transformer2DModel.from_pretrained`")
        return [PROJECTOR_FILE, full if self.args.pretrain_full_dit else DIT_LORA_FILE]
