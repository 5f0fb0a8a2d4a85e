"""Configuration of [`ColdStartTrainer`]."""

from dataclasses import dataclass, field

from .decoder_training_config import DecoderTrainingConfig

COLD_START_PARTS = ("projector", "llm_lora", "dit_lora")


@dataclass
class ColdStartConfig(DecoderTrainingConfig):
    r"""
    Configuration class for [`ColdStartTrainer`] (the semantic reconstruction loss `1 - cos(E(x_hat), E(x))`,
    back-propagated through a short sampler; `E` are the `reward_backbones` with their weights). Includes
    [`DecoderTrainingConfig`] (DiT LoRA, captioning) and [`ReconstructionArguments`] (decoder, backbones, grids).

    Parameters that control the data:
        caption_column (`str`, defaults to `"caption"`):
            The dataset's caption column; the encoder captions each image without a non-empty one, and the caption
            is then teacher-forced.

    Parameters that control what trains:
        learning_rate (`float`, defaults to `1e-4`):
            AdamW learning rate.
        cold_start_trainable (`list[str]`, defaults to `["projector"]`):
            Any of `projector`, `llm_lora`, `dit_lora`.
        cold_start_checkpointing (`bool`, defaults to `True`):
            Recompute each sampler step in the backward pass.
        llm_lora_r (`int`, defaults to `32`):
            Rank of the LLM LoRA (all linear layers of the language model) when `llm_lora` trains.
        llm_lora_alpha (`int`, defaults to `64`):
            Alpha of that LoRA.

    Example:

    ```python
    >>> from uae_hf import ColdStartConfig

    >>> args = ColdStartConfig(output_dir="uae-cold-start", cold_start_trainable=["projector", "dit_lora"])
    ```
    """

    caption_column: str = field(default="caption", metadata={"help": "Dataset column with the captions."})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    cold_start_trainable: list[str] = field(
        default_factory=lambda: ["projector"],
        metadata={"help": "Parts that train, among projector, llm_lora, dit_lora."},
    )
    cold_start_checkpointing: bool = field(
        default=True, metadata={"help": "Recompute each sampler step during the backward pass."}
    )
    llm_lora_r: int = field(default=32, metadata={"help": "Rank of the LLM LoRA."})
    llm_lora_alpha: int = field(default=64, metadata={"help": "Alpha of the LLM LoRA."})

    def __post_init__(self):
        super().__post_init__()
        unknown = set(self.cold_start_trainable) - set(COLD_START_PARTS)
        if unknown or not self.cold_start_trainable:
            raise ValueError(f"cold_start_trainable must be a non-empty subset of {COLD_START_PARTS}, got "
                             f"{self.cold_start_trainable}")
