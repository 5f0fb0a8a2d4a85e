"""The round trip over a set of images: image → caption → image, a batch at a time, each image with its own seed.

The one loop behind `uae-hf reconstruct`, the Unified-Bench runner (`uae_hf.metrics.round_trip_bench`) and the toy
world demo's held-out scores. Image `i` draws its caption and its noise from `torch.Generator().manual_seed(seed + i)`,
so its round trip is `pipeline(image=[image_i], generator=[torch.Generator().manual_seed(seed + i)])` whatever the
batch size: the same caption, the same reconstruction within the pipeline's batching tolerance (one grey level). A
list of one generator, not a bare one: from a bare generator the pipeline draws each image's seed.
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import PIL.Image

from .seeding import seeded_generators

# The round-trip systems `uae-hf bench --system` names: a UAE pipeline (`UAEReconstructionPipeline`), a chat VLM paired
# with a text-to-image decoder (`PairedRoundTrip`, or a text-mode UAE pipeline over SD3), one Janus / Janus-Pro
# checkpoint for both directions (`JanusRoundTrip`), Emu3's Chat checkpoint captioning and its Gen checkpoint drawing
# (`Emu3RoundTrip`).
ROUND_TRIP_SYSTEMS = ("uae", "pair", "janus", "emu3")


class RoundTripSystem(Protocol):
    """What `round_trip` runs: images → captions → images, each image seeded by its own generator.

    `caption` draws image `i`'s caption with `generator[i]`, `generate` draws image `i` from caption `i` with
    `generator[i]`, and `__call__` chains the two, captioning with generators derived from the given ones (which it
    does not advance: see `captioning._derived_generators`), so that an image's round trip depends on its generator
    alone, not on the batch. `UAEReconstructionPipeline`, `PairedRoundTrip`, `JanusRoundTrip` and `Emu3RoundTrip` are
    such systems.
    """

    def caption(self, image, *, generator=None, **caption_settings) -> list[str]: ...

    def generate(self, captions, *, generator=None, **image_settings): ...  # an output with `.images`, `.captions`

    def __call__(self, image=None, captions=None, *, generator=None, **settings): ...

    def set_progress_bar_config(self, **kwargs) -> None: ...


def system_of(pipeline) -> tuple[str, dict[str, str]]:
    """The `ROUND_TRIP_SYSTEMS` name of a round-trip system and its checkpoints, as bench settings record them:
    `{"pipeline": ...}` (uae), `{"pipeline": decoder, "encoder": VLM}` (pair), `{"model": ...}` (janus),
    `{"encoder": Chat, "model": Gen}` (emu3); a system of another kind is named by its class."""
    from .emu3_round_trip import Emu3RoundTrip
    from .janus_round_trip import JanusRoundTrip
    from .paired_round_trip import PairedRoundTrip

    if isinstance(pipeline, JanusRoundTrip):
        return "janus", {"model": pipeline.name_or_path}
    if isinstance(pipeline, Emu3RoundTrip):
        return "emu3", {"encoder": pipeline.vlm.name_or_path, "model": pipeline.model.name_or_path}
    if isinstance(pipeline, PairedRoundTrip):
        return "pair", {"pipeline": pipeline.decoder.name_or_path, "encoder": pipeline.vlm.name_or_path}
    name = getattr(pipeline, "name_or_path", None) or type(pipeline).__name__
    return ("uae" if type(pipeline).__name__ == "UAEReconstructionPipeline" else type(pipeline).__name__), {
        "pipeline": name}


@dataclass
class RoundTrip:
    """One image's round trip.

    Args:
        index (`int`): the image's index; its seed is `seed + index`.
        caption (`str`, *optional*): the encoder's caption of the image; `None` when `error` is set.
        reconstruction (`PIL.Image.Image`, *optional*): the decoder's image from that caption; `None` with `error`.
        error (`Exception`, *optional*): why `load` could not read the image (it was not round-tripped).
    """

    index: int
    caption: str | None = None
    reconstruction: PIL.Image.Image | None = None
    error: Exception | None = None


def round_trip(
    pipeline,
    images: Sequence,
    batch_size: int = 8,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    load: Callable[[object], PIL.Image.Image] | None = None,
    progress=None,
    **call_kwargs,
) -> Iterator[RoundTrip]:
    """Round-trip `images` through `pipeline`, `batch_size` per call; yields one `RoundTrip` per image, in order.

    Args:
        pipeline (`RoundTripSystem`): a `UAEReconstructionPipeline`, `PairedRoundTrip`, `JanusRoundTrip`,
            `Emu3RoundTrip` (or a callable like them, with `set_progress_bar_config`); its own progress bars are
            turned off.
        images (`Sequence`): the images; with `load`, what `load` reads them from (files, dataset rows, ...).
        batch_size (`int`, defaults to 8): images per pipeline call.
        seed (`int`, defaults to 0): image `i` uses `torch.Generator().manual_seed(seed + indices[i])`.
        indices (`Sequence[int]`, *optional*): each image's index, e.g. those left to do when a run resumes; defaults
            to `0, 1, ...`.
        load (`Callable`, *optional*): reads each image of a batch just before its pipeline call, so that only one
            batch is in memory; an image it refuses (`ValueError`, `TypeError`) is yielded with `error` set, first,
            and the rest of its batch goes on without it.
        progress (*optional*): a progress bar (e.g. `tqdm`), advanced by each batch's size once the batch is yielded.
        **call_kwargs: passed to the pipeline (`num_inference_steps`, `guidance_scale`, `max_new_tokens`, ...).

    Example:

    ```py
    >>> from uae_hf.round_trip import round_trip

    >>> for item in round_trip(pipe, [PIL.Image.open("cat.png")], seed=0, num_inference_steps=28):
    ...     print(item.caption)
    ...     item.reconstruction.save(f"reconstruction_{item.index}.png")
    ```
    """
    indices = range(len(images)) if indices is None else indices
    if len(indices) != len(images):
        raise ValueError(f"got {len(indices)} indices for {len(images)} images: pass one per image")
    pipeline.set_progress_bar_config(disable=True)
    for start in range(0, len(images), batch_size):
        chunk = list(zip(indices[start : start + batch_size], images[start : start + batch_size]))
        batch, failed = [], []
        for index, item in chunk:
            if load is None:
                batch.append((index, item))
                continue
            try:
                batch.append((index, load(item)))
            except (ValueError, TypeError) as error:
                failed.append(RoundTrip(index, error=error))
        yield from failed
        if batch:
            generators = seeded_generators(seed + index for index, _ in batch)  # one per image: batch-independent
            output = pipeline(image=[image for _, image in batch], generator=generators, **call_kwargs)
            for (index, _), caption, reconstruction in zip(batch, output.captions, output.images):
                yield RoundTrip(index, caption, reconstruction)
        if progress is not None:
            progress.update(len(chunk))
