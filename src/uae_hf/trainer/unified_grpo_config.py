"""Configuration of [`UnifiedGRPOTrainer`]."""

import json
from dataclasses import dataclass, field

from trl import GRPOConfig

STAGES = ("understanding", "generation", "pretrain", "cold_start")
COLD_START_PARTS = ("projector", "llm_lora", "dit_lora")
DIT_LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out"]


@dataclass
class UnifiedGRPOConfig(GRPOConfig):
    r"""
    Configuration class for [`UnifiedGRPOTrainer`]: TRL's [`~trl.GRPOConfig`] plus the UAE stage, the decoder that
    computes the reward, and the backbones that score it.

    Parameters that control the stage:
        stage (`str`, defaults to `"understanding"`): `"understanding"` trains the encoder with GRPO, the decoder
            frozen as its reward ("Generation for Understanding"); `"generation"` trains the decoder's DiT with
            Flow-GRPO, the encoder frozen ("Understanding for Generation"); `"pretrain"` trains projector + DiT with
            the rectified-flow loss on (image, long caption) pairs through the LLM "generate" path, the LLM frozen;
            `"cold_start"` trains the parts in `cold_start_trainable` with the semantic reconstruction loss
            `1 - cos(E(x_hat), E(x))`, back-propagated through a short sampler.

    Parameters that control stages "pretrain" and "cold_start":
        caption_column (`str`, defaults to `"caption"`): the dataset's caption column (cold start captions
            each image it lacks a non-empty caption for with the encoder, then teacher-forces that caption).
        caption_dropout (`float`, defaults to 0.1): pretrain: probability of an empty caption (for CFG).
        weighting_scheme (`str`, defaults to `"logit_normal"`): pretrain timestep sampling / loss weighting, as
            diffusers' SD3 training offers (`logit_normal`, `mode`, `uniform`; `sigma_sqrt`, `cosmap`).
        logit_mean (`float`, defaults to 0.0), logit_std (`float`, defaults to 1.0), mode_scale (`float`,
            defaults to 1.29): parameters of those schemes.
        pretrain_full_dit (`bool`, defaults to `False`): pretrain every DiT weight instead of a LoRA.
        cold_start_trainable (`list[str]`, defaults to `["projector"]`): any of `projector`, `llm_lora`, `dit_lora`.
        cold_start_checkpointing (`bool`, defaults to `True`): recompute each sampler step in the backward pass.
        llm_lora_r (`int`, defaults to 32), llm_lora_alpha (`int`, defaults to 64): the LLM LoRA (all linear
            layers of the language model) when `llm_lora` trains.

    Parameters that control stage "generation" (Flow-GRPO on the decoder):
        sde_method (`str`, defaults to `"sde"`): stochastic step, `"sde"` or `"cps"`.
        sde_noise_level (`float`, defaults to 0.7): the step's noise level `a`.
        timestep_fraction (`float`, defaults to 0.99): fraction of the sampling steps trained per update
            (0.99 of 10 → 9), drawn at random each step from `timestep_window`.
        timestep_window (`str`, *optional*): `"start:end"` step indices the trained steps are drawn from.
        train_guidance (`bool`, defaults to `True`): classifier-free guidance (at `decoder_guidance_scale`) in
            rollouts and updates; off samples and trains the conditional branch alone.
        same_noise_in_group (`bool`, defaults to `False`): one initial noise for all G samples of an image.
        flow_clip_range (`float`, defaults to 1e-4): ratio clipping ε (small: log-probs are per-element means).
        advantage_clip (`float`, defaults to 5.0): advantages are clipped to ±this.
        caption_do_sample (`bool`, defaults to `False`): sample the encoder's captions (at `temperature`) instead
            of greedy decoding; `max_completion_length` bounds them.
        decoder_full_finetune (`bool`, defaults to `False`): train every DiT weight instead of a LoRA.
        decoder_lora_r (`int`, defaults to 32), decoder_lora_alpha (`int`, defaults to 64): the default DiT LoRA
            (on the joint-attention projections) when no `peft_config` is given.
        ema_decay (`float`, *optional*): keep an exponential moving average of the trained weights and save it.

    Parameters that control the decoder (reward side):
        decoder_height, decoder_width (`int`, defaults to 512): reconstruction size.
        decoder_num_inference_steps (`int`, defaults to 10), decoder_guidance_scale (`float`, defaults to 5.0).
        decoder_conditioning_mode (`str`, *optional*): `"embeddings"` or `"text"`; defaults to the decoder's mode.
        decoder_text_encoder (`str`, defaults to `"frozen"`): in embeddings mode, whether the decoder's LLM text path
            runs the frozen base weights (`"frozen"`: adapters disabled while decoding) or the current `"policy"`.
        reconstructions_per_caption (`int`, defaults to 1): decodes per caption, averaged into one reward.
        reward_batch_size (`int`, defaults to 8): captions per decoder call.
        reward_fixed_noise (`bool`, defaults to `False`): decode with the same noise at every step (a deterministic
            reward per caption and image; in cold start, the same sampler noise); by default the noise changes per
            step and is shared within a step.

    Parameters that control the reward:
        reward_backbones (`list[str]`, defaults to `["clip"]`): rewarded backbones (the paper rewards CLIP).
        reward_backbone_weights (`list[float]`, *optional*): one weight per rewarded backbone; equal by default.
        heldout_backbones (`list[str]`, defaults to `[]`): logged, never rewarded (to see reward hacking).
        backbone_checkpoints (`dict[str, str]` or JSON `str`, *optional*): backbone → Hub id or folder.
        backbone_dtype (`str`, defaults to `"float32"`): backbone dtype (`"bfloat16"` on GPU).

    Parameters that control logging:
        log_reconstructions_steps (`int`, defaults to 50): every N steps, save a grid of originals, sampled captions
            and reconstructions under `output_dir/reconstructions/` (and to wandb when it is active); 0 disables.
        num_logged_reconstructions (`int`, defaults to 4): rows of that grid.
    """

    stage: str = field(
        default="understanding",
        metadata={"help": "UAE stage to train.", "choices": list(STAGES)},
    )
    decoder_height: int = field(default=512, metadata={"help": "Height of the reward reconstructions, in pixels."})
    decoder_width: int = field(default=512, metadata={"help": "Width of the reward reconstructions, in pixels."})
    decoder_num_inference_steps: int = field(default=10, metadata={"help": "Decoder sampling steps for the reward."})
    decoder_guidance_scale: float = field(default=5.0, metadata={"help": "Decoder classifier-free guidance scale."})
    decoder_conditioning_mode: str | None = field(
        default=None,
        metadata={"help": "Decoder conditioning: 'embeddings' (UAE-native) or 'text'; default: the decoder's own.",
                  "choices": ["embeddings", "text", None]},
    )
    decoder_text_encoder: str = field(
        default="frozen",
        metadata={"help": "Embeddings mode: decode with the frozen base LLM ('frozen', adapters disabled) or with "
                  "the current policy ('policy').", "choices": ["frozen", "policy"]},
    )
    reconstructions_per_caption: int = field(
        default=1, metadata={"help": "Decodes per caption, averaged into one reward (lower variance)."}
    )
    reward_batch_size: int = field(default=8, metadata={"help": "Captions per decoder call in the reward."})
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
        default=True, metadata={"help": "Classifier-free guidance in stage-generation rollouts and updates."}
    )
    same_noise_in_group: bool = field(
        default=False, metadata={"help": "One initial noise for all G samples of an image (stage generation)."}
    )
    flow_clip_range: float = field(default=1e-4, metadata={"help": "Flow-GRPO ratio clipping epsilon."})
    advantage_clip: float = field(default=5.0, metadata={"help": "Clip advantages to +-this."})
    caption_do_sample: bool = field(
        default=False, metadata={"help": "Stage generation: sample the encoder's captions instead of greedy."}
    )
    decoder_full_finetune: bool = field(
        default=False, metadata={"help": "Stage generation: train all DiT weights instead of a LoRA."}
    )
    decoder_lora_r: int = field(default=32, metadata={"help": "Rank of the default DiT LoRA."})
    decoder_lora_alpha: int = field(default=64, metadata={"help": "Alpha of the default DiT LoRA."})
    ema_decay: float | None = field(
        default=None, metadata={"help": "Exponential moving average of the trained weights (saved when set)."}
    )
    caption_column: str = field(default="caption", metadata={"help": "Dataset column with the long captions."})
    caption_dropout: float = field(default=0.1, metadata={"help": "Pretrain: probability of an empty caption."})
    weighting_scheme: str = field(
        default="logit_normal",
        metadata={"help": "Pretrain timestep sampling and loss weighting.",
                  "choices": ["logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap", "none"]},
    )
    logit_mean: float = field(default=0.0, metadata={"help": "Mean of the logit-normal timestep density."})
    logit_std: float = field(default=1.0, metadata={"help": "Std of the logit-normal timestep density."})
    mode_scale: float = field(default=1.29, metadata={"help": "Scale of the 'mode' timestep density."})
    pretrain_full_dit: bool = field(default=False, metadata={"help": "Pretrain all DiT weights instead of a LoRA."})
    cold_start_trainable: list[str] = field(
        default_factory=lambda: ["projector"],
        metadata={"help": "Cold start: parts that train, among projector, llm_lora, dit_lora."},
    )
    cold_start_checkpointing: bool = field(
        default=True, metadata={"help": "Cold start: recompute each sampler step during the backward pass."}
    )
    llm_lora_r: int = field(default=32, metadata={"help": "Rank of the cold-start LLM LoRA."})
    llm_lora_alpha: int = field(default=64, metadata={"help": "Alpha of the cold-start LLM LoRA."})
    log_reconstructions_steps: int = field(
        default=50, metadata={"help": "Save a grid of originals, captions and reconstructions every N steps (0: off)."}
    )
    num_logged_reconstructions: int = field(default=4, metadata={"help": "Rows of the reconstruction grid."})

    # TRL turns checkpointing on by default through `gradient_checkpointing`, a name transformers now deprecates (a
    # FutureWarning on every config): the same default under the current name; the old one is only an alias.
    activation_checkpointing: bool | None = field(
        default=None, metadata={"help": "Recompute activations in the backward pass to save memory (default: on)."}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing`."}
    )

    def __getstate__(self):
        """Pickled copies (`training_args.bin`, saved beside the weights and pushed with them) hold no Hub token."""
        return {**self.__dict__, "hub_token": None}

    def __post_init__(self):
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        if self.stage in ("pretrain", "cold_start"):
            # supervised stages draw no groups: satisfy GRPOConfig's group-size checks without affecting them
            self.num_generations = max(2, self.per_device_train_batch_size)
            if self.per_device_train_batch_size == 1:
                self.steps_per_generation = 2
        super().__post_init__()
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r} is not one of {STAGES}")
        if self.num_generations is None or self.num_generations < 2:
            raise ValueError(
                f"num_generations={self.num_generations}: GRPO compares captions within a group, so it needs at "
                "least 2 generations per image"
            )
        if isinstance(self.backbone_checkpoints, str):
            self.backbone_checkpoints = json.loads(self.backbone_checkpoints)
        if self.reward_backbone_weights is not None and len(self.reward_backbone_weights) != len(self.reward_backbones):
            raise ValueError(
                f"reward_backbone_weights has {len(self.reward_backbone_weights)} entries for "
                f"{len(self.reward_backbones)} reward_backbones; give one weight per backbone"
            )
        if self.reconstructions_per_caption < 1:
            raise ValueError("reconstructions_per_caption must be at least 1")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.timestep_window is not None:
            start, _, end = self.timestep_window.partition(":")
            if not (start.strip().isdigit() and end.strip().isdigit() and int(start) < int(end)):
                raise ValueError(f"timestep_window must look like 'start:end' with start < end, got "
                                 f"{self.timestep_window!r}")
        if self.stage == "generation" and self.per_device_train_batch_size % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple of "
                f"num_generations ({self.num_generations}): each device holds whole groups of reconstructions"
            )
        unknown = set(self.cold_start_trainable) - set(COLD_START_PARTS)
        if unknown or not self.cold_start_trainable:
            raise ValueError(f"cold_start_trainable must be a non-empty subset of {COLD_START_PARTS}, got "
                             f"{self.cold_start_trainable}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        self._check_checkpoints_fall_between_rollouts()

    def _check_checkpoints_fall_between_rollouts(self) -> None:
        """A rollout (GRPO's generation batch, Flow-GRPO's samples) serves several micro-steps and is not saved, so
        a checkpoint inside one could not be resumed exactly."""
        if self.stage not in ("understanding", "generation") or self.save_strategy != "steps" or self.save_steps < 1:
            return
        period = self.num_iterations * (self.steps_per_generation if self.stage == "understanding" else 1)
        if (int(self.save_steps) * self.gradient_accumulation_steps) % period:
            raise ValueError(
                f"save_steps ({self.save_steps}) × gradient_accumulation_steps ({self.gradient_accumulation_steps}) "
                f"must be a multiple of {period} (num_iterations"
                f"{' × steps_per_generation' if self.stage == 'understanding' else ''}): a checkpoint in the middle of "
                "a rollout's updates could not be resumed exactly"
            )
