"""Decoded float arrays → 8-bit images (`uae_hf.images.decoded_images`); PNG colour keys under both protocols' RGB
rules; the rest of loading is tested in test_bad_input.py and test_image_properties.py."""

import io
import warnings

import numpy as np
import PIL.Image
import pytest

from uae_hf.images import decoded_images, load_image, pil_rgb, to_rgb


def test_decoded_images_round_to_the_nearest_level_and_drop_non_finite_arrays():
    generator = np.random.default_rng(0)
    arrays = generator.random((3, 8, 6, 3), dtype=np.float32)
    arrays[1, 0, 0] = [0.0, 1.0, 0.5 / 255]  # the ends and a half level
    arrays[2, 3, 2, 1] = np.nan
    images = decoded_images(arrays)
    assert images[2] is None
    for array, image in zip(arrays[:2], images[:2]):
        assert isinstance(image, PIL.Image.Image) and image.mode == "RGB" and image.size == (6, 8)
        # bit for bit what the reward and Flow-GRPO computed before they shared this helper
        np.testing.assert_array_equal(np.asarray(image), (array * 255).round().astype("uint8"))
    assert np.asarray(images[1])[0, 0].tolist() == [0, 255, 0]  # 0.5 rounds half to even
    float64 = [generator.random((4, 4, 3)), np.full((4, 4, 3), np.inf)]
    assert np.array_equal(np.asarray(decoded_images(float64)[0]), (float64[0] * 255).round().astype("uint8"))
    assert decoded_images(float64)[1] is None and decoded_images([]) == []


def test_decoded_images_clip_what_a_sampler_overshoots():
    """A value a hair outside [0, 1] is the nearest end, not a wrapped-around uint8 (1.003 * 255 rounds to 256)."""
    array = np.array([[[1.003, -0.003, 0.25]]], np.float32)
    assert np.asarray(decoded_images([array])[0]).tolist() == [[[255, 0, 64]]]


def keyed_png(image: PIL.Image.Image, key) -> PIL.Image.Image:
    """`image` written as a PNG with a tRNS colour key and read back, as a user's file arrives."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=key)
    return PIL.Image.open(io.BytesIO(buffer.getvalue()))


def keyed_images() -> dict[str, tuple[PIL.Image.Image, np.ndarray]]:
    """Each kind of colour key PNG holds (palette entries, a grey level, an RGB colour, a 16-bit grey level), with the
    mask of the pixels it makes transparent."""
    rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    rgb[::3] = [40, 80, 120]  # a colour that several pixels share, so that the key matters
    grey = np.asarray(PIL.Image.fromarray(rgb).convert("L"))
    palette = PIL.Image.fromarray(rgb).quantize(16)
    index = np.asarray(palette)
    deep = grey.astype(np.uint16) * 257
    return {
        "P": (keyed_png(palette, int(index[0, 0])), index == index[0, 0]),
        "P, keyed entries": (keyed_png(palette, bytes([0, 255, 0] + [255] * 13)), np.isin(index, [0, 2])),
        "L": (keyed_png(PIL.Image.fromarray(grey), int(grey[0, 0])), grey == grey[0, 0]),
        "RGB": (keyed_png(PIL.Image.fromarray(rgb), (40, 80, 120)), (rgb == [40, 80, 120]).all(-1)),
        "I;16": (keyed_png(PIL.Image.fromarray(deep), int(deep[0, 0])), deep == deep[0, 0]),
    }


@pytest.mark.parametrize("kind", ["P", "P, keyed entries", "L", "RGB", "I;16"])
def test_a_colour_key_is_transparency_by_default_and_ignored_as_the_released_scorer_read_it(kind):
    """Default rules: the key's pixels are transparent, composited on white like alpha, and the RGB image carries no
    key (before, `to_rgb` kept an L or RGB key in `info`, which transformers 5's processors then painted white for
    some backbones and not others, and the reference cache, keyed by pixels, mixed keyed and unkeyed twins). Official
    rules: `convert("RGB")`'s pixels, key ignored, as the released stack's processors (transformers 4.56) read them
    (transformers 5 paints the key white: up to 6.4e-2 on CLIP's cosine for a palette image)."""
    image, mask = keyed_images()[kind]
    assert "transparency" in image.info and mask.any() and not mask.all()
    unkeyed = image.copy()
    del unkeyed.info["transparency"]
    plain = np.asarray(to_rgb(unkeyed))
    default = to_rgb(image)
    assert "transparency" not in default.info
    np.testing.assert_array_equal(np.asarray(default), np.where(mask[..., None], 255, plain))
    assert np.array_equal(np.asarray(load_image(image)), np.asarray(default))  # the one loader, files included
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not PIL's advice to convert a keyed palette to RGBA: the key is dropped
        official = pil_rgb(image)
    assert "transparency" not in official.info and "transparency" in image.info  # the caller's image keeps its key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        released = image.convert("RGB")
    np.testing.assert_array_equal(np.asarray(official), np.asarray(released))
