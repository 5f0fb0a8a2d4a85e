"""The settings every trainer test shares: tiny sizes on the CPU, seeded, nothing saved, reported or drawn unless a
test asks. `make_config` (conftest.py) builds each test's config from them; two_process_stage.py, which runs outside
pytest, builds its own the same way."""

import dataclasses
from pathlib import Path

from uae_hf import (
    ColdStartConfig,
    ColdStartTrainer,
    DecoderPretrainingConfig,
    DecoderPretrainingTrainer,
    DiffusionNFTConfig,
    DiffusionNFTTrainer,
    FlowGRPOConfig,
    FlowGRPOTrainer,
    UnifiedGRPOConfig,
    UnifiedGRPOTrainer,
)

# the stage of a `uae-hf train` recipe → the config and trainer that train it
STAGES = {
    "understanding": (UnifiedGRPOConfig, UnifiedGRPOTrainer),
    "generation": (FlowGRPOConfig, FlowGRPOTrainer),
    "generation_nft": (DiffusionNFTConfig, DiffusionNFTTrainer),
    "pretrain": (DecoderPretrainingConfig, DecoderPretrainingTrainer),
    "cold_start": (ColdStartConfig, ColdStartTrainer),
}
TRAINER_OF = {config_class: trainer_class for config_class, trainer_class in STAGES.values()}


def shared_settings(tiny_dir) -> dict:
    """Every trainer test's settings; each config takes those of its own fields."""
    return dict(
        use_cpu=True, bf16=False, report_to=[], seed=0, save_strategy="no", logging_steps=1, max_steps=2,
        per_device_train_batch_size=4, num_generations=4, max_completion_length=8, learning_rate=1e-2,
        lr_scheduler_type="constant", decoder_height=64, decoder_width=64, decoder_num_inference_steps=2,
        decoder_lora_r=8, decoder_lora_alpha=16, llm_lora_r=4, llm_lora_alpha=8, log_reconstructions_steps=0,
        backbone_checkpoints={"clip": str(Path(tiny_dir) / "backbones" / "clip")},
    )


def tiny_config(stage, tiny_dir, output_dir, **overrides):
    """The config of `stage` (a stage name or a config class) with the shared settings and `overrides`; an override
    the config does not have is an error, as it would be for a user."""
    config_class = STAGES[stage][0] if isinstance(stage, str) else stage
    fields = {field.name for field in dataclasses.fields(config_class)}
    shared = {name: value for name, value in shared_settings(tiny_dir).items() if name in fields}
    return config_class(output_dir=str(output_dir), **shared | overrides)
