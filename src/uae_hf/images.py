"""Turn what users hand us (PIL images, paths, arrays, tensors) into RGB PIL images, with errors that say where."""

from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .pipelines.uae_reconstruction.pipeline_uae_reconstruction import to_rgb


def load_image(item, where: str = "image") -> PIL.Image.Image:
    """One image as 8-bit RGB.

    Args:
        item: a `PIL.Image.Image`, a file path, an `HxW(xC)` numpy array (uint8, or float in [0, 1]) or a `CxHxW`
            torch tensor in [0, 1].
        where (`str`): how to name the item in an error (e.g. `"references[3]"`).
    """
    if isinstance(item, (str, Path)):
        try:
            with PIL.Image.open(item) as image:
                image.load()
                return to_rgb(image)
        except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
            raise ValueError(f"{where}: cannot read image file {str(item)!r}: {error}") from error
    if isinstance(item, torch.Tensor):
        if item.ndim != 3:
            raise ValueError(f"{where}: expected a CxHxW tensor, got shape {tuple(item.shape)}")
        item = item.detach().cpu().float().clamp(0, 1).permute(1, 2, 0).numpy()
    if isinstance(item, np.ndarray):
        if item.ndim not in (2, 3):
            raise ValueError(f"{where}: expected an HxW or HxWxC array, got shape {item.shape}")
        if item.dtype != np.uint8:
            item = np.clip(np.asarray(item, dtype=np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return to_rgb(PIL.Image.fromarray(item.squeeze(-1) if item.ndim == 3 and item.shape[-1] == 1 else item))
    if isinstance(item, PIL.Image.Image):
        return to_rgb(item)
    raise TypeError(
        f"{where}: expected a PIL image, a file path, a numpy array or a CxHxW tensor, got {type(item).__name__}"
    )


def load_images(items, name: str = "images") -> list[PIL.Image.Image]:
    """`load_image` over a list; an empty list is an error."""
    if items is None or len(items) == 0:
        raise ValueError(f"`{name}` is empty: pass at least one image")
    return [load_image(item, f"{name}[{index}]") for index, item in enumerate(items)]
