"""Real photographs bundled with scikit-image, as a `datasets.Dataset` with an `image` column (no download)."""

import datasets
import PIL.Image

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "immunohistochemistry",
                  "hubble_deep_field")

# Long descriptive captions (the decoder pre-training and cold-start data), written for these photos.
SKIMAGE_CAPTIONS = {
    "astronaut": "A portrait photograph of a smiling astronaut with short brown hair wearing an orange flight suit "
    "covered in mission patches. She stands indoors in front of an American flag on the left, a white model of a "
    "space shuttle on a stand at the top right, and a black and white helmet resting at the bottom right.",
    "coffee": "A top-down photograph of a red ceramic cup filled with espresso and a light brown crema, sitting on a "
    "matching red saucer with a silver spoon. The cup stands on a warm brown wooden table with visible grain, lit "
    "softly from the upper left so the rim of the cup shines.",
    "chelsea": "A close-up photograph of a tabby cat's face filling the frame: ginger and brown striped fur, long "
    "white whiskers, a pink nose and large yellow-green eyes looking straight at the camera. The background is a "
    "blurred beige wall on the left side of the image.",
    "rocket": "A photograph of a tall white rocket standing on its launch pad at dusk, surrounded by four dark "
    "metal lightning towers. Floodlights at the base glow yellow and orange, and the sky fades from deep blue at "
    "the top to a lighter blue near the horizon.",
    "camera": "A black and white photograph of a man in a dark coat standing on a grassy field, looking through a "
    "camera mounted on a tall tripod. Behind him, far away, are low buildings and a pale cloudy sky; the grass in "
    "the foreground is slightly blurred.",
    "cat": "A photograph of a small ginger and white cat lying on a patterned blanket, its head turned toward the "
    "camera with wide eyes. Its paws rest in front of it, and the soft warm light comes from the left side.",
    "immunohistochemistry": "A microscope image of stained tissue: many small round cells with dark brown nuclei "
    "scattered over a pale blue and violet background, with denser purple clusters near the centre and the lower "
    "left. No text.",
    "hubble_deep_field": "A deep space photograph on a black background dotted with hundreds of small galaxies: "
    "white, yellow and orange spirals and ellipses of many sizes, a few bright stars with diffraction spikes, and "
    "faint red smudges of very distant galaxies everywhere.",
}


def skimage_photos(size: int | None = 128) -> datasets.Dataset:
    """The colour and grey photos of `skimage.data` (8 images, with long captions in a `caption` column), resized to
    `size`×`size` when given."""
    try:
        from skimage import data
    except ImportError as error:
        raise ImportError("the built-in photos need scikit-image: pip install 'uae-hf[demo]'") from error
    images = []
    for name in SKIMAGE_PHOTOS:
        image = PIL.Image.fromarray(getattr(data, name)()).convert("RGB")
        images.append(image.resize((size, size), PIL.Image.BICUBIC) if size else image)
    return datasets.Dataset.from_dict(
        {"image": images, "name": list(SKIMAGE_PHOTOS), "caption": [SKIMAGE_CAPTIONS[name] for name in SKIMAGE_PHOTOS]}
    ).cast_column("image", datasets.Image())
