"""Configuration of [`FlowGRPOTrainer`]."""

from dataclasses import dataclass, field

from .decoder_rl_config import DecoderRLConfig


@dataclass
class FlowGRPOConfig(DecoderRLConfig):
    r"""
    Configuration class for [`FlowGRPOTrainer`] ("Understanding for Generation": Flow-GRPO on the decoder's DiT, the
    encoder frozen). Includes [`DecoderRLConfig`] (groups, advantages, what trains, EMA), [`DecoderTrainingConfig`]
    (DiT LoRA, captioning) and [`ReconstructionArguments`] (decoder, reward backbones, grids).

    Parameters that control the objective:
        beta (`float`, defaults to `0.0`):
            KL coefficient to the reference DiT (the LoRA disabled, or a frozen copy when fully fine-tuned), on the
            step means scaled as in Flow-GRPO: `mean((μ_θ - μ_ref)²) / (2·std_t²)`.
        flow_clip_range (`float`, defaults to `1e-4`):
            Ratio clipping ε (small: log-probs are per-element means).

    Parameters that control the sampler:
        sde_method (`str`, defaults to `"sde"`):
            Stochastic step, `"sde"` or `"cps"`.
        sde_noise_level (`float`, defaults to `0.7`):
            The step's noise level `a`.
        timestep_window (`str`, *optional*):
            `"start:end"` step indices the trained steps are taken from (default: all); the first
            `int(T·timestep_fraction)` of them train.
        train_guidance (`bool`, defaults to `True`):
            Classifier-free guidance (at `decoder_guidance_scale`) in rollouts and updates; off samples and trains
            the conditional branch alone.

    Example:

    ```python
    >>> from uae_hf import FlowGRPOConfig

    >>> args = FlowGRPOConfig(output_dir="uae-flow-grpo", per_device_train_batch_size=24, num_generations=24, beta=0.04)
    ```
    """

    beta: float = field(
        default=0.0, metadata={"help": "KL coefficient to the reference DiT (Flow-GRPO's scale: / (2 std_t^2))."}
    )
    flow_clip_range: float = field(default=1e-4, metadata={"help": "Flow-GRPO ratio clipping epsilon."})
    sde_method: str = field(default="sde", metadata={"help": "Stochastic step: 'sde' or 'cps'.",
                                                     "choices": ["sde", "cps"]})
    sde_noise_level: float = field(default=0.7, metadata={"help": "Noise level a of the stochastic step."})
    timestep_window: str | None = field(
        default=None, metadata={"help": "'start:end' step indices the trained steps are taken from (default: all)."}
    )
    train_guidance: bool = field(
        default=True, metadata={"help": "Classifier-free guidance in rollouts and updates."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.timestep_window is not None:
            start, _, end = self.timestep_window.partition(":")
            if not (start.strip().isdigit() and end.strip().isdigit() and int(start) < int(end)):
                raise ValueError(f"timestep_window must look like 'start:end' with start < end, got "
                                 f"{self.timestep_window!r}")
