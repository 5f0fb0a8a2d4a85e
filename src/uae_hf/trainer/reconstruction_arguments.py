"""[`ReconstructionArguments`]: the decoder, reward and logging settings every UAE config shares."""

import json
from dataclasses import dataclass, field


@dataclass
class ReconstructionArguments:
    r"""
    How reconstructions are drawn and scored: the settings of the decoder that redraws each image from its caption, of
    the backbones that compare the two, and of the grids that show them. Every UAE config includes them (the reward
    of stage 2, the rollouts of stage 3, the evaluation of every stage); mix it in before a `TrainingArguments`
    subclass.

    Parameters that control the decoder:
        decoder_height (`int`, defaults to `512`):
            Height of the reconstructions, in pixels.
        decoder_width (`int`, defaults to `512`):
            Width of the reconstructions, in pixels.
        decoder_num_inference_steps (`int`, defaults to `10`):
            Decoder sampling steps.
        decoder_guidance_scale (`float`, defaults to `5.0`):
            Decoder classifier-free guidance scale.
        decoder_conditioning_mode (`str`, *optional*):
            `"embeddings"` (UAE-native: the LLM's hidden states through the projector) or `"text"` (SD3's own text
            encoders); defaults to the decoder's mode.
        reconstructions_per_caption (`int`, defaults to `1`):
            Decodes per caption, averaged into one reward (lower variance).
        reward_batch_size (`int`, defaults to `8`):
            Captions per decoder call.
        reward_fixed_noise (`bool`, defaults to `False`):
            Decode with the same noise at every step, which makes the reward a deterministic function of (caption,
            image); by default the noise changes per step and is shared within a step.

    Parameters that control the scoring:
        reward_backbones (`list[str]`, defaults to `["clip"]`):
            Backbones whose similarity is the reward (the paper rewards CLIP).
        reward_backbone_weights (`list[float]`, *optional*):
            One weight per rewarded backbone; equal by default.
        heldout_backbones (`list[str]`, defaults to `[]`):
            Backbones logged but never rewarded (reward hacking shows as rewarded similarity rising alone).
        backbone_checkpoints (`dict[str, str]` or JSON `str`, *optional*):
            Backbone → Hub id or folder.
        backbone_dtype (`str`, defaults to `"float32"`):
            Backbone dtype (`"bfloat16"` on a GPU).

    Parameters that control logging and memory:
        log_reconstructions_steps (`int`, defaults to `50`):
            Every N steps, save a grid of originals, captions and reconstructions under
            `output_dir/reconstructions/` and log it to the trackers of `report_to` that take images (TensorBoard,
            wandb, trackio); 0 disables.
        num_logged_reconstructions (`int`, defaults to `4`):
            Rows of that grid.
        activation_checkpointing (`bool`, defaults to `True`):
            Recompute activations in the backward pass to save memory. `gradient_checkpointing` is its deprecated
            alias.
        shard_frozen_models (`bool`, defaults to `True`):
            When FSDP2 trains on several processes, also shard the frozen models (the encoder that captions, the
            decoder's DiT, VAE and text encoders, whichever the stage does not train) across them for inference,
            gathered block by block as they run, so that each process holds a 1/N share of them instead of a whole
            copy. No effect under other engines or on one process.
    """

    decoder_height: int = field(default=512, metadata={"help": "Height of the reconstructions, in pixels."})
    decoder_width: int = field(default=512, metadata={"help": "Width of the reconstructions, in pixels."})
    decoder_num_inference_steps: int = field(default=10, metadata={"help": "Decoder sampling steps."})
    decoder_guidance_scale: float = field(default=5.0, metadata={"help": "Decoder classifier-free guidance scale."})
    decoder_conditioning_mode: str | None = field(
        default=None,
        metadata={"help": "Decoder conditioning: 'embeddings' (UAE-native) or 'text'; default: the decoder's own.",
                  "choices": ["embeddings", "text", None]},
    )
    reconstructions_per_caption: int = field(
        default=1, metadata={"help": "Decodes per caption, averaged into one reward (lower variance)."}
    )
    reward_batch_size: int = field(default=8, metadata={"help": "Captions per decoder call."})
    reward_fixed_noise: bool = field(
        default=False,
        metadata={"help": "Decode with the same noise at every step (deterministic reward per caption and image)."},
    )
    reward_backbones: list[str] = field(
        default_factory=lambda: ["clip"], metadata={"help": "Backbones whose similarity is the reward."}
    )
    reward_backbone_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per rewarded backbone (default: equal)."}
    )
    heldout_backbones: list[str] = field(
        default_factory=list, metadata={"help": "Backbones logged as held-out similarity, never rewarded."}
    )
    backbone_checkpoints: dict | str | None = field(
        default=None,
        metadata={"help": "Backbone -> Hub id or folder, as a mapping (YAML) or a JSON string (command line)."},
    )
    backbone_dtype: str = field(default="float32", metadata={"help": "Backbone dtype: float32, bfloat16, float16."})
    log_reconstructions_steps: int = field(
        default=50, metadata={"help": "Save a grid of originals, captions and reconstructions every N steps, and log it to "
                                  "the report_to trackers that take images (0: off)."}
    )
    num_logged_reconstructions: int = field(default=4, metadata={"help": "Rows of the reconstruction grid."})
    # transformers defaults checkpointing to off; the decoder's memory needs it on. The deprecated alias
    # `gradient_checkpointing` is honoured when given alone (transformers maps it in `__post_init__`).
    activation_checkpointing: bool | None = field(
        default=None, metadata={"help": "Recompute activations in the backward pass to save memory (default: on)."}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing`."}
    )
    shard_frozen_models: bool = field(
        default=True,
        metadata={"help": "Under FSDP2 on several processes, shard the frozen models (encoder, decoder parts) across "
                  "them for inference (a 1/N share per process instead of a whole copy)."},
    )

    def __getstate__(self):
        """Pickled copies (`training_args.bin`, saved beside the weights and pushed with them) hold no Hub token."""
        return {**self.__dict__, "hub_token": None}

    def __post_init__(self):
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        super().__post_init__()
        if isinstance(self.backbone_checkpoints, str):
            self.backbone_checkpoints = json.loads(self.backbone_checkpoints)
        if self.reward_backbone_weights is not None and len(self.reward_backbone_weights) != len(self.reward_backbones):
            raise ValueError(
                f"reward_backbone_weights has {len(self.reward_backbone_weights)} entries for "
                f"{len(self.reward_backbones)} reward_backbones; give one weight per backbone"
            )
        if self.reconstructions_per_caption < 1:
            raise ValueError("reconstructions_per_caption must be at least 1")

    def check_checkpoints_fall_between_rollouts(self, period: int, period_name: str) -> None:
        """A rollout serves `period` micro-steps and is not saved, so a checkpoint inside one could not be resumed
        exactly."""
        if self.save_strategy != "steps" or self.save_steps < 1:
            return
        if (int(self.save_steps) * self.gradient_accumulation_steps) % period:
            raise ValueError(
                f"save_steps ({self.save_steps}) × gradient_accumulation_steps ({self.gradient_accumulation_steps}) "
                f"must be a multiple of {period} ({period_name}): a checkpoint in the middle of a rollout's updates "
                "could not be resumed exactly"
            )


def check_group_size(num_generations: int | None) -> None:
    if num_generations is None or num_generations < 2:
        raise ValueError(
            f"num_generations={num_generations}: GRPO compares samples within a group, so it needs at least 2 "
            "generations per image"
        )
