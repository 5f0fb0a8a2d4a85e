"""Stage "pretrain": teach the decoder to read long captions through the UAE-native path.

Projector + DiT (LoRA or full) train with SD3's rectified-flow objective on (image, long caption) pairs; the
caption reaches the DiT as the frozen LLM's "generate"-role hidden states through the projector, exactly as at
inference. A stage of `UnifiedGRPOTrainer` rather than a separate trainer so one config vocabulary (decoder_*,
caption and backbone settings), one `uae-hf train` entry point and one saving layout serve the whole recipe; it
runs on transformers' `Trainer` loop (no rollouts): `UnifiedGRPOTrainer(..., args=UnifiedGRPOConfig(stage="pretrain"))`.
"""

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from torch import nn

from ..images import load_image
from ..sampling.flow_sde import velocity
from .loop_stage import TrainerLoopStage, dataset_captions
from .unified_grpo_config import UnifiedGRPOConfig


class DecoderPretrainingModel(nn.Module):
    """Projector + DiT with the rectified-flow loss as `forward`; the LLM and the VAE are frozen helpers."""

    def __init__(self, decoder, args: UnifiedGRPOConfig):
        super().__init__()
        self.projector = decoder.projector
        self.transformer = decoder.transformer
        self.helpers = {"decoder": decoder}  # not submodules: frozen, and not the Trainer's to save or shard
        self.args = args
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(decoder.scheduler.config)

    def latents(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        vae = self.helpers["decoder"].vae
        with torch.no_grad():
            encoded = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator)
        return (encoded - vae.config.shift_factor) * vae.config.scaling_factor

    def forward(self, pixels: torch.Tensor, captions: list[str], generator: torch.Generator) -> torch.Tensor:
        decoder, args = self.helpers["decoder"], self.args
        latents = self.latents(pixels, generator)
        batch = latents.shape[0]
        conditioning = decoder.generate_conditioning(captions)
        mask = conditioning.text_mask()
        pooled = decoder.uae_pooled_prompt_embeds().to(latents.device).expand(batch, -1)
        density = compute_density_for_timestep_sampling(
            args.weighting_scheme, batch, args.logit_mean, args.logit_std, args.mode_scale, generator=generator
        )
        schedule = self.noise_scheduler
        indices = (density * schedule.config.num_train_timesteps).long().clamp(max=len(schedule.timesteps) - 1)
        timesteps = schedule.timesteps[indices].to(latents.device)
        sigmas = schedule.sigmas[indices].to(latents.device, latents.dtype).view(batch, 1, 1, 1)
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        features = dict(prompt_embeds=conditioning.prompt_embeds, pooled_prompt_embeds=pooled,
                        joint_attention_kwargs={"encoder_attention_mask": mask} if not bool(mask.all()) else None)
        prediction = velocity(self.transformer, (1 - sigmas) * latents + sigmas * noise, timesteps, features, 1.0)
        weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas)
        per_sample = (weighting.float() * (prediction.float() - (noise - latents).float()) ** 2).flatten(1).mean(1)
        return per_sample.mean()


class DecoderPretrainingTrainer(TrainerLoopStage):
    """`UnifiedGRPOTrainer` for `stage="pretrain"`. `model` is unused (the decoder's own `vlm` reads captions);
    `peft_config` is the DiT LoRA (default r=`decoder_lora_r`, alpha=`decoder_lora_alpha`) unless
    `pretrain_full_dit`. Data: an `image` column and `caption_column`."""

    _tag_names = ["uae", "uae_hf", "lora", "diffusers", "text-to-image"]
    _name = "UnifiedGRPO (decoder pre-training)"

    def __init__(self, model, decoder, args: UnifiedGRPOConfig, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_funcs=None, peft_config=None, callbacks=None, optimizers=(None, None)):
        self._setup_parts(None, decoder, args, train_dataset, processing_class, reward_funcs)
        decoder = self.decoder
        if decoder.projector is None or decoder.vlm is None:
            raise ValueError('stage "pretrain" trains the UAE-native path: the decoder needs its `vlm`, `processor` '
                             "and `projector`")
        if train_dataset is not None and args.caption_column not in (train_dataset.column_names or [args.caption_column]):
            raise ValueError(f"train_dataset has no {args.caption_column!r} column (set caption_column); columns: "
                             f"{train_dataset.column_names}")
        decoder.projector.requires_grad_(True).train()
        if args.pretrain_full_dit:
            decoder.transformer.requires_grad_(True)
        else:
            self.add_dit_lora(decoder.transformer, args, peft_config)
        model = DecoderPretrainingModel(decoder, args)
        self._init_trainer(model, args, train_dataset, eval_dataset, callbacks, optimizers,
                           images_per_device=args.per_device_train_batch_size)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args, decoder = self.args, self.decoder
        generator = self._step_generator()
        images = [load_image(row["image"], f"image[{index}]") for index, row in enumerate(inputs)]
        pixels = decoder.image_processor.preprocess(images, height=args.decoder_height, width=args.decoder_width)
        drop = torch.rand(len(inputs), generator=generator) < args.caption_dropout
        captions = dataset_captions(inputs, args.caption_column)
        if None in captions:
            raise ValueError(
                f"{args.caption_column!r} is empty or missing in {captions.count(None)} of {len(captions)} rows of this "
                "batch; pre-training needs a caption per image (filter such rows out, or caption them first)"
            )
        captions = ["" if dropped else caption for caption, dropped in zip(captions, drop.tolist())]
        loss = model(pixels.to(self.accelerator.device), captions, generator)
        self._record({"caption_dropout_rate": float(drop.float().mean())})
        return (loss, None) if return_outputs else loss

    def save_parts(self, output_dir: Path) -> None:
        """`projector/` (a UAEProjector folder) and the DiT LoRA (diffusers file) or `transformer/` (full)."""
        self.decoder.projector.save_pretrained(output_dir / "projector")
        if self.args.pretrain_full_dit:
            self.decoder.transformer.save_pretrained(output_dir / "transformer")
        else:
            self.save_dit_lora(self.decoder.transformer, output_dir)
