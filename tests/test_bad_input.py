"""Bad input to image loading, the Unified-Bench metric and the pipeline: a clear error naming the item, or the right
result, never a silently wrong number (docs/reliability.md, "bad input")."""

import io
import re

import evaluate
import numpy as np
import PIL.Image
import pytest
import torch

from uae_hf import UAEProjector, UAEReconstructionPipeline, load_uae_pipeline
from uae_hf.cli import main
from uae_hf.images import load_image, load_images
from uae_hf.metrics.round_trip_bench import references_from_folder, run_bench

from test_cli_errors import unloadable_pipeline

RANDOM = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)


def encoded(image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(RANDOM).save(buffer, image_format)
    return buffer.getvalue()


def write(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    return str(tmp_path / name)


# --- image loading: errors -------------------------------------------------------------------------------------------

LOAD_ERRORS = {
    "corrupt file": (lambda d: write(d, "corrupt.png", b"not an image" * 8), r"cannot read image file .*corrupt\.png"),
    "truncated png": (lambda d: write(d, "cut.png", encoded()[:300]), r"cut\.png'.*image file is truncated"),
    "truncated jpeg": (lambda d: write(d, "cut.jpg", encoded("JPEG")[:300]), r"cut\.jpg'.*[Tt]runcated"),
    "empty file": (lambda d: write(d, "empty.png", b""), r"empty\.png'.*cannot identify"),
    "missing file": (lambda d: str(d / "nope.png"), r"nope\.png'.*No such file"),
    "corrupt bytes": (lambda d: b"\x89PNG\r\n\x1a\n broken", r"cannot read image bytes \(15 bytes\)"),
    "truncated bytes dict": (lambda d: {"bytes": encoded()[:300], "path": "x.png"}, r"image bytes .*truncated"),
    "0x0 image": (lambda d: PIL.Image.new("RGB", (0, 0)), r"the image is empty \(0x0 pixels\)"),
    "empty array": (lambda d: np.zeros((0, 5, 3), np.uint8), r"the image is empty \(shape \(0, 5, 3\)\)"),
    "NaN array": (lambda d: np.where(RANDOM > 128, np.nan, 0.5), "contains NaN or infinite values"),
    "inf array": (lambda d: np.full((4, 4), np.inf, np.float32), "contains NaN or infinite values"),
    "NaN tensor": (lambda d: torch.full((3, 4, 4), float("nan")), "contains NaN or infinite values"),
    "float array in 0..255": (lambda d: RANDOM.astype(np.float32), r"must be in \[0, 1\], got \[0, 255\]; divide"),
    "float array in [-1, 1]": (lambda d: np.full((4, 4, 3), -0.5), r"got \[-0.5, -0.5\].*\(x \+ 1\) / 2"),
    "float tensor in [-1, 1]": (lambda d: torch.linspace(-1, 1, 48).view(3, 4, 4), r"got \[-1, 1\]"),
    "int64 array beyond 255": (lambda d: np.full((4, 4), 1000), r"int64 values span \[1000, 1000\].*uint16"),
    "mode I beyond 255": (lambda d: PIL.Image.fromarray(np.full((4, 4), 70000, np.int32)), r"int32 values span"),
    "mode F in [0, 1]": (lambda d: PIL.Image.fromarray(np.full((4, 4), 0.5, np.float32)), r"mode F.*multiply .* 255"),
    "mode F beyond 255": (lambda d: PIL.Image.fromarray(np.full((4, 4), 300.0, np.float32)), r"in \[0, 255\], got"),
    "mode F with NaN": (lambda d: PIL.Image.fromarray(np.full((4, 4), np.nan, np.float32)), "NaN"),
    "5-channel array": (lambda d: np.zeros((8, 8, 5), np.uint8), r"1 to 4 channels, got shape \(8, 8, 5\)$"),
    "CxHxW array": (lambda d: np.zeros((3, 8, 8), np.uint8), r"pass array\.transpose\(1, 2, 0\)"),
    "HxWxC tensor": (lambda d: torch.zeros(8, 8, 3), r"CxHxW tensor with 1 to 4 channels, got shape \(8, 8, 3\)"),
}


@pytest.mark.parametrize("case", LOAD_ERRORS)
def test_load_image_errors_name_the_item(case, tmp_path):
    make, match = LOAD_ERRORS[case]
    with pytest.raises(ValueError) as error:
        load_image(make(tmp_path), "references[3]")
    message = str(error.value)
    assert message.startswith("references[3]: ") and re.search(match, message), message


def test_decompression_bomb_says_how_to_allow_it(tmp_path, monkeypatch):
    path = write(tmp_path, "big.png", encoded())
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # 24x32 = 768 pixels is over twice the limit
    with pytest.raises(ValueError, match=r"^image\[0\]: cannot read image file .*big\.png': .*decompression bomb.* "
                                         r"If you trust the file, raise PIL\.Image\.MAX_IMAGE_PIXELS\.$"):
        load_image(path, "image[0]")
    with pytest.raises(SystemExit, match=r"cannot read image .*big\.png.*decompression bomb"):
        main(["reconstruct", path, "--pipeline", str(unloadable_pipeline(tmp_path / "unloadable")), "--output-dir",
              str(tmp_path / "out")])


@pytest.mark.parametrize("items, error, match", [
    ([], ValueError, r"`references` is empty"),
    (PIL.Image.new("RGB", (4, 4)), TypeError, r"`references` must be a list of images, got a single Image"),
    ("photo.png", TypeError, r"got a single str: wrap it in a list"),
    (RANDOM, TypeError, r"got a single ndarray"),
    ([PIL.Image.new("RGB", (4, 4)), None], TypeError, r"^references\[1\]: expected a PIL image.*got NoneType"),
])
def test_load_images_rejects_what_is_not_a_list_of_images(items, error, match):
    with pytest.raises(error, match=match):
        load_images(items, "references")


# --- image loading: handled ------------------------------------------------------------------------------------------

def with_alpha(mode):
    """A half-transparent image: left half opaque red, right half fully transparent (blue underneath)."""
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:, :2] = (255, 0, 0, 255)
    rgba[:, 2:] = (0, 0, 255, 0)
    return PIL.Image.fromarray(rgba).convert(mode)


def palette_with_transparency():
    image = PIL.Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.info["transparency"] = 1
    return image


RED, WHITE, GRAY_128 = (255, 0, 0), (255, 255, 255), (128, 128, 128)
GRAY = np.full((4, 4), 128, np.uint8)
# input → the colours of its consecutive, equal-width column bands after loading
LOAD_HANDLED = {
    "RGBA on white": (lambda: with_alpha("RGBA"), [RED, WHITE]),
    "premultiplied RGBa on white": (lambda: with_alpha("RGBa"), [RED, WHITE]),
    "LA on white": (lambda: with_alpha("LA"), [(76, 76, 76), WHITE]),
    "premultiplied La on white": (lambda: with_alpha("LA").convert("La"), [(76, 76, 76), WHITE]),
    "P with transparency on white": (palette_with_transparency, [RED, WHITE]),
    "CMYK": (lambda: PIL.Image.new("CMYK", (4, 4), (0, 255, 255, 0)), [RED]),
    "L": (lambda: PIL.Image.fromarray(GRAY), [GRAY_128]),
    "1-bit": (lambda: PIL.Image.new("1", (4, 4), 1), [WHITE]),
    "I;16 read as 0..65535": (lambda: PIL.Image.fromarray(np.full((4, 4), 32896, np.uint16)), [GRAY_128]),
    "I;16B": (lambda: PIL.Image.frombytes("I;16B", (4, 4), np.full(16, 32896, ">u2").tobytes()), [GRAY_128]),
    "I (32-bit) read as 0..255": (lambda: PIL.Image.fromarray(GRAY).convert("I"), [GRAY_128]),
    "F read as 0..255": (lambda: PIL.Image.fromarray(GRAY).convert("F"), [GRAY_128]),
    "uint16 array": (lambda: np.full((4, 4, 3), 65535, np.uint16), [WHITE]),
    "int64 array in 0..255": (lambda: GRAY.astype(np.int64), [GRAY_128]),
    "float array with rounding noise": (lambda: np.full((4, 4, 3), 1.0005), [WHITE]),
    "float16 array": (lambda: np.full((4, 4, 3), 0.5, np.float16), [GRAY_128]),
    "bool array": (lambda: np.ones((4, 4), bool), [WHITE]),
    "uint8 tensor": (lambda: torch.full((3, 4, 4), 128, dtype=torch.uint8), [GRAY_128]),
    "bfloat16 tensor": (lambda: torch.full((1, 4, 4), 0.5, dtype=torch.bfloat16), [GRAY_128]),
    "1x1": (lambda: PIL.Image.new("RGB", (1, 1), RED), [RED]),
}


@pytest.mark.parametrize("case", LOAD_HANDLED)
def test_load_image_converts_modes_and_ranges_correctly(case):
    make, colours = LOAD_HANDLED[case]
    image = load_image(make())
    assert image.mode == "RGB"
    for band, colour in zip(np.array_split(np.asarray(image)[0], len(colours)), colours):
        np.testing.assert_array_equal(band, np.broadcast_to(colour, band.shape))


@pytest.mark.parametrize("make", [
    lambda d: encoded(),
    lambda d: {"bytes": encoded(), "path": "photo.png"},
    lambda d: {"bytes": None, "path": write(d, "photo.png", encoded())},
], ids=["png bytes", "datasets Image(decode=False) dict", "dict with a path only"])
def test_encoded_images_load_losslessly(make, tmp_path):
    np.testing.assert_array_equal(np.asarray(load_image(make(tmp_path))), RANDOM)


def test_large_image_keeps_its_size():
    image = load_image(np.zeros((3000, 4000, 3), np.uint8))
    assert image.size == (4000, 3000)


# --- the Unified-Bench metric ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench(backbone_checkpoints):
    return evaluate.load("unified_bench", "clip", checkpoints={"clip": backbone_checkpoints["clip"]})


PHOTO = PIL.Image.fromarray(RANDOM)
METRIC_ERRORS = {
    "references missing": (dict(predictions=[PHOTO]), ValueError,
                           r"`references` is missing: pass `predictions=` and `references=` together"),
    "predictions missing": (dict(references=[PHOTO]), ValueError, r"`predictions` is missing"),
    "mismatched lengths": (dict(predictions=[PHOTO] * 2, references=[PHOTO]), ValueError,
                           r"got 2 predictions and 1 references"),
    "empty lists": (dict(predictions=[], references=[]), ValueError, r"`predictions` is empty"),
    "a lone image": (dict(predictions=PHOTO, references=PHOTO), TypeError, r"`predictions` must be a list of images"),
    "corrupt bytes": (dict(predictions=[PHOTO] * 4, references=[PHOTO] * 3 + [b"junk"]), ValueError,
                      r"^references\[3\]: cannot read image bytes"),
    "NaN array": (dict(predictions=[np.full((8, 8, 3), np.nan)], references=[PHOTO]), ValueError,
                  r"^predictions\[0\]: the image contains NaN"),
    "float array in 0..255": (dict(predictions=[RANDOM * 1.0], references=[PHOTO]), ValueError,
                              r"^predictions\[0\]: float pixel values must be in \[0, 1\]"),
    "float tensor in [-1, 1]": (dict(predictions=[torch.rand(3, 8, 8) * 2 - 1], references=[PHOTO]), ValueError,
                                r"^predictions\[0\]: float pixel values"),
}


@pytest.mark.parametrize("case", METRIC_ERRORS)
def test_metric_errors_name_the_input(bench, case):
    kwargs, error, match = METRIC_ERRORS[case]
    with pytest.raises(error, match=match):
        bench.compute(**kwargs)


def test_a_reconstruction_folder_that_pairs_with_nothing_fails_before_the_backbones_load(tmp_path):
    """Today: `no readable (reference, reconstruction) pair to score`, once the backbones have loaded."""
    references, reconstructions = tmp_path / "references", tmp_path / "reconstructions"
    for folder, name in ((references, "photo.png"), (reconstructions, "other.png")):
        folder.mkdir()
        PIL.Image.fromarray(RANDOM).save(folder / name)
    # a backbone that cannot load: the error comes before it is tried
    with pytest.raises(ValueError, match=r"its images \(other\.png\) match none of the references \(photo\.png\); "
                       r"name each reconstruction as its reference \(photo\.png, photo\.\* or recon_photo\.\*\)$"):
        run_bench(references_from_folder(references), tmp_path / "out", reconstructions_dir=reconstructions,
                  config_name="clip", checkpoints={"clip": str(tmp_path / "no-clip")})


def test_metric_scores_odd_sizes_and_forms_correctly(bench):
    tensor = torch.from_numpy(RANDOM).permute(2, 0, 1)  # uint8 CxHxW: read as 0..255, not clamped to [0, 1]
    big = np.broadcast_to(np.linspace(0, 255, 4000, dtype=np.uint8), (3000, 4000))[..., None].repeat(3, -1)
    predictions = [PIL.Image.new("RGB", (1, 1), RED), big, {"bytes": encoded(), "path": None}, tensor,
                   np.asarray(PHOTO, np.uint16) * 257]
    references = [PIL.Image.new("RGB", (1, 1), RED), PIL.Image.fromarray(big), PHOTO, PHOTO, PHOTO]
    results = bench.compute(predictions=predictions, references=references, return_per_image=True)
    assert [row["clip"] for row in results["per_image"]] == pytest.approx([1.0] * 5, abs=1e-5)


# --- the pipeline ----------------------------------------------------------------------------------------------------

FAST = dict(max_new_tokens=2, num_inference_steps=1, output_type="np", height=16, width=16)
HUGE_CAPTION = "a red circle on a blue square, " * 3300  # 102,300 characters
PIPELINE_ERRORS = {
    "empty caption": (dict(captions=[""]), ValueError, r"^captions\[0\] is empty or whitespace-only"),
    "whitespace caption": (dict(captions=["a cat", " \n\t"]), ValueError, r"^captions\[1\] is empty or whitespace"),
    "blank caption, text mode": (dict(captions=["a cat", " "], conditioning_mode="text"), ValueError,
                                 r"^captions\[1\] is empty"),
    "None caption": (dict(captions=["a cat", None]), TypeError, r"^captions\[1\] is a NoneType"),
    "100k-character caption": (dict(captions=[HUGE_CAPTION]), ValueError,
                               r"^captions\[0\] is \d+ tokens long .*\(102300 characters\); the encoder LLM reads "
                               r"at most 4096 \(max_position_embeddings\): shorten it"),
    "1x300 image": (dict(image=PIL.Image.new("RGB", (1, 300))), ValueError,
                    r"^image\[0\] \(1x300 pixels\): the encoder's image processor refuses it: .*aspect ratio"),
    "300x1 image in a batch": (dict(image=[PHOTO, PIL.Image.new("RGB", (300, 1))]), ValueError,
                               r"^image\[1\] \(300x1 pixels\)"),
    "0x0 image": (dict(image=PIL.Image.new("RGB", (0, 0))), ValueError, r"^image\[0\]: the image is empty"),
    "NaN array": (dict(image=[PHOTO, np.full((8, 8, 3), np.nan)]), ValueError, r"^image\[1\]: the image contains NaN"),
    "float array in 0..255": (dict(image=np.full((8, 8, 3), 200.0)), ValueError,
                              r"^image\[0\]: float pixel values must be in \[0, 1\]"),
    "CxHxW array": (dict(image=np.zeros((3, 8, 8))), ValueError, r"^image\[0\]: .*transpose"),
}


@pytest.mark.parametrize("case", PIPELINE_ERRORS)
def test_pipeline_errors_name_the_input(pipe, case):
    kwargs, error, match = PIPELINE_ERRORS[case]
    with pytest.raises(error, match=match):
        pipe(**kwargs, **FAST)


@pytest.mark.parametrize("image", [
    PIL.Image.new("RGB", (1, 1), RED),
    PIL.Image.fromarray(np.zeros((3000, 4000, 3), np.uint8)),
    np.full((8, 8, 3), 40000, np.uint16),
    with_alpha("RGBA"),
], ids=["1x1", "4000x3000", "uint16 array", "RGBA"])
def test_pipeline_reconstructs_odd_images(pipe, image):
    out = pipe(image=image, **FAST)
    assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()


def test_enormous_caption_in_text_mode_is_truncated_and_reported(pipe):
    out = pipe(captions=[HUGE_CAPTION, "a cat"], conditioning_mode="text", **FAST)
    assert out.truncated == [True, False] and np.isfinite(out.images).all()


@pytest.mark.parametrize("widths, match", [
    ((48, 32, 64), r"projector input width \(48\) != the encoder LLM's hidden_size \(64\)"),
    ((64, 32, 48), r"projector output width \(48\) != transformer\.config\.joint_attention_dim \(64\)"),
])
def test_mismatched_projector_fails_at_construction_and_loading(pipe, tiny_dir, tmp_path, widths, match):
    with pytest.raises(ValueError, match=match):
        UAEReconstructionPipeline.from_pipe(pipe, projector=UAEProjector(*widths))
    UAEProjector(*widths).save_pretrained(tmp_path / "projector")
    with pytest.raises(ValueError, match=match):
        load_uae_pipeline(tiny_dir / "decoder", tiny_dir / "encoder", tmp_path / "projector")
