"""[`DiffusionNFTTrainer`]: DiffusionNFT (arXiv 2509.16117) on the decoder's DiT, the encoder frozen.

Reinforcement learning on the forward process: rollouts are deterministic ODE samples of a slowly moving old copy
of the DiT, θ_old, without guidance (DPM-Solver++(2M) by default), of which only the clean latents are kept; each is
noised afresh at `int(T·timestep_fraction)` of the schedule's T timesteps, drawn at random per sample, and the DiT
learns a flow-matching objective on two implicit policies around θ_old, `v± = v_old ± β·(v_θ - v_old)`, weighted by
how likely each sample is to be good, `r = 0.5 + A / (2·advantage_clip)` (the reference's `0.5 + A/10`). No
log-probs, no ratio clipping, no CFG in training.
"""

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..sampling.flow_sde import Trajectory
from .decoder_rl_trainer import DecoderRLTrainer
from .diffusion_nft_config import DiffusionNFTConfig
from .weight_copy import WeightCopy

TRAINING_NOISE_STREAM = 8  # the fresh noise of each trained timestep
TIMESTEP_ORDER_STREAM = 9  # which timesteps each sample trains on, in which order


def adaptive_flow_loss(v: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
    """Per sample: the squared error of the clean latent predicted with `v`, `x̂ = x_t - t·v`, over its (detached)
    mean absolute error (DiffusionNFT's adaptive weighting), in float64."""
    error = x_t.double() - torch.as_tensor(t, dtype=torch.float64, device=x_t.device) * v.double() - x0.double()
    dims = tuple(range(1, error.ndim))
    weight = error.abs().mean(dims).clamp_min(1e-5).detach()
    return (error**2).mean(dims) / weight


def diffusion_nft_loss(v_theta, v_old, x_t, x0, t, optimality: torch.Tensor, beta: float, scale: float) -> torch.Tensor:
    """DiffusionNFT's objective, per sample: `scale · [r·L(v+) + (1 - r)·L(v-)]` with `v+ = β·v_θ + (1-β)·v_old`,
    `v- = (1+β)·v_old - β·v_θ` and `L` the adaptive flow loss. At θ = θ_old its gradient is
    `scale·β·(2r - 1)·∇L(v_θ)`: with `scale = c/β` and `r = 0.5 + A/(2c)`, the advantage-weighted flow-matching
    gradient `A·∇L(v_θ)`."""
    positive = beta * v_theta + (1 - beta) * v_old
    negative = (1 + beta) * v_old - beta * v_theta
    optimality = optimality.double()
    return scale * (optimality * adaptive_flow_loss(positive, x_t, x0, t)
                    + (1 - optimality) * adaptive_flow_loss(negative, x_t, x0, t))


class DiffusionNFTTrainer(DecoderRLTrainer):
    """DiffusionNFT on the DiT of a UAE decoder, with the frozen encoder's captions and the reconstruction reward.

    Args:
        model (`str`, `PreTrainedModel` or `None`): the frozen encoder that writes the captions (default: the
            decoder's own `vlm`).
        decoder (`DiffusionPipeline`): the decoder whose DiT trains: a `UAEReconstructionPipeline` or a pipeline of a
            supported family (`uae_hf.decoders`).
        args ([`DiffusionNFTConfig`], *optional*): group, objective, old-policy, decoder and reward settings.
        train_dataset, eval_dataset: datasets with an `image` (or `images`) column.
        processing_class: the encoder's processor (default: the decoder's `processor`).
        peft_config (`peft.LoraConfig`, *optional*): the DiT LoRA (default: r=`decoder_lora_r`,
            alpha=`decoder_lora_alpha` on the joint-attention projections, gaussian init); ignored with
            `decoder_full_finetune`.
        callbacks, optimizers: as in `Trainer`.

    Example:

    ```python
    >>> from uae_hf import DiffusionNFTConfig, DiffusionNFTTrainer, load_uae_pipeline

    >>> decoder = load_uae_pipeline("path/to/sd3.5", "Qwen/Qwen2.5-VL-3B-Instruct", "path/to/projector")
    >>> args = DiffusionNFTConfig(output_dir="uae-diffusion-nft")
    >>> trainer = DiffusionNFTTrainer(decoder=decoder, args=args, train_dataset=images)
    >>> trainer.train()
    ```
    """

    config_class = DiffusionNFTConfig
    _tag_names = ["uae", "uae_hf", "diffusion-nft", "lora", "diffusers", "text-to-image"]
    _stage_description = "DiffusionNFT on the decoder's DiT, the encoder frozen"
    algorithm = "DiffusionNFT"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.old_policy = WeightCopy(self.accelerator.unwrap_model(self.model))

    @property
    def uses_reference(self) -> bool:
        return self.args.reference_weight > 0

    integer_rollout_timesteps = True  # the reference's sampler gives its DiT ⌊1000σ⌋

    def rollout_settings(self) -> tuple[float, str, float]:
        solver = "dpm2" if self.args.rollout_solver == "dpm2" else "sde"
        return 0.0, solver, self._unguided  # deterministic, without classifier-free guidance

    @property
    def _unguided(self) -> float:
        return self.decoder_family.unguided_scale(self.args.decoder_guidance_scale)

    def rollout_policy(self):
        """The old policy samples the rollouts (the reference samples with its "old" adapter)."""
        return self.old_policy.swapped_in(self.accelerator.unwrap_model(self.model))

    def trained_timesteps(self, count: int) -> torch.Tensor:
        """`(count, len(_trained_steps()))` schedule indices: each sample's trained timesteps, a random draw without
        replacement from the schedule's T (the reference permutes them per sample and trains the first ones), so a
        micro-batch mixes timesteps."""
        total = self.args.decoder_num_inference_steps
        generators = self._generators(TIMESTEP_ORDER_STREAM, count)
        return torch.stack([torch.randperm(total, generator=g)[: len(self._trained_steps())] for g in generators])

    def kept_trajectory(self, trajectory: Trajectory) -> Trajectory:
        """Only the clean latents (and the schedule): the update noises them afresh."""
        return Trajectory(trajectory.latents[:, -1:].clone(), trajectory.log_probs[:, :0], trajectory.timesteps,
                          trajectory.sigmas)

    def update(self, model, rollout: dict, fresh: bool) -> torch.Tensor:
        """The NFT loss (+ the reference term) at each trained timestep, with fresh noise, backpropagated step by
        step."""
        args = self.args
        trajectory, conditioning = rollout["trajectory"], rollout["conditioning"]
        x0 = trajectory.latents[:, -1]
        optimality = (0.5 + rollout["advantages"] / (2 * args.advantage_clip)).clamp(0, 1)
        dit = self.accelerator.unwrap_model(model)
        generators = self._generators(TRAINING_NOISE_STREAM, len(x0))
        indices = self.trained_timesteps(len(x0)).to(x0.device)

        def step_loss(position: int, index: int) -> torch.Tensor:
            timestep = trajectory.timesteps[indices[:, position]]
            t = trajectory.sigmas[indices[:, position]].view(-1, *[1] * (x0.ndim - 1))
            noise = randn_tensor(x0.shape, generator=generators, device=x0.device, dtype=x0.dtype)
            x_t = (1 - t) * x0 + t * noise
            # the old policy and the reference first: swapping weights under a graph that still needs them would
            # corrupt its backward pass
            velocity = self.decoder_family.velocity
            with self.old_policy.swapped_in(dit):
                v_old = velocity(dit, x_t, timestep, conditioning, self._unguided)
            v_ref = None
            if args.reference_weight > 0:
                with torch.no_grad(), self._reference() as reference:
                    v_ref = velocity(reference, x_t, timestep, conditioning, self._unguided)
            v = velocity(model, x_t, timestep, conditioning, self._unguided)
            per_sample = diffusion_nft_loss(v, v_old, x_t, x0, t, optimality, args.nft_beta,
                                            args.advantage_clip / args.nft_beta)
            loss = per_sample.mean().float()
            reference_term = torch.zeros((), device=loss.device)
            if v_ref is not None:
                reference_term = ((v.float() - v_ref.float()) ** 2).mean()
                loss = loss + args.reference_weight * reference_term
            self._record({"nft/velocity_to_old": float(((v.detach().float() - v_old.float()) ** 2).mean()),
                          "kl": float(reference_term.detach())})
            return loss

        total_loss = self.backpropagate_trained_steps(model, step_loss)
        self._record({"nft/optimality_mean": float(optimality.mean()),
                      "nft/old_policy_decay": args.old_policy_decay(self.state.global_step + 1)})
        return total_loss

    def after_optimizer_step(self, step: int) -> None:
        """The EMA (base), then the old policy once per rollout: `θ_old ← η·θ_old + (1 - η)·θ`."""
        super().after_optimizer_step(step)
        if step % self.args.num_iterations == 0:
            self.old_policy.blend(self.accelerator.unwrap_model(self.model), self.args.old_policy_decay(step))

    def weight_copies(self) -> dict:
        return super().weight_copies() | {"old_policy": self.old_policy}

    def card_settings(self) -> dict[str, str]:
        args = self.args
        return super().card_settings() | {
            "sampler": f"{'DPM-Solver++(2M)' if args.rollout_solver == 'dpm2' else 'Euler'} ODE, no guidance, "
            f"{args.decoder_num_inference_steps} steps, {args.decoder_width}x{args.decoder_height}",
            "beta": f"{args.nft_beta}",
            "old policy": f"eta = min({args.old_policy_decay_rate}·step, {args.old_policy_decay_max}) after "
            f"{args.old_policy_hold_steps} steps",
            "reference weight": f"{args.reference_weight}",
        }
