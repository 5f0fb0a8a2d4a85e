import numpy as np
import pytest

from uae_hf.toy_world import ATTRIBUTES, DETAIL_LEVELS, scene_at, toy_world_dataset, toy_world_stream
from uae_hf.toy_world.world import caption_accuracy, parse_caption


def test_scenes_are_a_pure_function_of_seed_and_index():
    first = [np.asarray(scene_at(3, i).render()) for i in range(5)]
    again = [np.asarray(scene_at(3, i).render()) for i in range(5)]
    other = [np.asarray(scene_at(4, i).render()) for i in range(5)]
    assert all((a == b).all() for a, b in zip(first, again))
    assert not all((a == b).all() for a, b in zip(first, other))


def test_dataset_has_images_captions_at_every_level_and_class_labels():
    dataset = toy_world_dataset(6, "test", seed=1)
    assert dataset.column_names == ["image", "caption_terse", "caption_colour", "caption_size", "caption",
                                    *ATTRIBUTES]
    row = dataset[0]
    assert row["image"].size == (32, 32) and row["image"].mode == "RGB"
    truth = {name: dataset.features[name].int2str(row[name]) for name in ATTRIBUTES}
    assert parse_caption(row["caption"]) == truth  # the full caption states every attribute, correctly
    assert parse_caption(row["caption_terse"]) == {name: truth["shape"] if name == "shape" else None for name in ATTRIBUTES}
    assert row["caption_colour"] == f"a {truth['colour']} {truth['shape']}"
    assert len(set(DETAIL_LEVELS)) == 4


def test_splits_are_disjoint_streams_and_the_stream_matches_the_dataset():
    train, test = toy_world_dataset(20, "train"), toy_world_dataset(20, "test")
    train_pixels = {np.asarray(image).tobytes() for image in train["image"]}
    assert not train_pixels & {np.asarray(image).tobytes() for image in test["image"]}
    streamed = list(toy_world_stream("test").take(3))
    for index, row in enumerate(streamed):
        assert row["caption"] == test[index]["caption"]
        assert np.array_equal(np.asarray(row["image"]), np.asarray(test[index]["image"]))


def test_every_attribute_value_appears_in_a_modest_sample():
    dataset = toy_world_dataset(400, "train")
    for name, values in ATTRIBUTES.items():
        assert set(dataset[name]) == set(range(len(values))), name


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        toy_world_dataset(2, "dev")
    with pytest.raises(ValueError, match="num_rows"):
        toy_world_dataset(0)
    with pytest.raises(ValueError, match="unknown detail level"):
        scene_at(0, 0).caption("verbose")


def test_caption_accuracy_counts_stated_and_correct_attributes():
    truth = {"shape": ["circle", "square"], "colour": ["red", "blue"], "size": ["large", "small"],
             "position": ["top left", "center"], "background": ["grey", "white"]}
    captions = ["a large red circle at the top left on a grey background", "a red square"]
    result = caption_accuracy(captions, truth)
    assert result["recall"] == pytest.approx(6 / 10)  # 5 right + square right (red is wrong)
    assert result["precision"] == pytest.approx(6 / 7)
    assert result["attributes_stated"] == pytest.approx(3.5)
    assert parse_caption("a small blue triangle at the top on a white background")["position"] == "top"


def test_demo_config_rejects_budgets_that_cannot_run():
    from uae_hf.toy_world.demo import ToyDemoConfig

    with pytest.raises(ValueError, match="pretrain_steps"):
        ToyDemoConfig(pretrain_steps=0)
    with pytest.raises(ValueError, match="train_rows >= group_size"):
        ToyDemoConfig.quick_run(train_rows=10)  # 4 images of 4 draws per step
    with pytest.raises(ValueError, match="group_size >= 2"):
        ToyDemoConfig(group_size=1)
    with pytest.raises(ValueError, match="sft_level_weights"):
        ToyDemoConfig(sft_level_weights=(1.0, 0.0))
    assert ToyDemoConfig.quick_run(seed=3).seed == 3 and ToyDemoConfig.quick_run().pretrain_steps == 10
    # a full run's config says it is not the plumbing check (its report then carries no "quick run" note)
    assert ToyDemoConfig().quick is False and ToyDemoConfig.quick_run().quick is True
    # and the two never share a folder by default (a full run would otherwise find the quick one's stages)
    assert ToyDemoConfig().output_dir == "outputs/demo" and ToyDemoConfig.quick_run().output_dir == "outputs/demo-quick"
    with pytest.raises(ValueError, match="stage3_learning_rate"):
        ToyDemoConfig(stage3_learning_rate=0.0)


def test_sft_rows_are_prompt_completion_conversations_mostly_terse():
    from uae_hf.toy_world.demo import sft_dataset

    train = toy_world_dataset(200)
    rows = sft_dataset(train, (0.7, 0.1, 0.1, 0.1), seed=0)
    assert rows.column_names == ["images", "prompt", "completion"]
    completions = [row["completion"][0]["content"][0]["text"] for row in rows]
    terse = sum(text == train[i]["caption_terse"] for i, text in enumerate(completions))
    assert 0.6 < terse / len(rows) < 0.8
    assert all(text in {train[i][c] for c in ("caption_terse", "caption_colour", "caption_size", "caption")}
               for i, text in enumerate(completions))
    assert rows[0]["prompt"][0]["role"] == "user" and rows[0]["images"][0].size == (32, 32)
