"""[`FlowGRPOTrainer`]: Flow-GRPO on the decoder's DiT, the encoder frozen ("Understanding for Generation").

Per step and device: caption each image with the frozen encoder, draw G reconstructions per caption with the SDE
sampler (recording latents and log-probs), score them with the reconstruction reward, turn rewards into per-group
advantages, then take the clipped-ratio policy-gradient loss (+ KL to the adapter-disabled reference on the step
means) on a subset of the sampling steps. The DiT is the Trainer's model, so accelerate wraps it (DDP all-reduces its
gradients), gradient clipping sees it, checkpoints hold it.
"""

import contextlib
import copy
import time
from pathlib import Path

import torch
from accelerate.utils import convert_outputs_to_fp32, get_mixed_precision_context_manager
from huggingface_hub import ModelCard, ModelCardData
from transformers import TrainerCallback
from trl.trainer.utils import disable_dropout_in_model

from ..hub import MODEL_CARDS, hub_id_of
from ..images import decoded_images
from ..rewards.reconstruction import ReconstructionBatch, caption_metrics
from ..sampling.flow_sde import decode_latents, flow_step, mean_kl, sample_trajectory, velocity
from ..seeding import seeded_generators, stream_seed
from .decoder_trainer import CAPTION_STREAM, LORA_WEIGHT_NAME, DecoderTrainer, row_images
from .flow_grpo_config import FlowGRPOConfig
from .health import HealthWarnings
from .model_card import card_tags, latest_metrics

GROUP_NOISE_STREAM, SAMPLE_NOISE_STREAM, STEP_NOISE_STREAM, TRAINED_STEPS_STREAM = 3, 4, 5, 6
MICRO_STEP_STREAM = 7  # names a micro-step's own streams within an accumulation window (the first keeps the step's)


class _EMACallback(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._update_ema()


class FlowGRPOTrainer(DecoderTrainer):
    """Flow-GRPO on the DiT of a UAE decoder, with the frozen encoder's captions and the reconstruction reward.

    Args:
        model (`str`, `PreTrainedModel` or `None`): the frozen encoder that writes the captions (default: the
            decoder's own `vlm`).
        decoder (`UAEReconstructionPipeline` or `StableDiffusion3Pipeline`): the decoder whose DiT trains.
        args ([`FlowGRPOConfig`], *optional*): group, objective, sampler, decoder and reward settings.
        train_dataset, eval_dataset: datasets with an `image` (or `images`) column.
        processing_class: the encoder's processor (default: the decoder's `processor`).
        peft_config (`peft.LoraConfig`, *optional*): the DiT LoRA (default: r=`decoder_lora_r`,
            alpha=`decoder_lora_alpha` on the joint-attention projections, gaussian init); ignored with
            `decoder_full_finetune`.
        callbacks, optimizers: as in `Trainer`.

    Example:

    ```python
    >>> from uae_hf import FlowGRPOConfig, FlowGRPOTrainer, load_uae_pipeline

    >>> decoder = load_uae_pipeline("path/to/sd3.5", "Qwen/Qwen2.5-VL-3B-Instruct", "path/to/projector")
    >>> trainer = FlowGRPOTrainer(decoder=decoder, args=FlowGRPOConfig(output_dir="uae-flow-grpo"), train_dataset=images)
    >>> trainer.train()
    ```
    """

    config_class = FlowGRPOConfig
    _tag_names = ["uae", "uae_hf", "flow-grpo", "lora", "diffusers", "text-to-image"]
    _stage_description = "Flow-GRPO on the decoder's DiT, the encoder frozen"

    def __init__(self, model=None, decoder=None, args: FlowGRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, peft_config=None, callbacks=None, optimizers=(None, None)):
        super().__init__(model, decoder, args, train_dataset, eval_dataset, processing_class, peft_config, callbacks,
                         optimizers)
        if self.encoder is None or self.caption_processor is None:
            raise ValueError("FlowGRPOTrainer captions each image: pass the encoder as `model` (and its processor), "
                             "or a decoder with `vlm` and `processor`")
        self._train_batch_size = self.args.per_device_train_batch_size // self.args.num_generations  # images
        self._rollouts: dict[int, dict] = {}  # position in the accumulation window → the rollout it trains on
        self._window = (-1, 0)  # (global step, position) of the current micro-step
        if self.reference is not None:  # copied before `Trainer.__init__` placed the decoder: follow it
            self.reference.to(self.accelerator.device)
            if self.accelerator.native_amp:  # and compute as the trained DiT will once accelerate wraps its forward
                autocast = get_mixed_precision_context_manager(True, self.accelerator.autocast_handler)
                self.reference.forward = convert_outputs_to_fp32(autocast(self.reference.forward))
        self.health = HealthWarnings()
        if self.args.ema_decay is not None:
            self._ema = {name: p.detach().clone() for name, p in self.decoder.transformer.named_parameters()
                         if p.requires_grad}
            self.add_callback(_EMACallback(self))

    @property
    def trains_full_dit(self) -> bool:
        return self.args.decoder_full_finetune

    def build_trained_model(self, peft_config, train_dataset) -> torch.nn.Module:
        dit = self.decoder.transformer
        self.reference = None
        if self.args.decoder_full_finetune:
            dit.requires_grad_(True)
            if self.args.beta > 0:
                self.reference = copy.deepcopy(dit).requires_grad_(False).eval()
        else:
            self.add_dit_lora(dit, peft_config)
        if self.args.disable_dropout:
            disable_dropout_in_model(dit)
        return dit

    def evaluation_loss(self, model, rows, generator) -> None:
        return None  # a policy-gradient surrogate has no held-out meaning: evaluation reports the round trip alone

    # ------------------------------------------------------------------------------------------------------- rollout
    def _micro_seed(self, stream: int) -> int:
        """The seed of `stream` at this step, process and micro-step: each micro-batch of an accumulation window
        draws its own noise; the first keeps the step's seed (so without accumulation nothing changes)."""
        base = self._seed(stream)
        micro_step = self._window[1]
        return stream_seed(base, MICRO_STEP_STREAM, micro_step) if micro_step else base

    def _generators(self, stream: int, count: int, repeat: int = 1) -> list[torch.Generator]:
        """`count * repeat` generators for this micro-step and process; each seed serves `repeat` consecutive
        samples."""
        base = self._micro_seed(stream)
        return seeded_generators(stream_seed(base, index) for index in range(count) for _ in range(repeat))

    @torch.no_grad()
    def _rollout(self, rows: list[dict]) -> dict:
        args, decoder, group = self.args, self.decoder, self.args.num_generations
        start = time.perf_counter()
        originals = row_images(rows)
        captions = self.caption(originals, self._micro_seed(CAPTION_STREAM))
        captions_g = [caption for caption in captions for _ in range(group)]
        originals_g = [image for image in originals for _ in range(group)]
        conditioning = decoder.encode_captions(captions_g, args.decoder_conditioning_mode)
        if args.same_noise_in_group:
            noise_seeds = self._generators(GROUP_NOISE_STREAM, len(originals), repeat=group)
        else:
            noise_seeds = self._generators(SAMPLE_NOISE_STREAM, len(captions_g))
        scale = decoder.vae_scale_factor
        latents = decoder.prepare_latents(
            len(captions_g), decoder.transformer.config.in_channels, args.decoder_height, args.decoder_width,
            torch.float32, self.accelerator.device, noise_seeds,
        )
        if latents.shape[-1] * scale != args.decoder_width or latents.shape[-2] * scale != args.decoder_height:
            raise ValueError(f"decoder_height/width must be multiples of {scale * decoder.transformer.config.patch_size}")
        trajectory = sample_trajectory(
            decoder, conditioning, latents, args.decoder_num_inference_steps, self._guidance, args.sde_noise_level,
            args.sde_method, generator=self._generators(STEP_NOISE_STREAM, len(captions_g)),
            transformer=self.accelerator.unwrap_model(self.model),
        )
        arrays = decode_latents(decoder, trajectory.latents[:, -1], "np")
        rollout_time = time.perf_counter() - start

        start = time.perf_counter()
        reconstructions = decoded_images(arrays)
        rewards, metrics = self.reconstruction_reward.similarities(reconstructions, originals_g)
        rewards = rewards.to(self.accelerator.device)
        everyone = self.accelerator.gather(rewards)  # every process's rewards, once per step
        advantages = self._advantages(rewards, everyone)
        reward_time = time.perf_counter() - start
        stalled = self.health.check_rewards(everyone, self.args.num_generations, self.state.global_step)

        metrics |= caption_metrics(captions)
        self._record(metrics | {
            "reward": float(torch.nanmean(everyone)),
            "reward_std": float(everyone[~torch.isnan(everyone)].std()) if (~torch.isnan(everyone)).sum() > 1 else 0.0,
            "advantages/abs_mean": float(advantages.abs().mean()),
            "reward/groups_without_variation": stalled,
            "timing/rollout_s": rollout_time,
            "timing/reward_s": reward_time,
        })
        self._keep_batch(ReconstructionBatch(originals_g, captions_g, reconstructions, rewards.tolist(), metrics))
        return {"conditioning": conditioning, "trajectory": trajectory, "advantages": advantages}

    @property
    def _guidance(self) -> float:
        return self.args.decoder_guidance_scale if self.args.train_guidance else 1.0

    def _advantages(self, rewards: torch.Tensor, everyone: torch.Tensor) -> torch.Tensor:
        """Per-group baseline; std per group (`scale_rewards="group"`), over all processes (`"batch"`) or none."""
        grouped = rewards.view(-1, self.args.num_generations)
        mean = torch.nanmean(grouped, dim=1, keepdim=True)
        centred = grouped - mean
        if self.args.scale_rewards == "group":
            std = torch.sqrt(torch.nanmean(centred**2, dim=1, keepdim=True))
        elif self.args.scale_rewards == "batch":
            std = everyone[~torch.isnan(everyone)].std() if (~torch.isnan(everyone)).sum() > 1 else torch.tensor(1.0)
        else:
            std = torch.ones(())
        advantages = (centred / (std + 1e-4)).nan_to_num(0.0).view(-1)
        return advantages.clamp(-self.args.advantage_clip, self.args.advantage_clip)

    def _trained_steps(self) -> list[int]:
        total = self.args.decoder_num_inference_steps
        start, end = 0, total
        if self.args.timestep_window:
            start, _, end = self.args.timestep_window.partition(":")
            start, end = int(start), min(int(end), total)
        candidates = torch.arange(start, end)
        count = min(max(1, int(total * self.args.timestep_fraction)), len(candidates))
        order = torch.randperm(len(candidates), generator=self._generators(TRAINED_STEPS_STREAM, 1)[0])
        return sorted(candidates[order[:count]].tolist())

    # -------------------------------------------------------------------------------------------------------- update
    @contextlib.contextmanager
    def _reference(self):
        """The KL reference: the DiT with its LoRA disabled (or the frozen copy when fully fine-tuned)."""
        dit = self.accelerator.unwrap_model(self.model)
        if self.reference is not None:
            yield self.reference
            return
        dit.disable_adapters()
        try:
            yield dit
        finally:
            dit.enable_adapters()

    def training_step(self, model, inputs, num_items_in_batch=None):
        global_step = self.state.global_step
        micro_step = self._window[1] + 1 if self._window[0] == global_step else 0  # position in the window
        self._window = (global_step, micro_step)
        # each micro-batch of a window gets its own rollout, and the window's rollouts serve `num_iterations`
        # optimizer steps (μ inner epochs; the later ones off-policy: ratio != 1, clipped). The rows of the steps in
        # between are not sampled.
        if micro_step == 0 and global_step % self.args.num_iterations == 0:
            self._rollouts.clear()
        fresh = micro_step not in self._rollouts
        if fresh:
            model.eval()  # sampled as the reference samples: no dropout
            self._rollouts[micro_step] = self._rollout(inputs)
        model.train()
        rollout = self._rollouts[micro_step]
        start = time.perf_counter()
        trajectory, conditioning, advantages = rollout["trajectory"], rollout["conditioning"], rollout["advantages"]
        args, steps = self.args, self._trained_steps()
        total_loss = torch.zeros((), device=self.accelerator.device)
        for position, index in enumerate(steps):
            last = position == len(steps) - 1
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
            with sync:
                sample, target = trajectory.latents[:, index], trajectory.latents[:, index + 1]
                v = velocity(model, sample, trajectory.timesteps[index], conditioning, self._guidance)
                step = flow_step(args.sde_method, v, sample, trajectory.sigmas, index, args.sde_noise_level,
                                 prev_sample=target)
                ratio = torch.exp(step.log_prob - trajectory.log_probs[:, index])
                clipped = torch.clamp(ratio, 1 - args.flow_clip_range, 1 + args.flow_clip_range)
                loss = torch.maximum(-advantages * ratio, -advantages * clipped).mean()
                kl = torch.zeros((), device=loss.device)
                if args.beta > 0 and bool(step.std > 0):
                    with torch.no_grad(), self._reference() as reference:
                        v_ref = velocity(reference, sample, trajectory.timesteps[index], conditioning, self._guidance)
                        ref = flow_step(args.sde_method, v_ref, sample, trajectory.sigmas, index,
                                        args.sde_noise_level, prev_sample=target)
                    kl = mean_kl(step, ref).mean()
                    loss = loss + args.beta * kl
                self.accelerator.backward(loss / (len(steps) * args.gradient_accumulation_steps))
            total_loss += loss.detach() / len(steps)
            deviation = (ratio.detach() - 1).abs()
            if fresh and position == 0:
                self._record({"ratio/first_update_max_deviation": float(deviation.max())})
                self.health.check_on_policy(float(deviation.max()), self.state.global_step)
            self._record({"ratio/mean": float(ratio.detach().mean()), "ratio/max_deviation": float(deviation.max()),
                          "ratio/clip_fraction": float((deviation > args.flow_clip_range).float().mean()),
                          "kl": float(kl.detach())})
        self._record({"timing/update_s": time.perf_counter() - start, "trained_steps": float(len(steps))})
        return total_loss

    # ----------------------------------------------------------------------------------------------------------- EMA
    def _update_ema(self) -> None:
        decay = self.args.ema_decay
        with torch.no_grad():
            for name, parameter in self.accelerator.unwrap_model(self.model).named_parameters():
                if name in self._ema:
                    self._ema[name].mul_(decay).add_(parameter.detach(), alpha=1 - decay)

    # -------------------------------------------------------------------------------------------------- save / load
    def save_parts(self, output_dir: Path) -> None:
        """The DiT LoRA as a diffusers LoRA file (with its adapter metadata, so `alpha` survives), or the full DiT."""
        dit = self.accelerator.unwrap_model(self.model)
        weights = {name: p.detach() for name, p in dit.named_parameters()} | (self._ema or {})
        if self.args.decoder_full_finetune:
            dit.save_pretrained(output_dir / "transformer", state_dict=weights)
        else:
            self.save_dit_lora(dit, output_dir, weights)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None):
        """A diffusers-style LoRA card: base decoder, tags, and loading with `UAEReconstructionPipeline`."""
        if not self.is_world_process_zero():
            return
        args = self.args
        base = hub_id_of(self.decoder.transformer)
        hub_id = self.hub_model_id or model_name or Path(args.output_dir).name
        latest = latest_metrics(self.state.log_history)
        card = ModelCard.from_template(
            ModelCardData(
                base_model=base,
                library_name="diffusers",
                license="other",
                tags=card_tags(self._tag_names, tags),
                datasets=[dataset_name] if dataset_name else None,
                instance_prompt=None,
            ),
            template_path=str(MODEL_CARDS / "flow_grpo_decoder_lora.md"),
            model_name=model_name or Path(args.output_dir).name,
            base_model=base,
            hub_model_id=hub_id,
            weight_name=LORA_WEIGHT_NAME,
            full_finetune=args.decoder_full_finetune,
            settings={
                "sampler": f"{args.sde_method}, noise level {args.sde_noise_level}, "
                f"{args.decoder_num_inference_steps} steps, {args.decoder_width}x{args.decoder_height}",
                "guidance in training": f"{self._guidance}",
                "trained steps per update": f"{len(self._trained_steps())} (timestep_fraction {args.timestep_fraction})",
                "group size": f"{args.num_generations}",
                "KL beta": f"{args.beta}",
                "reward": f"{', '.join(args.reward_backbones)} similarity to the original",
                "steps": f"{self.state.global_step}",
            },
            metrics={k: v for k, v in latest.items() if k.startswith(("reward", "reconstruction/"))},
        )
        card.save(Path(args.output_dir, "README.md"))
