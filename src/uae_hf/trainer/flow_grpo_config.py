"""Configuration of [`FlowGRPOTrainer`]."""

from dataclasses import dataclass, field

from .decoder_training_config import DecoderTrainingConfig
from .reconstruction_arguments import check_group_size


@dataclass
class FlowGRPOConfig(DecoderTrainingConfig):
    r"""
    Configuration class for [`FlowGRPOTrainer`] ("Understanding for Generation": Flow-GRPO on the decoder's DiT, the
    encoder frozen). Includes [`DecoderTrainingConfig`] (DiT LoRA, captioning) and [`ReconstructionArguments`]
    (decoder, reward backbones, grids).

    Parameters that control the groups and the objective:
        learning_rate (`float`, defaults to `3e-4`):
            AdamW learning rate (Flow-GRPO's for an SD3 LoRA).
        num_generations (`int`, defaults to `8`):
            Reconstructions per caption (the group G); `per_device_train_batch_size` must be a multiple of it.
        num_iterations (`int`, defaults to `1`):
            Optimizer steps per rollout (μ); the later ones are off-policy and clipped. With gradient accumulation,
            each micro-batch of a step gets its own rollout, and the window's rollouts serve the next μ steps.
        beta (`float`, defaults to `0.0`):
            KL coefficient to the reference DiT (the LoRA disabled, or a frozen copy when fully fine-tuned), on the
            step means scaled as in Flow-GRPO: `mean((μ_θ - μ_ref)²) / (2·std_t²)`.
        scale_rewards (`str`, defaults to `"group"`):
            Advantage scaling: by the group's std (`"group"`), the std of all processes' rewards (`"batch"`), or
            none (`"none"`).
        flow_clip_range (`float`, defaults to `1e-4`):
            Ratio clipping ε (small: log-probs are per-element means).
        advantage_clip (`float`, defaults to `5.0`):
            Advantages are clipped to ±this.

    Parameters that control the sampler:
        sde_method (`str`, defaults to `"sde"`):
            Stochastic step, `"sde"` or `"cps"`.
        sde_noise_level (`float`, defaults to `0.7`):
            The step's noise level `a`.
        timestep_fraction (`float`, defaults to `0.99`):
            Fraction of the sampling steps trained per update (0.99 of 10 → 9), drawn at random each step from
            `timestep_window`.
        timestep_window (`str`, *optional*):
            `"start:end"` step indices the trained steps are drawn from (default: all).
        train_guidance (`bool`, defaults to `True`):
            Classifier-free guidance (at `decoder_guidance_scale`) in rollouts and updates; off samples and trains
            the conditional branch alone.
        same_noise_in_group (`bool`, defaults to `False`):
            One initial noise for all G samples of an image.

    Parameters that control what trains:
        decoder_full_finetune (`bool`, defaults to `False`):
            Train every DiT weight instead of a LoRA.
        disable_dropout (`bool`, defaults to `False`):
            Set every dropout of the DiT (the LoRA's included) to 0. Rollouts always sample in eval mode; with
            dropout active in the update, even the first update of a rollout has ratio != 1.
        ema_decay (`float`, *optional*):
            Keep an exponential moving average of the trained weights and save it.

    Example:

    ```python
    >>> from uae_hf import FlowGRPOConfig

    >>> args = FlowGRPOConfig(output_dir="uae-flow-grpo", per_device_train_batch_size=24, num_generations=24, beta=0.04)
    ```
    """

    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate."})
    num_generations: int = field(default=8, metadata={"help": "Reconstructions per caption (group size G)."})
    num_iterations: int = field(
        default=1, metadata={"help": "Optimizer steps per rollout (mu); one rollout per micro-batch of a step."}
    )
    beta: float = field(
        default=0.0, metadata={"help": "KL coefficient to the reference DiT (Flow-GRPO's scale: / (2 std_t^2))."}
    )
    scale_rewards: str = field(
        default="group", metadata={"help": "Advantage scaling.", "choices": ["group", "batch", "none"]}
    )
    flow_clip_range: float = field(default=1e-4, metadata={"help": "Flow-GRPO ratio clipping epsilon."})
    advantage_clip: float = field(default=5.0, metadata={"help": "Clip advantages to +-this."})
    sde_method: str = field(default="sde", metadata={"help": "Stochastic step: 'sde' or 'cps'.",
                                                     "choices": ["sde", "cps"]})
    sde_noise_level: float = field(default=0.7, metadata={"help": "Noise level a of the stochastic step."})
    timestep_fraction: float = field(
        default=0.99, metadata={"help": "Fraction of the sampling steps trained per update (0.99 of 10 -> 9)."}
    )
    timestep_window: str | None = field(
        default=None, metadata={"help": "'start:end' step indices the trained steps are drawn from (default: all)."}
    )
    train_guidance: bool = field(
        default=True, metadata={"help": "Classifier-free guidance in rollouts and updates."}
    )
    same_noise_in_group: bool = field(
        default=False, metadata={"help": "One initial noise for all G samples of an image."}
    )
    decoder_full_finetune: bool = field(
        default=False, metadata={"help": "Train all DiT weights instead of a LoRA."}
    )
    disable_dropout: bool = field(
        default=False, metadata={"help": "Set every dropout of the DiT (LoRA's included) to 0, so ratios start at 1."}
    )
    ema_decay: float | None = field(
        default=None, metadata={"help": "Exponential moving average of the trained weights (saved when set)."}
    )

    def __post_init__(self):
        super().__post_init__()
        check_group_size(self.num_generations)
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple of "
                f"num_generations ({self.num_generations}): each device holds whole groups of reconstructions"
            )
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {self.scale_rewards!r}")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.timestep_window is not None:
            start, _, end = self.timestep_window.partition(":")
            if not (start.strip().isdigit() and end.strip().isdigit() and int(start) < int(end)):
                raise ValueError(f"timestep_window must look like 'start:end' with start < end, got "
                                 f"{self.timestep_window!r}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        # a window's rollouts serve μ optimizer steps, μ × gradient_accumulation_steps micro-steps
        accumulation = self.gradient_accumulation_steps
        self.check_checkpoints_fall_between_rollouts(
            self.num_iterations * accumulation,
            "num_iterations" if accumulation == 1 else "num_iterations × gradient_accumulation_steps",
        )
