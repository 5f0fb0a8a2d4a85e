from types import SimpleNamespace

import numpy as np
import pytest
import torch

from uae_hf.round_trip import round_trip

FAST = dict(num_inference_steps=2, max_new_tokens=6, do_sample=True, temperature=0.7)


class RecordingPipeline:
    """Echoes each image as its reconstruction and records what each call was given."""

    def __init__(self):
        self.seeds, self.kwargs, self.bars = [], [], None

    def set_progress_bar_config(self, **kwargs):
        self.bars = kwargs

    def __call__(self, image, generator, **kwargs):
        self.seeds.append([one.initial_seed() for one in generator])
        self.kwargs.append(kwargs)
        return SimpleNamespace(captions=[f"caption of {item}" for item in image], images=list(image))


class Bar:
    def __init__(self):
        self.updates = []

    def update(self, count):
        self.updates.append(count)


def test_each_image_is_seeded_by_its_index_whatever_the_batch():
    pipeline, bar = RecordingPipeline(), Bar()
    trips = list(round_trip(pipeline, list("abcde"), batch_size=2, seed=10, progress=bar, guidance_scale=3.0))
    assert pipeline.seeds == [[10, 11], [12, 13], [14]] and bar.updates == [2, 2, 1]
    assert [(trip.index, trip.caption, trip.reconstruction) for trip in trips] == [
        (index, f"caption of {item}", item) for index, item in enumerate("abcde")]
    assert pipeline.kwargs == [{"guidance_scale": 3.0}] * 3 and pipeline.bars == {"disable": True}
    resumed = RecordingPipeline()  # the images left to do keep their own indices, hence their seeds
    assert [trip.index for trip in round_trip(resumed, list("bde"), 2, 10, indices=[1, 3, 4])] == [1, 3, 4]
    assert resumed.seeds == [[11, 13], [14]]
    with pytest.raises(ValueError, match="2 indices for 3 images"):
        list(round_trip(resumed, list("abc"), indices=[0, 1]))


def test_an_image_load_refuses_is_yielded_with_its_error_and_its_batch_goes_on():
    def load(item):
        if item == "bad":
            raise ValueError(f"cannot read {item}")
        return item.upper()

    pipeline, bar = RecordingPipeline(), Bar()
    trips = list(round_trip(pipeline, ["a", "bad", "c", "d"], batch_size=2, seed=0, load=load, progress=bar))
    assert [(trip.index, trip.reconstruction, str(trip.error) if trip.error else None) for trip in trips] == [
        (1, None, "cannot read bad"), (0, "A", None), (2, "C", None), (3, "D", None)]
    assert pipeline.seeds == [[0], [2, 3]] and bar.updates == [2, 2]  # the batches as chunked before loading
    none_readable = RecordingPipeline()
    assert [trip.index for trip in round_trip(none_readable, ["bad"], load=load)] == [0]
    assert none_readable.seeds == []  # no call without an image


def test_image_i_is_the_pipeline_called_on_it_alone_with_seed_plus_i(pipe, photos):
    trips = list(round_trip(pipe, photos, batch_size=2, seed=7, **FAST))
    for index, (photo, trip) in enumerate(zip(photos, trips)):
        alone = pipe(image=[photo], generator=[torch.Generator().manual_seed(7 + index)], **FAST)
        assert trip.caption == alone.captions[0]
        difference = np.abs(np.asarray(trip.reconstruction, float) - np.asarray(alone.images[0], float))
        assert difference.max() <= 1  # batched vs alone: within the pipeline's batching tolerance, one grey level
