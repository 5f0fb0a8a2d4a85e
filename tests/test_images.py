"""Decoded float arrays → 8-bit images (`uae_hf.images.decoded_images`); loading is tested in test_bad_input.py and
test_image_properties.py."""

import numpy as np
import PIL.Image

from uae_hf.images import decoded_images


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
