"""Images as the pipeline takes them: any PIL mode or an array, converted to 8-bit RGB without guessing a range."""

import numpy as np
import PIL.Image


def _floats_to_uint8(array: np.ndarray, where: str, peak: float = 1.0) -> np.ndarray:
    """Float pixels in [0, peak] → uint8; NaN, infinities and values outside the range are errors, never clipped."""
    if not np.isfinite(array).all():
        raise ValueError(f"{where}: the image contains NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < -0.5 * peak / 255 or high > peak * (1 + 0.5 / 255):  # within half an 8-bit step is rounding noise
        hint = "; divide 0..255 data by 255, map [-1, 1] data with (x + 1) / 2" if peak == 1 else ""
        raise ValueError(f"{where}: float pixel values must be in [0, {peak:g}], got [{low:.4g}, {high:.4g}]{hint}")
    return np.clip(array.astype(np.float32) * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)


def array_to_image(array: np.ndarray, where: str = "image") -> PIL.Image.Image:
    """An `HxW` or `HxWxC` (C = 1 to 4) array as a PIL image, without guessing its range.

    uint8 is taken as is, uint16 as 0..65535, other integers must hold 0..255, floats (and bools) must be finite and in
    [0, 1]. Anything else is an error that names `where` (e.g. `"references[3]"`) and says how to fix it.
    """
    if array.ndim not in (2, 3) or (array.ndim == 3 and not 1 <= array.shape[-1] <= 4):
        hint = "; for a CxHxW array pass array.transpose(1, 2, 0)" if array.ndim == 3 and array.shape[0] <= 4 else ""
        raise ValueError(f"{where}: expected an HxW or HxWxC array with 1 to 4 channels, got shape {array.shape}{hint}")
    if array.size == 0:
        raise ValueError(f"{where}: the image is empty (shape {array.shape})")
    if array.dtype.type in (np.bool_, np.uint16):  # `.type`: big-endian uint16 (PIL's I;16B) too
        array = _floats_to_uint8(array.astype(np.float32), where, 65535.0 if array.dtype.type is np.uint16 else 1.0)
    elif np.issubdtype(array.dtype, np.floating):
        array = _floats_to_uint8(array, where)
    elif np.issubdtype(array.dtype, np.integer) and array.dtype != np.uint8:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"{where}: {array.dtype} values span [{low}, {high}], outside 0..255; pass uint8 for 8-bit data or "
                "uint16 (PIL mode I;16) for 16-bit data"
            )
        array = array.astype(np.uint8)
    elif array.dtype != np.uint8:
        raise TypeError(f"{where}: unsupported array dtype {array.dtype}; pass uint8, uint16 or float in [0, 1]")
    return PIL.Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


def to_rgb(image, where: str = "image") -> PIL.Image.Image:
    """Convert a PIL image in any mode to 8-bit RGB; transparent pixels are composited on white.

    Transparent means an alpha channel, or a PNG colour key (`info["transparency"]`: palette entries, a grey level or
    an RGB colour, 16-bit grey levels included), whose pixels are fully transparent; a 16-bit RGB key matches no pixel
    (PIL keeps only 8 bits of such files). The result carries no key, so no image processor downstream applies it a
    second time. Modes I;16 (0..65535) and I (0..255) follow
    [`array_to_image`]; F holds 0..255 as `Image.convert("F")` makes it, so an F image in [0, 1] is refused as
    ambiguous. CMYK and other colour spaces use PIL's conversion (no ICC profile). NaN and out-of-range values are
    errors naming `where`.
    """
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"{where}: expected a PIL.Image.Image, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{where}: the image is empty ({image.width}x{image.height} pixels)")
    key = image.info.get("transparency")
    if image.mode == "F":
        array = np.asarray(image)
        if 0 < array.max() <= 1:
            raise ValueError(
                f"{where}: float (mode F) image with values in [0, 1], but PIL's float images hold 0..255; pass the "
                "array itself (float arrays are read as [0, 1]) or multiply it by 255"
            )
        image = PIL.Image.fromarray(_floats_to_uint8(array, where, 255.0))
    elif image.mode.startswith("I"):
        array = np.asarray(image)
        image = array_to_image(array, where)
        if isinstance(key, int):  # PIL compares the key with 8-bit values only: match the 16-bit levels here
            image.putalpha(PIL.Image.fromarray(np.where(array == key, 0, 255).astype(np.uint8)))
    elif image.mode in ("1", "L", "P", "RGB") and key is not None:
        image = image.convert("RGBA")  # PIL turns each mode's key into alpha
    if image.mode in ("RGBa", "La"):
        image = image.convert({"La": "LA"}.get(image.mode, "RGBA"))  # premultiplied La converts only to LA
    if image.mode in ("RGBA", "LA", "PA"):
        background = PIL.Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")
