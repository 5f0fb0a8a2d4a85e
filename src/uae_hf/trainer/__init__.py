"""One trainer + config pair per UAE algorithm, as TRL lays out its trainers."""

from .cold_start_config import ColdStartConfig
from .cold_start_trainer import ColdStartTrainer
from .decoder_pretraining_config import DecoderPretrainingConfig
from .decoder_pretraining_trainer import DecoderPretrainingTrainer
from .decoder_rl_config import DecoderRLConfig
from .decoder_rl_trainer import DecoderRLTrainer
from .decoder_trainer import DecoderTrainer
from .decoder_training_config import DecoderTrainingConfig
from .diffusion_nft_config import DiffusionNFTConfig
from .diffusion_nft_trainer import DiffusionNFTTrainer
from .flow_grpo_config import FlowGRPOConfig
from .flow_grpo_trainer import FlowGRPOTrainer
from .reconstruction_arguments import ReconstructionArguments
from .unified_grpo_config import UnifiedGRPOConfig
from .unified_grpo_trainer import UnifiedGRPOTrainer

# `stage:` of a `uae-hf train` recipe → the pair that trains it
TRAINERS = {
    "understanding": (UnifiedGRPOConfig, UnifiedGRPOTrainer),
    "generation": (FlowGRPOConfig, FlowGRPOTrainer),
    "generation_nft": (DiffusionNFTConfig, DiffusionNFTTrainer),
    "pretrain": (DecoderPretrainingConfig, DecoderPretrainingTrainer),
    "cold_start": (ColdStartConfig, ColdStartTrainer),
}
