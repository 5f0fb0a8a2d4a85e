"""Configuration of [`DecoderPretrainingTrainer`]."""

from dataclasses import dataclass, field

from .decoder_training_config import DecoderTrainingConfig


@dataclass
class DecoderPretrainingConfig(DecoderTrainingConfig):
    r"""
    Configuration class for [`DecoderPretrainingTrainer`] (projector + DiT learn to read long captions through the
    LLM's "generate"-role hidden states with SD3's rectified-flow loss, the LLM frozen). Includes
    [`DecoderTrainingConfig`] (DiT LoRA, captioning for evaluation) and [`ReconstructionArguments`].

    Parameters that control the data:
        caption_column (`str`, defaults to `"caption"`):
            The dataset's long-caption column.
        caption_dropout (`float`, defaults to `0.1`):
            Probability of an empty caption (for classifier-free guidance).

    Parameters that control the loss:
        learning_rate (`float`, defaults to `1e-4`):
            AdamW learning rate.
        weighting_scheme (`str`, defaults to `"logit_normal"`):
            Timestep sampling and loss weighting as diffusers' SD3 training offers them (`logit_normal`, `mode`,
            `uniform`; `sigma_sqrt`, `cosmap`, `none`).
        logit_mean (`float`, defaults to `0.0`):
            Mean of the logit-normal timestep density.
        logit_std (`float`, defaults to `1.0`):
            Std of the logit-normal timestep density.
        mode_scale (`float`, defaults to `1.29`):
            Scale of the "mode" timestep density.
        pretrain_full_dit (`bool`, defaults to `False`):
            Train every DiT weight instead of a LoRA.

    Example:

    ```python
    >>> from uae_hf import DecoderPretrainingConfig

    >>> args = DecoderPretrainingConfig(output_dir="uae-pretrain", caption_column="long_caption")
    ```
    """

    caption_column: str = field(default="caption", metadata={"help": "Dataset column with the long captions."})
    caption_dropout: float = field(default=0.1, metadata={"help": "Probability of an empty caption."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    weighting_scheme: str = field(
        default="logit_normal",
        metadata={"help": "Timestep sampling and loss weighting.",
                  "choices": ["logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap", "none"]},
    )
    logit_mean: float = field(default=0.0, metadata={"help": "Mean of the logit-normal timestep density."})
    logit_std: float = field(default=1.0, metadata={"help": "Std of the logit-normal timestep density."})
    mode_scale: float = field(default=1.29, metadata={"help": "Scale of the 'mode' timestep density."})
    pretrain_full_dit: bool = field(default=False, metadata={"help": "Train all DiT weights instead of a LoRA."})

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
