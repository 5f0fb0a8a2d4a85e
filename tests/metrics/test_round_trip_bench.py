import json

import pytest

from uae_hf.cli import main
from uae_hf.metrics.round_trip_bench import references_from_dataset, references_from_folder, run_bench

BENCH_KWARGS = dict(num_inference_steps=2, max_new_tokens=6, do_sample=False)


@pytest.fixture()
def reference_dir(photos, tmp_path):
    folder = tmp_path / "references"
    folder.mkdir()
    for name, photo in zip(("astronaut", "coffee", "chelsea"), photos):
        photo.save(folder / f"{name}.png")
    return folder


class CountingPipeline:
    """The real pipeline, counting the images it is asked to reconstruct."""

    def __init__(self, pipe):
        self.pipe, self.images = pipe, 0

    def set_progress_bar_config(self, **kwargs):
        self.pipe.set_progress_bar_config(**kwargs)

    def __call__(self, image, **kwargs):
        self.images += len(image)
        return self.pipe(image=image, **kwargs)


def test_round_trip_produces_all_files_and_resumes(pipe, reference_dir, backbone_checkpoints, tmp_path):
    (reference_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    checkpoints = {name: backbone_checkpoints[name] for name in ("clip", "dinov2", "dinov3", "longclip")}
    counting = CountingPipeline(pipe)
    out = tmp_path / "bench"
    report = run_bench(references_from_folder(reference_dir), out, pipeline=counting, checkpoints=checkpoints,
                       batch_size=2, **BENCH_KWARGS)
    assert counting.images == 3
    assert report["num_images"] == 3 and [item["image"] for item in report["skipped"]] == ["broken"]
    for name in ("captions.jsonl", "scores.json", "scores.md", "grid.png", "reconstructions/coffee.png"):
        assert (out / name).exists(), name
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["backbones"]) == set(checkpoints)
    assert set(scores["backbones"]["clip"]) == {"mean", "min", "max", "std"}
    assert scores["unified_bench"] == pytest.approx(100 * scores["overall"])
    assert all("caption" in row for row in scores["per_image"])
    assert "Unified-Bench" in (out / "scores.md").read_text()

    (out / "reconstructions" / "coffee.png").unlink()  # as if the run had stopped before this image
    again = run_bench(references_from_folder(reference_dir), out, pipeline=counting, checkpoints=checkpoints,
                      batch_size=2, **BENCH_KWARGS)
    assert counting.images == 4  # only the missing image was reconstructed again
    first_rows = {row["image"]: row for row in report["per_image"]}
    for row in again["per_image"]:
        if row["image"] != "coffee":
            assert row["clip"] == pytest.approx(first_rows[row["image"]]["clip"], abs=1e-6)


def test_score_only_pairs_files_by_name_and_prefix(reference_dir, backbone_checkpoints, photos, tmp_path):
    recon = tmp_path / "other_model"
    recon.mkdir()
    photos[0].save(recon / "recon_astronaut.png")  # a perfect reconstruction
    photos[2].save(recon / "coffee.jpg")
    out = tmp_path / "scored"
    main(["bench", "--images-dir", str(reference_dir), "--reconstructions", str(recon), "--output-dir", str(out),
          "--backbones", "clip", "--checkpoint", f"clip={backbone_checkpoints['clip']}"])
    scores = json.loads((out / "scores.json").read_text())
    rows = {row["image"]: row for row in scores["per_image"]}
    assert set(rows) == {"astronaut", "coffee"}
    assert rows["astronaut"]["clip"] == pytest.approx(1.0, abs=1e-5)
    assert [item["image"] for item in scores["skipped"]] == ["chelsea"]


def test_references_from_a_datasets_folder(photos, tmp_path):
    import datasets

    dataset = datasets.Dataset.from_dict({"image": photos[:2], "label": [0, 1]}).cast_column("image", datasets.Image())
    dataset.save_to_disk(tmp_path / "ds")
    references = references_from_dataset(str(tmp_path / "ds"))
    assert [ref.name for ref in references] == ["0", "1"]
    assert references[1].load().size == photos[1].size
    with pytest.raises(ValueError, match="no column 'img'"):
        references_from_dataset(str(tmp_path / "ds"), image_column="img")


def test_bench_cli_rejects_ambiguous_sources(tmp_path):
    with pytest.raises(SystemExit, match="exactly one"):
        main(["bench", "--output-dir", str(tmp_path), "--pipeline", "p"])
    with pytest.raises(SystemExit, match="not both"):
        main(["bench", "--images-dir", str(tmp_path), "--output-dir", str(tmp_path)])


def test_unknown_backbone_fails_before_any_reconstruction(pipe, reference_dir, tmp_path):
    counting = CountingPipeline(pipe)
    with pytest.raises(ValueError, match="choose from"):
        run_bench(references_from_folder(reference_dir), tmp_path / "x", pipeline=counting, config_name="clip+nope")
    assert counting.images == 0
