"""Property-based checks over image shapes (1 to 300 px a side) and modes: loading, Unified-Bench scoring and the
pipeline. Derandomized, so every run tries the same examples."""

import evaluate
import numpy as np
import PIL.Image
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from uae_hf.images import load_image

SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
MODES = ["RGB", "RGBA", "L", "LA", "P", "P+transparency", "L+transparency", "RGB+transparency", "CMYK", "I;16", "I",
         "F", "1", "uint16 array", "float array"]


@st.composite
def images(draw, mode=None):
    """(input, its expected RGB array): a PIL mode or array form, any size from 1x1 to 300x300, odd sizes too."""
    height, width = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    mode = mode or draw(st.sampled_from(MODES))
    rgb = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, (height, width, 3), dtype=np.uint8)
    gray = np.asarray(PIL.Image.fromarray(rgb).convert("L"))
    if mode == "uint16 array":
        return rgb.astype(np.uint16) * 257, rgb
    if mode == "float array":
        return rgb / 255.0, rgb
    if mode == "I;16":  # read as 0..65535
        return PIL.Image.fromarray(gray.astype(np.uint16) * 257), np.repeat(gray[..., None], 3, -1)
    if mode in ("I", "F"):  # PIL's own 0..255 (an F image in [0, 1] is refused as ambiguous: keep clear of it)
        gray = np.maximum(gray, 2)
        return PIL.Image.fromarray(gray).convert(mode), np.repeat(gray[..., None], 3, -1)
    if mode in ("RGBA", "LA"):  # opaque where alpha is 255, white where it is 0
        alpha = np.where(rgb[..., :1] > 127, 255, 0).astype(np.uint8)
        image = PIL.Image.fromarray(np.concatenate([rgb, alpha], -1)).convert(mode)
        opaque = np.asarray(image.convert("RGBA"))[..., :3]
        return image, np.where(alpha == 255, opaque, 255).astype(np.uint8)
    if mode == "P+transparency":
        image = PIL.Image.fromarray(rgb).convert("P")
        image.info["transparency"] = 0
        index = np.asarray(image)[..., None]
        return image, np.where(index == 0, 255, np.asarray(image.convert("RGB"))).astype(np.uint8)
    if mode in ("L+transparency", "RGB+transparency"):  # a PNG colour key: its pixels are transparent, white
        image = PIL.Image.fromarray(rgb).convert(mode[:-13])
        pixels = np.asarray(image)
        image.info["transparency"] = int(pixels.flat[0]) if image.mode == "L" else tuple(map(int, pixels[0, 0]))
        keyed = (pixels == pixels[0, 0]).reshape(height, width, -1).all(-1, keepdims=True)
        return image, np.where(keyed, 255, np.asarray(image.convert("RGB"))).astype(np.uint8)
    image = PIL.Image.fromarray(rgb).convert(mode)
    return image, np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=15, **SETTINGS)
@given(data=st.data())
def test_load_image_keeps_size_and_converts_exactly(mode, data):
    item, expected = data.draw(images(mode))
    image = load_image(item)
    assert image.mode == "RGB" and (image.height, image.width) == expected.shape[:2]
    np.testing.assert_array_equal(np.asarray(image), expected)


@pytest.fixture(scope="module")
def bench(backbone_checkpoints):
    return evaluate.load("unified_bench", "clip", checkpoints={"clip": backbone_checkpoints["clip"]})


@settings(max_examples=20, **SETTINGS)
@given(images(), images())
def test_unified_bench_scores_are_cosines(bench, first, second):
    results = bench.compute(predictions=[first[0], second[0]], references=[first[0], first[0]], return_per_image=True)
    same, other = (row["clip"] for row in results["per_image"])
    assert same == pytest.approx(1.0, abs=1e-5)
    assert np.isfinite(other) and -1 - 1e-5 <= other <= 1 + 1e-5
    assert np.isfinite(results["unified_bench"]) and results["unified_bench"] <= 100 + 1e-3


def _case(image):
    return image, np.asarray(load_image(image))


@settings(max_examples=20, **SETTINGS)
@given(images(), st.sampled_from([8, 16, 24]), st.sampled_from([8, 16, 32]))
@example(_case(PIL.Image.new("RGBA", (300, 1))), 16, 16)  # beyond the encoder's aspect-ratio limit
@example(_case(np.random.default_rng(0).random((3, 201))), 8, 8)  # just within it (201 / 3 = 67)
@example(_case(PIL.Image.new("CMYK", (1, 1))), 24, 8)
def test_pipeline_reconstructs_any_image_at_the_requested_size(pipe, case, height, width):
    item, expected = case
    call = dict(max_new_tokens=2, num_inference_steps=1, output_type="np", height=height, width=width)
    ratio = max(expected.shape[:2]) / min(expected.shape[:2])
    if ratio > 200:  # the Qwen2-VL image processor's limit: a clear error naming the image
        with pytest.raises(ValueError, match=r"^image\[0\] \(\d+x\d+ pixels\): the encoder's image processor"):
            pipe(image=item, **call)
        return
    out = pipe(image=item, **call)
    assert out.images.shape == (1, height, width, 3) and np.isfinite(out.images).all()
    assert out.images.min() >= 0 and out.images.max() <= 1
