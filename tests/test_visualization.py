"""reconstruction_grid: letterboxed tiles, crisp tiny images, labels, scores and wrapped captions on a sheet."""

import numpy as np
import PIL.Image
import pytest

from uae_hf.visualization import LETTERBOX, _font, _printable, _wrap, reconstruction_grid

RED, BLUE = (200, 30, 30), (30, 60, 200)


def _box_of(sheet: PIL.Image.Image, colour) -> tuple[int, int, int, int]:
    """(left, top, width, height) of the pixels of exactly `colour`."""
    ys, xs = np.nonzero((np.asarray(sheet) == colour).all(axis=-1))
    return xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1


def test_a_wide_logo_keeps_its_aspect_ratio():
    logo = PIL.Image.new("RGB", (542, 130), RED)
    sheet = reconstruction_grid([logo], [PIL.Image.new("RGB", (130, 542), BLUE)], ["a logo"])
    _, _, width, height = _box_of(sheet, RED)
    assert width == 256 and abs(width / height - 542 / 130) < 0.05  # letterboxed, not stretched to a square
    _, _, width, height = _box_of(sheet, BLUE)  # a tall reconstruction, letterboxed the other way
    assert height == 256 and abs(height / width - 542 / 130) < 0.05
    # the bars around it are letterbox grey, the image centred in its tile
    left, top, width, height = _box_of(sheet, RED)
    assert sheet.getpixel((left + width // 2, top - 1)) == LETTERBOX
    assert sheet.getpixel((left + width // 2, top + height)) == LETTERBOX


def test_tiny_images_are_enlarged_pixel_for_pixel():
    scene = PIL.Image.new("RGB", (32, 32), "white")
    scene.putpixel((5, 3), RED)
    sheet = reconstruction_grid([scene], [scene], ["a dot"])
    left, top, width, height = _box_of(sheet.crop((0, 0, 256, sheet.height)), RED)
    assert (width, height) == (8, 8)  # one source pixel, an exact 8x8 block: nearest-neighbour, no blur
    assert (np.asarray(sheet.crop((left, top, left + 8, top + 8))) == RED).all()


def test_existing_positional_calls_and_small_batches_stay_one_pair_wide():
    images = [PIL.Image.new("RGB", (64, 64), "grey")] * 3
    sheet = reconstruction_grid(images, images, ["a", "b", "c"])
    assert sheet.width == 512 and sheet.height > 3 * 256
    assert reconstruction_grid(images, images, ["a", "b", "c"], tile=128).width == 256


def test_sixteen_items_make_a_sheet_of_four_by_four():
    images = [PIL.Image.new("RGB", (32, 32), (index * 15, 100, 100)) for index in range(16)]
    sheet = reconstruction_grid(images, images, [f"scene {index}" for index in range(16)])
    assert sheet.width > 4 * 512 and sheet.height < 4 * 400  # not a 512 x 5120 strip
    lefts = {_box_of(sheet, (index * 15, 100, 100))[0] for index in range(16)}
    tops = {_box_of(sheet, (index * 15, 100, 100))[1] for index in range(16)}
    assert len(lefts) == 4 and len(tops) == 4  # 4 pairs per row, 4 rows


def test_labels_and_scores_are_drawn_above_the_pair():
    images = [PIL.Image.new("RGB", (64, 64), RED)]
    plain = reconstruction_grid(images, images, ["a cat"], names=[""])
    named = np.asarray(reconstruction_grid(images, images, ["a cat"], names=["cat.png"]))
    scored = np.asarray(reconstruction_grid(images, images, ["a cat"], names=[""], scores=[0.875]))
    _, images_top, _, _ = _box_of(plain, RED)
    plain = np.asarray(plain)
    assert plain.shape == named.shape == scored.shape
    changed = np.nonzero((plain != named).any(axis=2))
    assert changed[0].size and changed[0].max() < images_top and changed[1].max() < 256  # the name, top left
    changed = np.nonzero((plain != scored).any(axis=2))
    assert changed[0].size and changed[0].max() < images_top and changed[1].min() > 256  # the score, top right
    assert (plain[:, :, 0] < 200).any(axis=1)[:images_top].sum() > 10  # the column titles are there too


def test_captions_are_legible_and_long_ones_get_more_lines():
    images = [PIL.Image.new("RGB", (64, 64), RED)]
    sheet = reconstruction_grid(images, images, ["H"])
    _, top, _, height = _box_of(sheet, RED)
    caption_area = np.asarray(sheet)[top + height :, :100]
    rows = np.nonzero((caption_area < 100).all(axis=-1).any(axis=1))[0]
    assert rows.max() - rows.min() + 1 >= 12  # an "H" at least 12 px tall at the default tile (was 8)
    long = " ".join(["word"] * 400)
    short_sheet = reconstruction_grid(images, images, ["a cat"])
    long_sheet = reconstruction_grid(images, images, [long], caption_lines=8)
    assert long_sheet.height - short_sheet.height > 6 * 20  # at least 8 readable lines instead of one


def test_caption_text_is_wrapped_to_fit_and_cut_with_an_ellipsis():
    font = _font(18)
    words = ["a", "grey", "cat", "sits", "on", "the", "floor"] * 30 + ["x" * 200]
    lines = _wrap(" ".join(words), font, 300, max_lines=50)
    assert all(font.getlength(line) <= 300 for line in lines)
    assert "".join(lines).replace(" ", "") == "".join(words)  # nothing lost, the long word broken across lines
    cut = _wrap(" ".join(words), font, 300, max_lines=3)
    assert len(cut) == 3 and cut[-1].endswith("\u2026") and font.getlength(cut[-1]) <= 300


def test_unprintable_characters_never_reach_the_sheet():
    font = _font(18)
    text = _printable("café — naïve\tcat\non a mat\x00\x07\u200b 3×4 → 你好 😀", font)
    assert text == "cafe - naive cat on a mat 3x4 -> ?? ?"
    assert _printable("\u201cquoted\u201d", font) == "\u201cquoted\u201d"  # the font has these: kept


def test_empty_and_missing_items():
    image = PIL.Image.new("RGB", (64, 64), RED)
    sheet = reconstruction_grid([image], [None], [""])
    left, _, width, _ = _box_of(sheet, RED)
    assert left + width <= 256  # the original only; the reconstruction's tile is empty letterbox
    assert np.asarray(sheet.crop((256 + 8, 40, 512, 256))).reshape(-1, 3).tolist().count(list(LETTERBOX)) > 200 * 200
    half = PIL.Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    sheet = reconstruction_grid([half], [half], ["transparent"])
    assert sheet.getpixel((128, 150)) == (255, 255, 255)  # transparent areas shown on white, not black


@pytest.mark.parametrize("kwargs", [dict(captions=["a"]), dict(names=["a"]), dict(scores=[1.0])])
def test_lengths_must_match(kwargs):
    images = [PIL.Image.new("RGB", (8, 8))] * 2
    arguments = dict(originals=images, reconstructions=images, captions=["a", "b"]) | kwargs
    with pytest.raises(ValueError, match="per item"):
        reconstruction_grid(**arguments)
