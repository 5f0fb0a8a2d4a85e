"""A procedural world of one coloured shape on a plain background, small enough to train a whole UAE on a CPU.

Every image is a pure function of `(seed, index)`, so the world is infinite and reproducible. Each row carries its
ground-truth attributes and captions at four levels of detail, from terse ("a circle") to every attribute ("a large
red circle at the top left on a grey background").
"""

from dataclasses import dataclass

import datasets
import numpy as np
import PIL.Image
import PIL.ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
BACKGROUNDS = {"white": (245, 245, 245), "grey": (140, 140, 140)}
ATTRIBUTES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": SIZES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}
DETAIL_LEVELS = ("terse", "colour", "size", "full")

IMAGE_SIZE = 32
_SUPERSAMPLE = 4
_CENTRES = (9.0, 16.0, 23.0)  # row/column centres of the 3×3 positions, in 32-pixel units
_RADII = {"small": 4.0, "large": 7.0}
# Offsets between the split seeds: the train, validation and test streams never share an index.
SPLIT_OFFSETS = {"train": 0, "validation": 1_000_003, "test": 2_000_003}


@dataclass(frozen=True)
class ToyScene:
    """Ground truth of one image: names from `ATTRIBUTES`, plus the small jitter that makes every image unique."""

    shape: str
    colour: str
    size: str
    position: str
    background: str
    jitter: tuple[float, float, float, int, int, int]  # dx, dy, radius scale, colour shift per channel

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "ToyScene":
        picks = {name: values[rng.integers(len(values))] for name, values in ATTRIBUTES.items()}
        jitter = (*rng.uniform(-1.5, 1.5, 2), rng.uniform(0.9, 1.1), *rng.integers(-15, 16, 3))
        return cls(**picks, jitter=tuple(float(v) if i < 3 else int(v) for i, v in enumerate(jitter)))

    def caption(self, level: str = "full") -> str:
        """The caption at one of `DETAIL_LEVELS`."""
        if level == "terse":
            return f"a {self.shape}"
        if level == "colour":
            return f"a {self.colour} {self.shape}"
        if level == "size":
            return f"a {self.size} {self.colour} {self.shape}"
        if level == "full":
            where = "in the center" if self.position == "center" else f"at the {self.position}"
            return f"a {self.size} {self.colour} {self.shape} {where} on a {self.background} background"
        raise ValueError(f"unknown detail level {level!r}; choose from {DETAIL_LEVELS}")

    def render(self, size: int = IMAGE_SIZE) -> PIL.Image.Image:
        """Draw the scene (supersampled, then downsampled, for smooth edges)."""
        canvas = size * _SUPERSAMPLE
        scale = canvas / IMAGE_SIZE
        image = PIL.Image.new("RGB", (canvas, canvas), BACKGROUNDS[self.background])
        row, column = divmod(POSITIONS.index(self.position), 3)
        dx, dy, radius_scale, *shift = self.jitter
        cx, cy = (_CENTRES[column] + dx) * scale, (_CENTRES[row] + dy) * scale
        radius = _RADII[self.size] * radius_scale * scale
        fill = tuple(int(np.clip(c + s, 0, 255)) for c, s in zip(COLOURS[self.colour], shift))
        draw = PIL.ImageDraw.Draw(image)
        if self.shape == "circle":
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        elif self.shape == "square":
            half = radius * 0.85  # about the circle's area
            draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
        else:
            top, base = cy - radius, cy + radius * 0.8
            draw.polygon([(cx, top), (cx - radius, base), (cx + radius, base)], fill=fill)
        return image.resize((size, size), PIL.Image.LANCZOS)

    def labels(self) -> dict[str, int]:
        """Attribute → class index in `ATTRIBUTES`."""
        return {name: ATTRIBUTES[name].index(getattr(self, name)) for name in ATTRIBUTES}


def scene_at(seed: int, index: int) -> ToyScene:
    """The scene of row `index` of the stream `seed` (a pure function of both)."""
    return ToyScene.sample(np.random.default_rng([seed, index]))


def _features(image_size: int) -> datasets.Features:
    return datasets.Features(
        {
            "image": datasets.Image(),
            **{f"caption_{level}": datasets.Value("string") for level in DETAIL_LEVELS[:-1]},
            "caption": datasets.Value("string"),
            **{name: datasets.ClassLabel(names=list(values)) for name, values in ATTRIBUTES.items()},
        }
    )


def _row(scene: ToyScene, image_size: int) -> dict:
    return {
        "image": scene.render(image_size),
        **{f"caption_{level}": scene.caption(level) for level in DETAIL_LEVELS[:-1]},
        "caption": scene.caption("full"),
        **scene.labels(),
    }


def _rows(seed: int, start: int, stop: int | None, image_size: int):
    index = start
    while stop is None or index < stop:
        yield _row(scene_at(seed, index), image_size)
        index += 1


def toy_world_dataset(
    num_rows: int, split: str = "train", seed: int = 0, image_size: int = IMAGE_SIZE
) -> datasets.Dataset:
    """`num_rows` scenes of one split as a `datasets.Dataset`.

    Columns: `image`, `caption_terse`, `caption_colour`, `caption_size`, `caption` (every attribute), and one
    `ClassLabel` per attribute (`shape`, `colour`, `size`, `position`, `background`). Splits draw disjoint streams.
    """
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; choose from {sorted(SPLIT_OFFSETS)}")
    if num_rows < 1:
        raise ValueError(f"num_rows must be at least 1, got {num_rows}")
    start = SPLIT_OFFSETS[split]
    rows = list(_rows(seed, start, start + num_rows, image_size))
    return datasets.Dataset.from_list(rows, features=_features(image_size), split=split)


def toy_world_stream(split: str = "train", seed: int = 0, image_size: int = IMAGE_SIZE) -> datasets.IterableDataset:
    """The endless stream of one split, as a `datasets.IterableDataset` (rows as in `toy_world_dataset`)."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; choose from {sorted(SPLIT_OFFSETS)}")
    return datasets.IterableDataset.from_generator(
        _rows,
        features=_features(image_size),
        gen_kwargs={"seed": seed, "start": SPLIT_OFFSETS[split], "stop": None, "image_size": image_size},
    )


def ground_truth(dataset: datasets.Dataset) -> dict[str, list[str]]:
    """Attribute → value name per row, from a toy-world dataset's `ClassLabel` columns."""
    return {name: [dataset.features[name].int2str(value) for value in dataset[name]] for name in ATTRIBUTES}


def parse_caption(caption: str) -> dict[str, str | None]:
    """The attributes a caption states (`None` where it says nothing), read back with the world's vocabulary."""
    text = f" {' '.join(caption.lower().replace(',', ' ').split())} "
    found: dict[str, str | None] = {}
    for name, values in ATTRIBUTES.items():
        if name == "position":
            # the longest phrase first: "top left" is not "top"; "in the center" and "at the X" both count
            hits = [v for v in sorted(values, key=len, reverse=True) if f" the {v} " in text]
        elif name == "background":
            hits = [v for v in values if f" {v} background " in text]
        else:
            hits = [v for v in values if f" {v} " in text and f" {v} background " not in text]
        found[name] = hits[0] if hits else None
    return found


def caption_accuracy(captions: list[str], truth: dict[str, list[str]]) -> dict[str, float]:
    """How much of the ground truth each caption states correctly (`recall`, out of every attribute), and how much
    of what it states is right (`precision`): a held-out check on the encoder that no reward sees."""
    stated = correct = total = 0
    for index, caption in enumerate(captions):
        parsed = parse_caption(caption)
        for name in truth:
            total += 1
            if parsed[name] is not None:
                stated += 1
                correct += parsed[name] == truth[name][index]
    return {"recall": correct / total, "precision": correct / stated if stated else 0.0,
            "attributes_stated": stated / len(captions)}
