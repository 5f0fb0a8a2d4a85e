"""[`DecoderRLConfig`]: what the reinforcement-learning trainers of the decoder ([`FlowGRPOTrainer`],
[`DiffusionNFTTrainer`]) share: groups, advantages, what trains, the weights' EMA."""

from dataclasses import dataclass, field

from .decoder_training_config import DecoderTrainingConfig
from .reconstruction_arguments import check_group_size


@dataclass
class DecoderRLConfig(DecoderTrainingConfig):
    r"""
    Base configuration of the decoder's reinforcement-learning trainers ("Understanding for Generation": the DiT
    learns from the reconstruction reward of its own samples, the encoder frozen). Includes [`DecoderTrainingConfig`]
    (DiT LoRA, captioning) and [`ReconstructionArguments`] (decoder, reward backbones, grids).

    Parameters that control the groups and the advantages:
        learning_rate (`float`, defaults to `3e-4`):
            AdamW learning rate (Flow-GRPO's and DiffusionNFT's for an SD3 LoRA).
        num_generations (`int`, defaults to `8`):
            Reconstructions per caption (the group G); `per_device_train_batch_size` must be a multiple of it.
        num_iterations (`int`, defaults to `1`):
            Optimizer steps per rollout (μ). With gradient accumulation, each micro-batch of a step gets its own
            rollout, and the window's rollouts serve the next μ steps.
        scale_rewards (`str`, defaults to `"batch"`):
            Advantages are rewards minus their group's mean, divided by the std of every reward of the optimizer
            step, over all its micro-batches and processes (`"batch"`, the global std of Flow-GRPO's SD3 recipes and
            of DiffusionNFT: a step's micro-batches are all sampled before its first update), by the group's std
            (`"group"`, TRL's GRPO default), or by nothing (`"none"`).
        advantage_clip (`float`, defaults to `5.0`):
            Advantages are clipped to ±this.
        same_noise_in_group (`bool`, defaults to `False`):
            One initial noise for all G samples of an image.
        timestep_fraction (`float`, defaults to `0.99`):
            Fraction of the sampling steps trained per update, `int(T·fraction)` of them (9 of 10): Flow-GRPO trains
            the first ones, DiffusionNFT a random draw per sample.

    Parameters that control what trains:
        decoder_full_finetune (`bool`, defaults to `False`):
            Train every DiT weight instead of a LoRA (the reference is then a frozen copy of the DiT).
        disable_dropout (`bool`, defaults to `False`):
            Set every dropout of the DiT (the LoRA's included) to 0. Rollouts always sample in eval mode.
        ema_decay (`float`, *optional*):
            Keep an exponential moving average of the trained weights; save and evaluate it instead of the live
            ones (Flow-GRPO's SD3 recipes and DiffusionNFT: 0.9). Its decay warms up as `min(decay, (1 + s) / (10 + s))`
            after optimizer step `s` (counted from 1), as the references' EMA computes it.
        ema_update_interval (`int`, defaults to `8`):
            The EMA blends after the optimizer steps `s` with `s + 1` a multiple of this (7, 15, ... for Flow-GRPO's
            8), as the references' EMA does. Flow-GRPO's also blends again at each further micro-batch of such a
            step under gradient accumulation; here it blends once per optimizer step.
    """

    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate."})
    num_generations: int = field(default=8, metadata={"help": "Reconstructions per caption (group size G)."})
    num_iterations: int = field(
        default=1, metadata={"help": "Optimizer steps per rollout (mu); one rollout per micro-batch of a step."}
    )
    scale_rewards: str = field(
        default="batch",
        metadata={"help": "Advantage scaling: the std of the step's rewards over all micro-batches and processes "
                  "('batch'), each group's std ('group') or none.", "choices": ["batch", "group", "none"]},
    )
    advantage_clip: float = field(default=5.0, metadata={"help": "Clip advantages to +-this."})
    same_noise_in_group: bool = field(
        default=False, metadata={"help": "One initial noise for all G samples of an image."}
    )
    timestep_fraction: float = field(
        default=0.99, metadata={"help": "Fraction of the sampling steps trained per update: int(T * fraction) of "
                                "them (0.99 of 10 -> 9)."}
    )
    decoder_full_finetune: bool = field(
        default=False, metadata={"help": "Train all DiT weights instead of a LoRA."}
    )
    disable_dropout: bool = field(
        default=False, metadata={"help": "Set every dropout of the DiT (LoRA's included) to 0."}
    )
    ema_decay: float | None = field(
        default=None, metadata={"help": "Exponential moving average of the trained weights (saved and evaluated when set)."}
    )
    ema_update_interval: int = field(default=8, metadata={"help": "Optimizer steps between EMA updates."})

    def __post_init__(self):
        super().__post_init__()
        check_group_size(self.num_generations)
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple of "
                f"num_generations ({self.num_generations}): each device holds whole groups of reconstructions"
            )
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be 'batch', 'group' or 'none', got {self.scale_rewards!r}")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.ema_update_interval < 1:
            raise ValueError(f"ema_update_interval must be at least 1, got {self.ema_update_interval}")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be at least 1, got {self.num_iterations}")
        # a window's rollouts serve μ optimizer steps, μ × gradient_accumulation_steps micro-steps
        accumulation = self.gradient_accumulation_steps
        self.check_checkpoints_fall_between_rollouts(
            self.num_iterations * accumulation,
            "num_iterations" if accumulation == 1 else "num_iterations × gradient_accumulation_steps",
        )
