"""A toy world where a whole UAE trains from scratch on a CPU in minutes (see `uae-hf demo`)."""

from .backbone import (
    ToyWorldVisionConfig,
    ToyWorldVisionModel,
    attribute_accuracy,
    predict_attributes,
    toy_image_processor,
    train_toy_backbone,
)
from .world import ATTRIBUTES, DETAIL_LEVELS, ToyScene, scene_at, toy_world_dataset, toy_world_stream

__all__ = [
    "ATTRIBUTES",
    "DETAIL_LEVELS",
    "ToyScene",
    "ToyWorldVisionConfig",
    "ToyWorldVisionModel",
    "attribute_accuracy",
    "predict_attributes",
    "scene_at",
    "toy_image_processor",
    "toy_world_dataset",
    "toy_world_stream",
    "train_toy_backbone",
]
