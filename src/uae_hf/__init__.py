"""uae_hf: train and evaluate unified multimodal models as auto-encoders (UAE) with the Hugging Face stack."""

from .hub import pipeline_model_card
from .metrics import install_evaluate_hook, metric_path
from .models.projector import UAEProjector
from .pipelines.uae_reconstruction import (
    CAPTION_INSTRUCTION,
    NEGATIVE_PROMPT,
    UAEReconstructionPipeline,
    UAEReconstructionPipelineOutput,
    caption_images,
    encode_generate_prompts,
    load_saved_pipeline,
    load_uae_pipeline,
)
from .release import ReleaseFormatError, ReleaseLoadReport, load_uae_release
from .rewards.reconstruction import ReconstructionReward
from .rewards.similarity import BACKBONES, PAPER_BACKBONES, ImageEmbedder, ImageSimilarity, register_backbone
from .tiny_models import build_tiny_models
from .toy_world import ToyWorldVisionModel, toy_world_dataset  # also registers the "toyworld" backbone
from .trainer import UnifiedGRPOConfig, UnifiedGRPOTrainer

install_evaluate_hook()
# Defined in uae_hf (not in the self-contained pipeline file): loading the release needs UAEProjector and checks.
UAEReconstructionPipeline.from_uae_release = classmethod(lambda cls, *args, **kwargs: load_uae_release(*args, **kwargs))

__version__ = "0.1.0.dev0"

__all__ = [
    "BACKBONES",
    "PAPER_BACKBONES",
    "ImageEmbedder",
    "ImageSimilarity",
    "metric_path",
    "register_backbone",
    "CAPTION_INSTRUCTION",
    "NEGATIVE_PROMPT",
    "ReconstructionReward",
    "ReleaseFormatError",
    "ReleaseLoadReport",
    "load_uae_release",
    "UnifiedGRPOConfig",
    "UnifiedGRPOTrainer",
    "UAEProjector",
    "UAEReconstructionPipeline",
    "UAEReconstructionPipelineOutput",
    "build_tiny_models",
    "ToyWorldVisionModel",
    "toy_world_dataset",
    "caption_images",
    "encode_generate_prompts",
    "load_saved_pipeline",
    "load_uae_pipeline",
    "pipeline_model_card",
]
