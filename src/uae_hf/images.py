"""Turn what users hand us (PIL images, files, bytes, arrays, tensors) into RGB images, with errors that say where; and
what the decoder draws (float arrays) into 8-bit images."""

import io
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .pipelines.uae_reconstruction.pipeline_uae_reconstruction import array_to_image, to_rgb


def _open(source, where: str) -> PIL.Image.Image:
    name = f"image bytes ({len(source)} bytes)" if isinstance(source, bytes) else f"image file {str(source)!r}"
    image = None
    try:
        image = PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()
        return image
    except (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError) as error:
        if image is not None:
            image.close()
        bomb = isinstance(error, PIL.Image.DecompressionBombError)
        hint = " If you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS." if bomb else ""
        raise ValueError(f"{where}: cannot read {name}: {error}{hint}") from error


def pil_rgb(image: PIL.Image.Image, where: str = "image") -> PIL.Image.Image:
    """PIL's own `convert("RGB")`, as Unified-Bench's released scorer decodes its files: alpha is dropped (not
    composited), 16-bit and float values are clipped to 0..255 (not scaled by their range). A PNG colour key is dropped
    too: `convert("RGB")` keeps it in `info["transparency"]`, which the released stack's image processors
    (transformers 4.56) ignored, and transformers 5's paint white. Premultiplied `La`, which no image file holds and
    PIL converts only to `LA`, goes through `LA`."""
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"{where}: expected a PIL.Image.Image, got {type(image).__name__}")
    with warnings.catch_warnings():  # PIL's advice to convert a keyed palette to RGBA: the key is dropped here
        warnings.filterwarnings("ignore", "Palette images with Transparency", UserWarning)
        rgb = (image.convert("LA") if image.mode == "La" else image).convert("RGB")  # a new image, even from RGB
    rgb.info.pop("transparency", None)
    return rgb


def load_image(item, where: str = "image", rgb=to_rgb) -> PIL.Image.Image:
    """One image as 8-bit RGB (PIL modes and array ranges as `to_rgb` and `array_to_image` describe).

    Args:
        item: a `PIL.Image.Image`; a file path, encoded bytes or a `{"bytes": ..., "path": ...}` dict (what
            `datasets.Image(decode=False)` gives); an `HxW(xC)` numpy array (uint8, uint16, or float in [0, 1]); or a
            `CxHxW` torch tensor (uint8 or float in [0, 1]).
        where (`str`): how to name the item in an error (e.g. `"references[3]"`).
        rgb (`Callable`, defaults to `to_rgb`): how a PIL image of any mode becomes RGB; `pil_rgb` for PIL's own
            conversion.
    """
    if isinstance(item, dict) and {"bytes", "path"} & set(item):
        item = item.get("bytes") or item.get("path")
    if isinstance(item, (str, Path, bytes)):
        with _open(item, where) as image:
            return rgb(image, where)
    if isinstance(item, torch.Tensor):
        if item.ndim != 3 or not 1 <= item.shape[0] <= 4:
            raise ValueError(f"{where}: expected a CxHxW tensor with 1 to 4 channels, got shape {tuple(item.shape)}")
        item = item.detach().cpu()
        item = (item.float() if item.is_floating_point() else item).permute(1, 2, 0).numpy()
    if isinstance(item, np.ndarray):
        item = array_to_image(item, where)
    if isinstance(item, PIL.Image.Image):
        return rgb(item, where)
    raise TypeError(
        f"{where}: expected a PIL image, a file path, image bytes, a numpy array or a CxHxW tensor, "
        f"got {type(item).__name__}"
    )


def load_images(items, name: str = "images", rgb=to_rgb) -> list[PIL.Image.Image]:
    """`load_image` over a list (or an `N`-image array or tensor); an empty list or a lone image is an error."""
    if isinstance(items, (str, Path, bytes, dict, PIL.Image.Image)) or (
        isinstance(items, (np.ndarray, torch.Tensor)) and items.ndim != 4
    ):
        raise TypeError(f"`{name}` must be a list of images, got a single {type(items).__name__}: wrap it in a list")
    if items is None or len(items) == 0:
        raise ValueError(f"`{name}` is empty: pass at least one image")
    return [load_image(item, f"{name}[{index}]", rgb) for index, item in enumerate(items)]


def decoded_images(arrays) -> list[PIL.Image.Image | None]:
    """Decoded `HxWx3` float arrays in [0, 1] (a list, or an `NxHxWx3` array) as 8-bit RGB images, each value rounded to
    the nearest level (a sampler's overshoot past 0 or 1 to that end); `None` for an array with a NaN or an infinity
    (a diverged sample, not an image)."""
    return [
        PIL.Image.fromarray(np.clip((array * 255).round(), 0, 255).astype(np.uint8)) if np.isfinite(array).all()
        else None
        for array in arrays
    ]


def images_as(images: list[PIL.Image.Image], output_type: str):
    """8-bit RGB images as `output_type`: `"pil"`, `"np"` (B, H, W, 3 in [0, 1]) or `"pt"` (B, 3, H, W in [0, 1])."""
    if output_type == "pil":
        return images
    if output_type not in ("np", "pt"):
        raise ValueError(f"output_type={output_type!r}: pass 'pil', 'np' or 'pt'")
    array = np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images])
    return array if output_type == "np" else torch.from_numpy(array).permute(0, 3, 1, 2)
