"""Configuration of [`UnifiedGRPOTrainer`]."""

from dataclasses import dataclass, field

from trl import GRPOConfig

from .reconstruction_arguments import ReconstructionArguments, check_group_size


@dataclass
class UnifiedGRPOConfig(ReconstructionArguments, GRPOConfig):
    r"""
    Configuration class for [`UnifiedGRPOTrainer`] ("Generation for Understanding": GRPO on the encoder, the frozen
    decoder's reconstruction fidelity as the reward): TRL's [`~trl.GRPOConfig`] plus [`ReconstructionArguments`]
    (decoder, reward backbones, reconstruction grids; see there) and the fields below.

    Parameters that control the decoder:
        decoder_text_encoder (`str`, defaults to `"frozen"`):
            Where the decoder reads captions with the model being trained (embeddings mode's LLM; a Qwen-Image or
            FLUX.2 [klein] text encoder built as that model), whether it reads them with the frozen base weights
            (`"frozen"`: the policy's adapters disabled while decoding) or with the current `"policy"`.

    Example:

    ```python
    >>> from uae_hf import UnifiedGRPOConfig

    >>> args = UnifiedGRPOConfig(output_dir="uae-grpo", num_generations=8, reward_backbones=["clip"])
    ```
    """

    decoder_text_encoder: str = field(
        default="frozen",
        metadata={"help": "Where the decoder reads captions with the model being trained (embeddings mode's LLM, "
                  "a Qwen-Image or FLUX.2 [klein] text encoder): with its frozen base weights ('frozen', adapters "
                  "disabled) or with the current policy ('policy').", "choices": ["frozen", "policy"]},
    )

    def __post_init__(self):
        super().__post_init__()
        check_group_size(self.num_generations)
        self.check_checkpoints_fall_between_rollouts(self.num_iterations * self.steps_per_generation,
                                                     "num_iterations × steps_per_generation")
