import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, CLIPModel, Dinov2Model, DINOv3ViTModel, SiglipModel

from uae_hf import PAPER_BACKBONES, ImageSimilarity
from uae_hf.rewards.similarity import get_embedder


def _features(output):
    return output if torch.is_tensor(output) else output.pooler_output


def independent_cosines(name, checkpoint, predictions, references):
    """The same numbers, computed directly with the plain transformers classes."""
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    if name in ("clip", "longclip"):
        model = CLIPModel.from_pretrained(checkpoint).eval()
        embed = lambda x: _features(model.get_image_features(pixel_values=x))  # noqa: E731
    elif name == "siglip":
        model = SiglipModel.from_pretrained(checkpoint).eval()
        embed = lambda x: _features(model.get_image_features(pixel_values=x))  # noqa: E731
    else:
        model = (Dinov2Model if name == "dinov2" else DINOv3ViTModel).from_pretrained(checkpoint).eval()
        embed = lambda x: model(pixel_values=x).last_hidden_state[:, 0]  # noqa: E731  CLS after the final norm
    with torch.no_grad():
        a = embed(processor(images=predictions, return_tensors="pt")["pixel_values"])
        b = embed(processor(images=references, return_tensors="pt")["pixel_values"])
    return F.cosine_similarity(a, b, dim=-1)


@pytest.mark.parametrize("name", ["clip", "dinov2", "dinov3", "longclip", "siglip"])
def test_parity_with_plain_transformers(name, backbone_checkpoints, photos):
    similarity = ImageSimilarity((name,), {name: backbone_checkpoints[name]})
    predictions, references = photos, photos[1:] + photos[:1]
    ours = similarity.scores(predictions, references)[name]
    expected = independent_cosines(name, backbone_checkpoints[name], predictions, references)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_identical_images_score_one_and_order_does_not_matter(backbone_checkpoints, photos):
    checkpoints = {name: backbone_checkpoints[name] for name in PAPER_BACKBONES}
    similarity = ImageSimilarity(PAPER_BACKBONES, checkpoints)
    for values in similarity.scores(photos, photos).values():
        torch.testing.assert_close(values, torch.ones(len(photos)), atol=1e-5, rtol=0)
    forward = similarity.scores(photos[:2], photos[1:3])
    backward = similarity.scores(photos[1:3], photos[:2])
    for name in forward:
        torch.testing.assert_close(forward[name], backward[name], atol=1e-6, rtol=0)
        assert (forward[name] < 0.9999).all()  # different photos are not identical


def test_references_are_embedded_once_per_process(backbone_checkpoints, photos):
    similarity = ImageSimilarity(("clip",), {"clip": backbone_checkpoints["clip"]})
    embedder = similarity.embedders["clip"]
    embedder._reference_cache.clear()
    seen = []
    hook = embedder.model.register_forward_hook(lambda module, args, kwargs_or_out: seen.append(1))
    try:
        reference = [photos[0]] * 4  # the same reference scored four times (e.g. four reconstructions)
        first = similarity.scores(photos[:1] * 4, reference)["clip"]
        assert embedder.cached_references == 1
        calls_after_first = len(seen)
        again = ImageSimilarity(("clip",), {"clip": backbone_checkpoints["clip"]}).scores(photos[:1], photos[:1])
        assert len(seen) == calls_after_first + 1  # only the prediction: the reference came from the cache
        torch.testing.assert_close(again["clip"], first[:1])
    finally:
        hook.remove()
    assert get_embedder("clip", backbone_checkpoints["clip"]) is embedder  # one model per process


def test_batching_does_not_change_scores(backbone_checkpoints, photos):
    name = "dinov2"
    batched = ImageSimilarity((name,), {name: backbone_checkpoints[name]}, batch_size=8)
    one_by_one = ImageSimilarity((name,), {name: backbone_checkpoints[name]}, batch_size=1)
    torch.testing.assert_close(
        batched.scores(photos, photos[::-1])[name], one_by_one.scores(photos, photos[::-1])[name], atol=1e-5, rtol=0
    )


def test_bfloat16_scores_close_to_float32(backbone_checkpoints, photos):
    fp32 = ImageSimilarity(("clip",), {"clip": backbone_checkpoints["clip"]}).scores(photos, photos[::-1])["clip"]
    bf16 = ImageSimilarity(("clip",), {"clip": backbone_checkpoints["clip"]}, dtype=torch.bfloat16)
    np.testing.assert_allclose(bf16.scores(photos, photos[::-1])["clip"], fp32, atol=3e-2)


def test_bad_arguments_are_named(backbone_checkpoints, photos):
    with pytest.raises(ValueError, match="choose from"):
        ImageSimilarity(("clipp",))
    with pytest.raises(ValueError, match="unused"):
        ImageSimilarity(("clip",), {"clip": backbone_checkpoints["clip"], "dinov2": "x"})
    similarity = ImageSimilarity(("clip",), {"clip": backbone_checkpoints["clip"]})
    with pytest.raises(ValueError, match="one per pair"):
        similarity.scores(photos[:2], photos[:1])
    with pytest.raises(ValueError, match="at least one"):
        similarity.scores([], [])
