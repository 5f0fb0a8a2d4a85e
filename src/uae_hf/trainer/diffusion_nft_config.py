"""Configuration of [`DiffusionNFTTrainer`]."""

from dataclasses import dataclass, field

from .decoder_rl_config import DecoderRLConfig


@dataclass
class DiffusionNFTConfig(DecoderRLConfig):
    r"""
    Configuration class for [`DiffusionNFTTrainer`] ("Understanding for Generation" with DiffusionNFT, arXiv
    2509.16117: reinforcement learning on the forward process, CFG-free, no log-probs). Includes [`DecoderRLConfig`]
    (groups, advantages, what trains, EMA), [`DecoderTrainingConfig`] (DiT LoRA, captioning) and
    [`ReconstructionArguments`] (decoder, reward backbones, grids). Defaults are the reference's SD3.5 settings.

    Parameters that control the objective:
        nft_beta (`float`, defaults to `1.0`):
            β: the implicit positive and negative policies are `v± = v_old ± β·(v_θ - v_old)`; the loss is scaled by
            `advantage_clip / β`, so that at θ = θ_old its gradient is the advantage-weighted flow-matching gradient
            whatever β (0.1 learns faster, less stably).
        reference_weight (`float`, defaults to `1e-4`):
            Weight of `mean((v_θ - v_ref)²)`, v_ref the DiT with its LoRA disabled (a frozen copy when fully
            fine-tuned); 0 skips the reference's forward pass.
        old_policy_decay_rate (`float`, defaults to `0.001`), old_policy_decay_max (`float`, defaults to `0.5`),
        old_policy_hold_steps (`int`, defaults to `0`):
            After each rollout's optimizer steps the old policy moves as `θ_old ← η·θ_old + (1 - η)·θ` with
            `η = min(rate·(step - hold), max)` (0 during the first `hold` steps: θ_old follows θ exactly).
        rollout_solver (`str`, defaults to `"dpm2"`):
            The rollouts' deterministic sampler: `"dpm2"` (DPM-Solver++(2M), first order at the first and last steps,
            as the reference samples) or `"euler"` (the SD3 pipeline's own step). Any solver is valid: the update
            only sees the clean latents.
        weight_decay (`float`, defaults to `1e-4`), lr_scheduler_type (`str`, defaults to `"constant"`):
            The reference's AdamW settings.
        ema_decay (`float`, defaults to `0.9`), ema_update_interval (`int`, defaults to `1`):
            The reference's EMA of the trained weights (what gets saved and evaluated): blended after every
            optimizer step `s` with decay `min(0.9, (1 + s) / (10 + s))`. `ema_decay=None` saves the live weights.

    Rollouts are sampled by the old policy θ_old, deterministically (`rollout_solver`, the DiT reading `⌊1000σ⌋` as
    the reference's sampler gives it) and unguided; each keeps only its clean latents. Each sample trains on
    `int(T·timestep_fraction)` of the schedule's T timesteps, drawn at random per sample (so a micro-batch mixes
    timesteps), each with fresh noise.

    Example:

    ```python
    >>> from uae_hf import DiffusionNFTConfig

    >>> args = DiffusionNFTConfig(output_dir="uae-diffusion-nft", per_device_train_batch_size=24, num_generations=24)
    ```
    """

    nft_beta: float = field(
        default=1.0, metadata={"help": "beta of the implicit policies v+- = v_old +- beta (v_theta - v_old)."}
    )
    reference_weight: float = field(
        default=1e-4, metadata={"help": "Weight of mean((v_theta - v_ref)^2), v_ref the LoRA-disabled DiT."}
    )
    old_policy_decay_rate: float = field(
        default=0.001, metadata={"help": "Old-policy decay eta grows by this per optimizer step."}
    )
    old_policy_decay_max: float = field(default=0.5, metadata={"help": "Largest old-policy decay eta."})
    old_policy_hold_steps: int = field(
        default=0, metadata={"help": "Steps during which the old policy follows the trained one exactly (eta = 0)."}
    )
    rollout_solver: str = field(
        default="dpm2", metadata={"help": "Deterministic rollout sampler: DPM-Solver++(2M) or Euler.",
                                  "choices": ["dpm2", "euler"]}
    )
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning-rate schedule."})
    ema_decay: float | None = field(
        default=0.9, metadata={"help": "Exponential moving average of the trained weights (saved and evaluated; None: off)."}
    )
    ema_update_interval: int = field(default=1, metadata={"help": "Optimizer steps between EMA updates."})

    def __post_init__(self):
        super().__post_init__()
        if self.nft_beta <= 0:
            raise ValueError(f"nft_beta must be positive, got {self.nft_beta}")
        if self.rollout_solver not in ("dpm2", "euler"):
            raise ValueError(f"rollout_solver must be 'dpm2' or 'euler', got {self.rollout_solver!r}")
        if self.reference_weight < 0:
            raise ValueError(f"reference_weight must be non-negative, got {self.reference_weight}")
        if not 0 <= self.old_policy_decay_max < 1 or self.old_policy_decay_rate < 0 or self.old_policy_hold_steps < 0:
            raise ValueError(
                f"old policy schedule: decay_max must be in [0, 1), rate and hold_steps non-negative; got "
                f"rate={self.old_policy_decay_rate}, max={self.old_policy_decay_max}, hold={self.old_policy_hold_steps}"
            )

    def old_policy_decay(self, step: int) -> float:
        """η after optimizer step `step` (1 after the first)."""
        if step <= self.old_policy_hold_steps:
            return 0.0
        return min(self.old_policy_decay_rate * (step - self.old_policy_hold_steps), self.old_policy_decay_max)
