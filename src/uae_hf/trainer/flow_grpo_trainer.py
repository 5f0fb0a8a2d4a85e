"""[`FlowGRPOTrainer`]: Flow-GRPO on the decoder's DiT, the encoder frozen ("Understanding for Generation").

Per micro-batch: caption each image with the frozen encoder, draw G reconstructions per caption with the SDE sampler
(recording latents and log-probs), score them with the reconstruction reward, turn rewards into advantages, then take
the clipped-ratio policy-gradient loss (+ KL to the reference on the step means) on the first sampling steps. The DiT
is the Trainer's model, so accelerate wraps it (DDP all-reduces its gradients), gradient clipping sees it,
checkpoints hold it.
"""

import torch

from ..sampling.flow_sde import Trajectory, flow_step, mean_kl
from .decoder_rl_trainer import DecoderRLTrainer
from .flow_grpo_config import FlowGRPOConfig


class FlowGRPOTrainer(DecoderRLTrainer):
    """Flow-GRPO on the DiT of a UAE decoder, with the frozen encoder's captions and the reconstruction reward.

    Args:
        model (`str`, `PreTrainedModel` or `None`): the frozen encoder that writes the captions (default: the
            decoder's own `vlm`).
        decoder (`DiffusionPipeline`): the decoder whose DiT trains: a `UAEReconstructionPipeline` or a pipeline of a
            supported family (`uae_hf.decoders`).
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
    algorithm = "Flow-GRPO"

    @property
    def uses_reference(self) -> bool:
        return self.args.beta > 0

    def rollout_settings(self) -> tuple[float, str, float]:
        return self.args.sde_noise_level, self.args.sde_method, self._guidance

    @property
    def _guidance(self) -> float:
        scale = self.args.decoder_guidance_scale
        return scale if self.args.train_guidance else self.decoder_family.unguided_scale(scale)

    def _trained_steps(self) -> list[int]:
        """The first `int(T·timestep_fraction)` steps (at least one) of `timestep_window`."""
        total = self.args.decoder_num_inference_steps
        start, end = 0, total
        if self.args.timestep_window:
            start, _, end = self.args.timestep_window.partition(":")
            start, end = int(start), min(int(end), total)
        count = max(1, int(total * self.args.timestep_fraction))
        return list(range(start, end))[:count]

    def _informative(self, rollout: dict) -> tuple[Trajectory, dict, torch.Tensor]:
        """The rollout's samples the update trains on: with `filter_zero_advantages`, those whose advantage is not 0
        (all of them when none is, so every process still backpropagates)."""
        trajectory, conditioning, advantages = rollout["trajectory"], rollout["conditioning"], rollout["advantages"]
        keep = advantages != 0
        if not self.args.filter_zero_advantages or bool(keep.all()) or not bool(keep.any()):
            self._record({"advantages/filtered_fraction": 0.0})
            return trajectory, conditioning, advantages
        self._record({"advantages/filtered_fraction": 1.0 - float(keep.float().mean())})
        rows = keep.nonzero().squeeze(1)

        def select(value):
            if isinstance(value, dict):
                return {key: select(item) for key, item in value.items()}
            if isinstance(value, torch.Tensor) and value.ndim and len(value) == len(keep):
                return value[rows.to(value.device)]
            return value

        kept = Trajectory(trajectory.latents[rows], trajectory.log_probs[rows], trajectory.timesteps, trajectory.sigmas)
        return kept, select(conditioning), advantages[rows]

    def update(self, model, rollout: dict, fresh: bool) -> torch.Tensor:
        """The clipped-ratio loss (+ β·KL) on each trained step, backpropagated step by step."""
        trajectory, conditioning, advantages = self._informative(rollout)
        args = self.args

        def step_loss(position: int, index: int) -> torch.Tensor:
            sample, target = trajectory.latents[:, index], trajectory.latents[:, index + 1]
            v = self.decoder_family.velocity(model, sample, trajectory.timesteps[index], conditioning, self._guidance,
                                             detach_unconditional=args.detach_unconditional)
            step = flow_step(args.sde_method, v, sample, trajectory.sigmas, index, args.sde_noise_level,
                             prev_sample=target)
            ratio = torch.exp(step.log_prob - trajectory.log_probs[:, index])
            clipped = torch.clamp(ratio, 1 - args.flow_clip_range, 1 + args.flow_clip_range)
            loss = torch.maximum(-advantages * ratio, -advantages * clipped).mean()
            kl = torch.zeros((), device=loss.device)
            if args.beta > 0 and bool(step.std > 0):
                with torch.no_grad(), self._reference() as reference:
                    v_ref = self.decoder_family.velocity(reference, sample, trajectory.timesteps[index], conditioning,
                                                         self._guidance)
                    ref = flow_step(args.sde_method, v_ref, sample, trajectory.sigmas, index, args.sde_noise_level,
                                    prev_sample=target)
                kl = mean_kl(step, ref).mean()
                loss = loss + args.beta * kl
            deviation = (ratio.detach() - 1).abs()
            if fresh and position == 0:
                self._record({"ratio/first_update_max_deviation": float(deviation.max())})
                self.health.check_on_policy(float(deviation.max()), self.state.global_step)
            self._record({"ratio/mean": float(ratio.detach().mean()), "ratio/max_deviation": float(deviation.max()),
                          "ratio/clip_fraction": float((deviation > args.flow_clip_range).float().mean()),
                          "kl": float(kl.detach())})
            return loss

        return self.backpropagate_trained_steps(model, step_loss)

    def card_settings(self) -> dict[str, str]:
        args = self.args
        return super().card_settings() | {
            "sampler": f"{args.sde_method}, noise level {args.sde_noise_level}, "
            f"{args.decoder_num_inference_steps} steps, {args.decoder_width}x{args.decoder_height}",
            "guidance in training": f"{self._guidance}",
            "KL beta": f"{args.beta}",
            "zero-advantage samples": "left out of the update" if args.filter_zero_advantages else "trained on",
        }
