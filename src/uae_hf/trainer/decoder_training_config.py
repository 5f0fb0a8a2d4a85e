"""[`DecoderTrainingConfig`]: what the trainers of the decoder's parts ([`FlowGRPOTrainer`],
[`DecoderPretrainingTrainer`], [`ColdStartTrainer`]) share."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .reconstruction_arguments import ReconstructionArguments

@dataclass
class DecoderTrainingConfig(ReconstructionArguments, TrainingArguments):
    r"""
    Base configuration of the trainers that train parts of the decoder: transformers' `TrainingArguments`,
    [`ReconstructionArguments`] (decoder, backbones, grids; also what `evaluate()` reconstructs and scores with) and
    the fields below.

    Parameters that control the DiT LoRA:
        decoder_lora_r (`int`, defaults to `32`):
            Rank of the default DiT LoRA (on the joint-attention projections) when no `peft_config` is given.
        decoder_lora_alpha (`int`, defaults to `64`):
            Alpha of that LoRA.

    Parameters that control captioning (the encoder writes captions for rollouts, for images without one, and for
    the round trips of `evaluate()`):
        max_completion_length (`int`, defaults to `512`):
            Longest caption, in tokens.
        caption_do_sample (`bool`, defaults to `False`):
            Sample captions at `temperature` instead of decoding greedily.
        temperature (`float`, defaults to `1.0`):
            Sampling temperature when `caption_do_sample`.
    """

    decoder_lora_r: int = field(default=32, metadata={"help": "Rank of the default DiT LoRA."})
    decoder_lora_alpha: int = field(default=64, metadata={"help": "Alpha of the default DiT LoRA."})
    max_completion_length: int = field(default=512, metadata={"help": "Longest caption the encoder writes, in tokens."})
    caption_do_sample: bool = field(
        default=False, metadata={"help": "Sample the encoder's captions at `temperature` instead of greedy decoding."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Caption sampling temperature (with caption_do_sample)."})
    # rows reach the trainers whole (images, captions): no column is dropped for a model signature
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep every dataset column (the trainers read images and captions)."}
    )
