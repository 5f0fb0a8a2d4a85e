import json

import numpy as np
import PIL.Image
import pytest

from uae_hf import OFFICIAL_BACKBONES, PAPER_BACKBONES
from uae_hf.cli import main
from uae_hf.metrics.round_trip_bench import (
    ReferenceImage,
    match_reconstructions_officially,
    references_from_dataset,
    references_from_folder,
    run_bench,
)

BENCH_KWARGS = dict(num_inference_steps=2, max_new_tokens=6, do_sample=False)


@pytest.fixture()
def reference_dir(photos, tmp_path):
    folder = tmp_path / "references"
    folder.mkdir()
    for name, photo in zip(("astronaut", "coffee", "chelsea"), photos):
        photo.save(folder / f"{name}.png")
    return folder


@pytest.fixture()
def score_folder(backbone_checkpoints):
    """`uae-hf bench` on a folder of reconstructions with the paper's four twins; returns its scores.json."""

    def score(references, reconstructions, out, protocol="official"):
        main(["bench", "--images-dir", str(references), "--reconstructions", str(reconstructions), "--output-dir",
              str(out), "--protocol", protocol,
              *[arg for name in PAPER_BACKBONES for arg in ("--checkpoint", f"{name}={backbone_checkpoints[name]}")]])
        return json.loads((out / "scores.json").read_text())

    return score


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


def test_official_protocol_writes_score_i2i_fields(reference_dir, score_folder, photos, tmp_path):
    """`--protocol official` keeps our fields and adds Score_i2i.py's: every reconstruction file is a row, a failed
    pair (unreadable file, or no reference) is None and out of the means, overall_average is the mean of the
    backbone means (not x100)."""
    photos[1].save(reference_dir / "camera.png")
    recon = tmp_path / "other_model"
    recon.mkdir()
    photos[0].save(recon / "astronaut.png")  # same file name, a perfect reconstruction
    photos[2].save(recon / "recon_coffee.png")  # recon_ prefix
    photos[1].save(recon / "chelsea.jpg")  # same stem
    (recon / "camera.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")  # a failed pair
    photos[0].save(recon / "stranger.png")  # no reference
    scores = score_folder(reference_dir, recon, tmp_path / "scored")
    assert scores["protocol"] == "official" and scores["model_types"] == ["clip", "longclip", "dinov2", "dinov3"]
    files = ["astronaut.png", "camera.png", "chelsea.jpg", "recon_coffee.png", "stranger.png"]
    rows = {row["image"]: row for row in scores["per_image"]}
    averages = {}
    for name in PAPER_BACKBONES:
        similarities = scores["similarities_by_model"][name]
        assert list(similarities) == files
        assert similarities["camera.png"] is None and similarities["stranger.png"] is None
        assert similarities["astronaut.png"] == pytest.approx(1.0, abs=1e-5)
        assert similarities["chelsea.jpg"] == rows["chelsea"][name] and similarities["recon_coffee.png"] < 0.9999
        valid = [similarities[file] for file in ("astronaut.png", "chelsea.jpg", "recon_coffee.png")]
        averages[name] = sum(valid) / 3
        assert scores["statistics_by_model"][name] == {
            "total_images": 5, "valid_pairs": 3, "average_similarity": pytest.approx(averages[name]),
            "min_similarity": min(valid), "max_similarity": max(valid),
        }
        assert scores["backbones"][name]["mean"] == pytest.approx(averages[name])  # our fields: the same pairs
    summary = scores["summary"]
    assert summary["models_used"] == list(OFFICIAL_BACKBONES)
    assert summary["average_scores_by_model"] == pytest.approx(averages)
    assert summary["overall_average"] == pytest.approx(sum(averages.values()) / 4)
    assert summary["overall_average"] == pytest.approx(scores["overall"], abs=1e-6)  # not x100
    assert summary["best_model"] == [max(averages, key=averages.get), pytest.approx(max(averages.values()))]
    assert summary["worst_model"] == [min(averages, key=averages.get), pytest.approx(min(averages.values()))]
    assert {item["image"] for item in scores["skipped"]} == {"camera", "stranger.png"}


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")  # PIL's, as Score_i2i.py converts
def test_official_protocol_decodes_files_as_score_i2i(score_folder, photos, tmp_path):
    """Score_i2i.py opens every file with PIL's `convert("RGB")`: alpha (a palette's too) dropped, 16-bit values
    clipped at 255. Reconstructions that are exactly that score 1; under the default protocol, which composites on
    white and maps 16-bit images by range, they do not."""
    references, reconstructions = tmp_path / "references", tmp_path / "reconstructions"
    references.mkdir()
    reconstructions.mkdir()
    transparent = photos[0].convert("RGBA")
    transparent.putalpha(PIL.Image.linear_gradient("L").resize(photos[0].size))
    originals = {"rgba.png": transparent, "la.png": transparent.convert("LA"), "palette.png": transparent.quantize(),
                 "deep.png": PIL.Image.fromarray(np.asarray(photos[1].convert("L")).astype(np.uint16) * 257)}
    for name, image in originals.items():
        image.save(references / name)
        PIL.Image.open(references / name).convert("RGB").save(reconstructions / name)
    official = score_folder(references, reconstructions, tmp_path / "official")
    default = score_folder(references, reconstructions, tmp_path / "default", protocol="default")
    for name in OFFICIAL_BACKBONES:
        assert official["similarities_by_model"][name] == pytest.approx(dict.fromkeys(originals, 1.0), abs=1e-5)
    assert [row["overall"] < 0.99 for row in default["per_image"]] == [True] * 4


def test_official_references_are_found_in_subfolders_with_score_i2i_file_types(score_folder, photos, tmp_path):
    """Score_i2i.py looks for references recursively and only among .jpg .jpeg .png .bmp .tiff .webp: a reference in
    a subfolder pairs, a .gif or .tif one does not (its reconstruction is a failed pair)."""
    references, reconstructions = tmp_path / "references", tmp_path / "reconstructions"
    (references / "sub").mkdir(parents=True)
    reconstructions.mkdir()
    photos[0].save(references / "sub" / "astronaut.png")
    photos[1].save(references / "coffee.gif")
    photos[2].save(references / "chelsea.tif")
    for name, photo in zip(("astronaut", "coffee", "chelsea"), photos):
        photo.save(reconstructions / f"{name}.png")
    scores = score_folder(references, reconstructions, tmp_path / "out")
    for name in OFFICIAL_BACKBONES:
        similarities = scores["similarities_by_model"][name]
        assert similarities["astronaut.png"] == pytest.approx(1.0, abs=1e-5)
        assert similarities["coffee.png"] is None and similarities["chelsea.png"] is None
    assert [row["file"] for row in scores["per_image"]] == ["astronaut.png"]


def test_official_duplicate_file_names_count_once_in_every_field(score_folder, photos, tmp_path):
    """Score_i2i.py keys scores by file name, so of a/astronaut.png and b/astronaut.png the last one's score stands.
    Our per-image rows, means and unified_bench count the same pairs, so unified_bench is overall_average x 100."""
    references, reconstructions = tmp_path / "references", tmp_path / "reconstructions"
    references.mkdir()
    for name, photo in zip(("astronaut", "coffee"), photos):
        photo.save(references / f"{name}.png")
    for path, photo in (("a/astronaut.png", photos[2]), ("b/astronaut.png", photos[0]), ("coffee.png", photos[2])):
        (reconstructions / path).parent.mkdir(parents=True, exist_ok=True)
        photo.save(reconstructions / path)
    scores = score_folder(references, reconstructions, tmp_path / "out")
    assert [row["reconstruction"] for row in scores["per_image"]] == [
        str(reconstructions / "b" / "astronaut.png"), str(reconstructions / "coffee.png")]
    for name in OFFICIAL_BACKBONES:
        assert scores["similarities_by_model"][name]["astronaut.png"] == pytest.approx(1.0, abs=1e-5)
        assert scores["backbones"][name]["mean"] == scores["statistics_by_model"][name]["average_similarity"]
    assert scores["overall"] == scores["summary"]["overall_average"]
    assert scores["unified_bench"] == 100 * scores["summary"]["overall_average"]


def test_official_empty_reconstruction_folder_gives_an_empty_summary(score_folder, reference_dir, backbone_checkpoints,
                                                                     tmp_path):
    """Score_i2i.py writes its JSON, with an empty summary, for a folder without reconstructions, and so does
    `run_bench`; the default protocol refuses to score nothing, and `uae-hf bench` under either protocol."""
    (tmp_path / "empty").mkdir()
    scores = run_bench(references_from_folder(reference_dir), tmp_path / "out", reconstructions_dir=tmp_path / "empty",
                       checkpoints={name: backbone_checkpoints[name] for name in PAPER_BACKBONES}, protocol="official")
    assert {key: scores[key] for key in ("model_types", "similarities_by_model", "statistics_by_model", "summary")} == {
        "model_types": list(OFFICIAL_BACKBONES), "similarities_by_model": dict.fromkeys(OFFICIAL_BACKBONES, {}),
        "statistics_by_model": {}, "summary": {}}
    assert scores["num_images"] == 0 and scores["unified_bench"] is None and len(scores["skipped"]) == 3
    assert "no pair scored" in (tmp_path / "out" / "scores.md").read_text()
    for protocol in ("official", "default"):
        with pytest.raises(SystemExit, match="no reconstruction to score in .*empty'"):
            score_folder(reference_dir, tmp_path / "empty", tmp_path / protocol, protocol=protocol)


def test_official_pairing_by_name_then_stem_or_recon_prefix(tmp_path):
    """Score_i2i.py: the reference with the same file name, else the first (sorted) reference whose stem is the
    reconstruction's, or whose stem with `recon_` is; its file types only (no .gif), subfolders included."""
    references, reconstructions = tmp_path / "references", tmp_path / "reconstructions"
    for name in ("a.png", "bird.png", "cat.png", "dog.jpg", "recon_a.png", "x.jpg", "x.png"):
        (references / name).parent.mkdir(exist_ok=True)
        (references / name).touch()
    for name in ("cat.png", "cat.gif", "dog.png", "fish.png", "recon_a.jpg", "recon_bird.webp", "sub/recon_dog.png",
                 "x.png"):
        (reconstructions / name).parent.mkdir(parents=True, exist_ok=True)
        (reconstructions / name).touch()
    matches = match_reconstructions_officially(references_from_folder(references), reconstructions)
    assert [(str(path.relative_to(reconstructions)), ref and ref.file_name) for path, ref in matches] == [
        ("cat.png", "cat.png"),  # file name
        ("dog.png", "dog.jpg"),  # stem
        ("fish.png", None),  # no reference: a failed pair
        ("recon_a.jpg", "a.png"),  # a.png (prefix) comes before recon_a.png (stem), as in Score_i2i.py
        ("recon_bird.webp", "bird.png"),  # recon_ prefix
        ("sub/recon_dog.png", "dog.jpg"),
        ("x.png", "x.png"),  # the file name wins over x.jpg's stem, though x.jpg comes first
    ]
    dataset_row = ReferenceImage("07", object())  # a dataset row is named by its index
    [(_, ref)] = match_reconstructions_officially([dataset_row], _touch(tmp_path / "rows" / "07.png").parent)
    assert ref is dataset_row and ref.file_name == "07"


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


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
    with pytest.raises(SystemExit, match="drop --backbone-dtype"):
        main(["bench", "--images-dir", str(tmp_path), "--reconstructions", str(tmp_path), "--output-dir", str(tmp_path),
              "--protocol", "official", "--backbone-dtype", "bfloat16"])


def test_unknown_backbone_fails_before_any_reconstruction(pipe, reference_dir, tmp_path):
    counting = CountingPipeline(pipe)
    with pytest.raises(ValueError, match="choose from"):
        run_bench(references_from_folder(reference_dir), tmp_path / "x", pipeline=counting, config_name="clip+nope")
    assert counting.images == 0
