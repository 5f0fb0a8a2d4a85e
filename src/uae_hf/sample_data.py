"""Real photographs bundled with scikit-image, as a `datasets.Dataset` with an `image` column (no download)."""

import datasets
import PIL.Image

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "immunohistochemistry",
                  "hubble_deep_field")


def skimage_photos(size: int | None = 128) -> datasets.Dataset:
    """The colour and grey photos of `skimage.data` (8 images), resized to `size`×`size` when given."""
    try:
        from skimage import data
    except ImportError as error:
        raise ImportError("the built-in photos need scikit-image: pip install 'uae-hf[demo]'") from error
    images = []
    for name in SKIMAGE_PHOTOS:
        image = PIL.Image.fromarray(getattr(data, name)()).convert("RGB")
        images.append(image.resize((size, size), PIL.Image.BICUBIC) if size else image)
    return datasets.Dataset.from_dict({"image": images, "name": list(SKIMAGE_PHOTOS)}).cast_column(
        "image", datasets.Image()
    )
