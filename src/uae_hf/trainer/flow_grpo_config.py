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
        filter_zero_advantages (`bool`, defaults to `True`):
            Leave the samples whose advantage is exactly 0 (a group whose rewards are all equal, a NaN reward) out of
            the update, as Flow-GRPO does: the loss averages over the informative samples only, and their KL alone
            counts. The share left out is logged as `advantages/filtered_fraction`. A micro-batch with no informative
            sample trains on all of its samples (only the KL then has a gradient).
        detach_unconditional (`bool`, defaults to `False`):
            Stop gradients through the unconditional branch of classifier-free guidance in the update, so only the
            conditional branch trains (`w·∇c` instead of `(1 - w)·∇u + w·∇c`). Off by default, as in Flow-GRPO's SD3
            training script, whose update backpropagates through both branches; rollouts are never affected.

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

    Parameters that control the optimizer:
        weight_decay (`float`, defaults to `1e-4`), lr_scheduler_type (`str`, defaults to `"constant"`):
            Flow-GRPO's AdamW settings.

    The EMA (`ema_decay`) is off by default, so that what is saved is what trained; Flow-GRPO's SD3 recipes keep
    one (`ema_decay=0.9`, `ema_update_interval=8`, as `examples/recipes/generation_sd3.5.yaml` sets them).

    Optimizer steps per rollout, against Flow-GRPO's: each of its epochs samples a batch, then makes
    `train.num_inner_epochs` passes over it (reshuffled), each pass split into train batches with gradient accumulation
    (its SD3 recipes: one pass, two optimizer steps per sampled batch, the second one step off-policy). Here each
    micro-batch gets its own rollout and the rollouts of a step's accumulation window serve `num_iterations` optimizer
    steps, so `num_iterations` is `num_inner_epochs` (each sample trained on μ times, from the second time
    off-policy) and `gradient_accumulation_steps` is its accumulation. The split of one sampled batch over two steps
    has no counterpart: every step here first trains on samples of its own weights (two of Flow-GRPO's steps are
    two steps here, each sampling half the batch).

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
    filter_zero_advantages: bool = field(
        default=True, metadata={"help": "Leave samples whose advantage is 0 out of the update (as Flow-GRPO)."}
    )
    detach_unconditional: bool = field(
        default=False, metadata={"help": "Train through the conditional CFG branch only (no gradient through the "
                                 "unconditional one)."}
    )
    sde_method: str = field(default="sde", metadata={"help": "Stochastic step: 'sde' or 'cps'.",
                                                     "choices": ["sde", "cps"]})
    sde_noise_level: float = field(default=0.7, metadata={"help": "Noise level a of the stochastic step."})
    timestep_window: str | None = field(
        default=None, metadata={"help": "'start:end' step indices the trained steps are taken from (default: all)."}
    )
    train_guidance: bool = field(
        default=True, metadata={"help": "Classifier-free guidance in rollouts and updates."}
    )
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning-rate schedule."})

    def __post_init__(self):
        super().__post_init__()
        if self.timestep_window is not None:
            start, _, end = self.timestep_window.partition(":")
            if not (start.strip().isdigit() and end.strip().isdigit() and int(start) < int(end)):
                raise ValueError(f"timestep_window must look like 'start:end' with start < end, got "
                                 f"{self.timestep_window!r}")
