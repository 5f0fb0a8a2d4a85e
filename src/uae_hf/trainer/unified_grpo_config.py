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
            In embeddings mode, whether the decoder's LLM reads captions with the frozen base weights (`"frozen"`:
            the policy's adapters disabled while decoding) or with the current `"policy"`.
        shard_decoder (`bool`, defaults to `True`):
            When FSDP2 trains the encoder on several processes, also shard the frozen decoder's DiT, VAE and text
            encoders across them for inference (gathered block by block while it decodes), so that each process holds
            a 1/N share of them instead of a whole copy. No effect under other engines or on one process.

    Example:

    ```python
    >>> from uae_hf import UnifiedGRPOConfig

    >>> args = UnifiedGRPOConfig(output_dir="uae-grpo", num_generations=8, reward_backbones=["clip"])
    ```
    """

    decoder_text_encoder: str = field(
        default="frozen",
        metadata={"help": "Embeddings mode: decode with the frozen base LLM ('frozen', adapters disabled) or with "
                  "the current policy ('policy').", "choices": ["frozen", "policy"]},
    )
    shard_decoder: bool = field(
        default=True,
        metadata={"help": "Under FSDP2 on several processes, shard the frozen decoder's DiT, VAE and text encoders "
                  "across them for inference (a 1/N share per process instead of a whole copy)."},
    )

    def __post_init__(self):
        super().__post_init__()
        check_group_size(self.num_generations)
        self.check_checkpoints_fall_between_rollouts(self.num_iterations * self.steps_per_generation,
                                                     "num_iterations × steps_per_generation")
