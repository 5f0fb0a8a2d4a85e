import evaluate
import pytest
import torch

import uae_hf  # noqa: F401  (registers the "toyworld" backbone and the unified_bench module)
from uae_hf import BACKBONES, ImageSimilarity
from uae_hf.toy_world import (
    ATTRIBUTES,
    ToyWorldVisionModel,
    attribute_accuracy,
    predict_attributes,
    toy_image_processor,
    toy_world_dataset,
    train_toy_backbone,
)
from uae_hf.toy_world.world import ground_truth


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy-backbone")
    train_toy_backbone(path, steps=400, seed=0)
    return path


@pytest.fixture(scope="module")
def held_out():
    dataset = toy_world_dataset(200, "test")
    return list(dataset["image"]), ground_truth(dataset)


@pytest.mark.outcome
def test_backbone_reads_attributes_of_held_out_scenes(backbone_dir, held_out):
    images, truth = held_out
    model = ToyWorldVisionModel.from_pretrained(backbone_dir)
    accuracy = attribute_accuracy(predict_attributes(model, toy_image_processor(), images), truth)
    # chance: shape 1/3, colour 1/6, size 1/2, position 1/9, background 1/2
    assert accuracy["colour"] > 0.85 and accuracy["position"] > 0.9 and accuracy["background"] > 0.95
    assert accuracy["size"] > 0.9 and accuracy["shape"] > 0.45
    assert accuracy["mean"] == pytest.approx(sum(accuracy[name] for name in ATTRIBUTES) / len(ATTRIBUTES))


def test_embedding_separates_unrelated_scenes_and_the_metric_uses_it(backbone_dir, held_out):
    images, truth = held_out
    assert "toyworld" in BACKBONES and not BACKBONES["toyworld"].paper
    similarity = ImageSimilarity(["toyworld"], {"toyworld": str(backbone_dir)})
    unrelated = similarity.scores(images[:100], images[100:200])["toyworld"]
    same = similarity.scores(images[:50], images[:50])["toyworld"]
    assert unrelated.mean() < 0.3 and torch.allclose(same, torch.ones(50), atol=1e-5)
    bench = evaluate.load("unified_bench", "toyworld", checkpoints={"toyworld": str(backbone_dir)})
    result = bench.compute(predictions=images[:100], references=images[100:200])
    assert result["toyworld"] == pytest.approx(float(unrelated.mean()), abs=1e-6)


def test_toyworld_backbone_without_a_checkpoint_says_so():
    with pytest.raises(ValueError, match="toyworld.*checkpoint"):
        ImageSimilarity(["toyworld"])


def test_attribute_accuracy_all_requires_every_attribute():
    truth = {"shape": ["circle", "square"], "colour": ["red", "red"]}
    predicted = {"shape": ["circle", "circle"], "colour": ["red", "red"]}
    result = attribute_accuracy(predicted, truth)
    assert result == {"shape": 0.5, "colour": 1.0, "mean": 0.75, "all": 0.5}
