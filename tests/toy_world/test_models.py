"""The toy world's encoder: its vision tower learns where the shape is, in the tokens' content."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText, AutoProcessor

from uae_hf.toy_world.models import build_toy_encoder, pretrain_toy_vision
from uae_hf.toy_world.world import POSITIONS, scene_at


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy-encoder")
    build_toy_encoder(path, seed=0)
    return path


def _pooled_tokens(vlm, processor, scenes) -> torch.Tensor:
    """Each image's merged vision tokens (what the LLM sees), averaged: no token order left."""
    inputs = processor.image_processor(images=[scene.render() for scene in scenes], return_tensors="pt")
    with torch.no_grad():
        tokens = vlm.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    return tokens.reshape(len(scenes), -1, tokens.shape[-1]).mean(1)


def _linear_probe_accuracy(vlm, processor, attribute: str = "position") -> float:
    """A fresh linear probe fit on pooled tokens of one stream of scenes, scored on another (held out)."""
    train, test = [scene_at(101, i) for i in range(1024)], [scene_at(202, i) for i in range(256)]
    x_train, x_test = _pooled_tokens(vlm, processor, train), _pooled_tokens(vlm, processor, test)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train = torch.tensor([scene.labels()[attribute] for scene in train])
    y_test = torch.tensor([scene.labels()[attribute] for scene in test])
    torch.manual_seed(0)
    head = torch.nn.Linear(x_train.shape[1], len(POSITIONS))
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(300):
        loss = F.cross_entropy(head(x_train), y_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float((head(x_test).argmax(-1) == y_test).float().mean())


@pytest.mark.slow  # 300 steps of vision pre-training: 1-2 min on 2 CPU cores
@pytest.mark.outcome
def test_vision_pretraining_makes_position_linearly_readable_from_pooled_tokens(encoder_dir):
    vlm = AutoModelForImageTextToText.from_pretrained(encoder_dir)
    processor = AutoProcessor.from_pretrained(encoder_dir)
    untrained = _linear_probe_accuracy(vlm, processor)
    accuracy = pretrain_toy_vision(vlm, processor, steps=300, seed=0)  # half the demo's budget (which reaches 1.0)
    pretrained = _linear_probe_accuracy(vlm, processor)
    # chance: 1/9. Measured 0.168 untrained everywhere; pretrained 0.668-0.844 over ATen native (AVX-512) / avx2 /
    # default kernels (oneDNN capped to match) and 1, 2, 4 threads: 0.84 native, 0.676 avx2 with 2 threads (the
    # AVX2-only machine's 0.676), 0.668 default. The bound sits below that spread and far above the untrained 0.17.
    assert untrained < 0.3 and pretrained > 0.55, (untrained, pretrained)
    assert accuracy["colour"] > 0.9 and accuracy["size"] > 0.9 and accuracy["background"] > 0.9, accuracy
