"""No silent wrong or stale bench result: one reconstruction and one score row per reference, whatever the file
names; `scores.json` records the settings that made it; a rerun reuses only what the same settings made."""

import json

import pytest

from uae_hf import PAPER_BACKBONES
from uae_hf.cli import main
from uae_hf.metrics.round_trip_bench import ResumeError, references_from_folder, run_bench, unique_names

from test_round_trip_bench import BENCH_KWARGS as STEPS, CountingPipeline  # one counting pipeline for the bench tests


@pytest.fixture()
def shared_stems(photos, tmp_path):
    """x.png and x.jpg (two different photos) beside cat.png."""
    folder = tmp_path / "references"
    folder.mkdir()
    photos[0].save(folder / "x.png")
    photos[1].save(folder / "x.jpg", quality=95)
    photos[2].save(folder / "cat.png")
    return folder


def test_unique_names(tmp_path):
    assert unique_names(["a/cat.png", "a/dog.jpg"]) == ["cat", "dog"]
    assert unique_names(["a/x.png", "a/x.jpg", "a/y.png"]) == ["x.png", "x.jpg", "y"]
    assert unique_names(["d1/x.png", "d2/x.png", "d2/x.jpg"]) == ["d1/x.png", "d2/x.png", "x.jpg"]
    assert unique_names(["a/X.png", "a/x.jpg"]) == ["X.png", "x.jpg"]  # one file name on macOS and Windows
    with pytest.raises(ValueError, match="given 2 times"):
        unique_names(["a/x.png", "b/../a/x.png"])
    with pytest.raises(ValueError, match="differ only in letter case"):
        unique_names(["a/X.png", "a/x.png"])


def test_references_sharing_a_stem_keep_their_own_reconstruction_and_row(pipe, shared_stems, backbone_checkpoints,
                                                                         tmp_path):
    """Today both x.png and x.jpg are "x": one reconstructions/x.png, two score rows "x" pointing at it."""
    out = tmp_path / "bench"
    report = run_bench(references_from_folder(shared_stems), out, pipeline=pipe, config_name="clip",
                       checkpoints={"clip": backbone_checkpoints["clip"]}, batch_size=3, **STEPS)
    assert sorted(path.name for path in (out / "reconstructions").iterdir()) == ["cat.png", "x.jpg.png", "x.png.png"]
    rows = {row["image"]: row for row in report["per_image"]}
    assert set(rows) == {"cat", "x.png", "x.jpg"} and report["num_images"] == 3
    assert rows["x.jpg"]["reconstruction"].endswith("x.jpg.png") and rows["x.jpg"]["file"] == "x.jpg"
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert sorted(row["image"] for row in captions) == ["cat", "x.jpg", "x.png"]
    assert {row["source"] for row in captions} == {str(shared_stems / name) for name in ("cat.png", "x.png", "x.jpg")}


def test_score_only_pairs_references_sharing_a_stem_by_file_name(shared_stems, photos, backbone_checkpoints, tmp_path):
    recon = tmp_path / "other_model"
    recon.mkdir()
    photos[0].save(recon / "x.png")  # x.png's own, perfect
    photos[2].save(recon / "recon_x.jpg", quality=95)  # x.jpg's, a different photo
    photos[2].save(recon / "cat.png.png")  # named as our round trip names it
    out = tmp_path / "scored"
    main(["bench", "--images-dir", str(shared_stems), "--reconstructions", str(recon), "--output-dir", str(out),
          "--backbones", "clip", "--checkpoint", f"clip={backbone_checkpoints['clip']}"])
    rows = {row["image"]: row for row in json.loads((out / "scores.json").read_text())["per_image"]}
    assert {name: row["reconstruction"].rsplit("/", 1)[-1] for name, row in rows.items()} == {
        "x.png": "x.png", "x.jpg": "recon_x.jpg", "cat": "cat.png.png"}
    assert rows["x.png"]["clip"] == pytest.approx(1.0, abs=1e-5) and rows["x.jpg"]["clip"] < 0.999


def test_a_rerun_reuses_only_what_the_same_settings_made(pipe, shared_stems, backbone_checkpoints, tmp_path):
    counting = CountingPipeline(pipe)
    out = tmp_path / "bench"
    kwargs = dict(pipeline=counting, config_name="clip", checkpoints={"clip": backbone_checkpoints["clip"]},
                  batch_size=3, pipeline_settings={"pipeline": "tiny twins", "dtype": "float32"})
    first = run_bench(references_from_folder(shared_stems), out, **kwargs, **STEPS)
    assert counting.images == 3 and first["reused"] == 0

    again = run_bench(references_from_folder(shared_stems), out, **kwargs, **STEPS)
    assert counting.images == 3 and again["reused"] == 3  # nothing drawn again
    assert again["per_image"] == first["per_image"]

    with pytest.raises(ResumeError, match=r"num_inference_steps: 2 → 3; max_new_tokens: 6 → \(not set\)") as info:
        run_bench(references_from_folder(shared_stems), out, **kwargs, num_inference_steps=3, do_sample=False)
    assert info.value.reusable == 3 and counting.images == 3
    with pytest.raises(ResumeError, match="seed: 0 → 1"):
        run_bench(references_from_folder(shared_stems), out, **kwargs, **STEPS, seed=1)
    other = tmp_path / "other"
    other.mkdir()
    (shared_stems / "cat.png").rename(other / "cat.png")  # the same name in another folder is another image
    with pytest.raises(ResumeError, match="references: "):
        run_bench(references_from_folder(other), out, **kwargs, **STEPS)

    overwritten = run_bench(references_from_folder(shared_stems), out, **kwargs, **{**STEPS, "num_inference_steps": 3},
                            overwrite=True)
    assert counting.images == 5 and overwritten["reused"] == 0 and overwritten["num_images"] == 2
    assert not (out / "reconstructions" / "cat.png").exists()  # the earlier run's files are gone
    assert json.loads((out / "settings.json").read_text())["round_trip"]["num_inference_steps"] == 3


def test_a_folder_without_recorded_settings_is_not_resumed(pipe, shared_stems, backbone_checkpoints, tmp_path):
    out = tmp_path / "bench"
    (out / "reconstructions").mkdir(parents=True)  # as an earlier uae-hf left it: no settings.json
    (out / "captions.jsonl").write_text(json.dumps({"image": "cat", "caption": "a cat"}) + "\n")
    (out / "reconstructions" / "cat.png").write_bytes(b"")
    counting = CountingPipeline(pipe)
    with pytest.raises(ResumeError, match="did not record them"):
        run_bench(references_from_folder(shared_stems), out, pipeline=counting, config_name="clip",
                  checkpoints={"clip": backbone_checkpoints["clip"]}, **STEPS)
    assert counting.images == 0


def test_official_protocol_after_a_round_trip_scores_only_its_own_reconstructions(pipe, shared_stems,
                                                                                  backbone_checkpoints, photos,
                                                                                  tmp_path):
    """Today every file in reconstructions/ counts, a stale one from an earlier run too."""
    out = tmp_path / "bench"
    (out / "reconstructions").mkdir(parents=True)
    photos[0].save(out / "reconstructions" / "x.png")  # left by an earlier run that named x.png "x"
    report = run_bench(references_from_folder(shared_stems), out, pipeline=pipe, protocol="official",
                       checkpoints={name: backbone_checkpoints[name] for name in PAPER_BACKBONES}, batch_size=3,
                       **STEPS)
    for name in PAPER_BACKBONES:
        assert sorted(report["similarities_by_model"][name]) == ["cat.png", "x.jpg.png", "x.png.png"]
        assert report["statistics_by_model"][name]["total_images"] == 3
    assert report["skipped"] == [] and report["settings"]["scoring"]["protocol"] == "official"


def test_bench_command_records_its_settings_and_refuses_a_rerun_with_others(pipe, photos, backbone_checkpoints,
                                                                           tmp_path, capsys):
    pipe.save_pretrained(tmp_path / "pipeline")
    references = tmp_path / "references"
    references.mkdir()
    for name, photo in zip(("astronaut", "coffee"), photos):
        photo.save(references / f"{name}.png")
    out = tmp_path / "bench"
    command = ["bench", "--images-dir", str(references), "--pipeline", str(tmp_path / "pipeline"), "--output-dir",
               str(out), "--backbones", "clip", "--checkpoint", f"clip={backbone_checkpoints['clip']}",
               "--max-new-tokens", "6", "--seed", "3"]
    main([*command, "--num-inference-steps", "2"])
    settings = json.loads((out / "scores.json").read_text())["settings"]
    assert settings["references"] == f"folder {references.resolve()}"
    round_trip = settings["round_trip"]
    assert round_trip["pipeline"] == str((tmp_path / "pipeline").resolve()) and round_trip["revision"] is None
    assert len(round_trip["folder_fingerprint"]) == 16 and round_trip["encoder_adapter"] is None
    assert (round_trip["dtype"], round_trip["device"], round_trip["seed"]) == ("as stored", "cpu", 3)
    assert {key: round_trip[key] for key in ("num_inference_steps", "guidance_scale", "max_new_tokens", "temperature",
                                             "do_sample")} == {
        "num_inference_steps": 2, "guidance_scale": 5.0, "max_new_tokens": 6, "temperature": 0.7, "do_sample": True}
    assert "height" not in round_trip and "conditioning_mode" not in round_trip  # the pipeline's own
    assert settings["scoring"] == {"config_name": "clip", "checkpoints": {"clip": backbone_checkpoints["clip"]},
                                   "protocol": "default", "device": "cpu", "dtype": "float32", "batch_size": 4,
                                   "backbones": ["clip"]}
    assert settings["reconstructions_dir"] is None
    assert {"python", "uae-hf", "torch", "transformers", "diffusers"} <= set(settings["versions"])
    assert json.loads((out / "settings.json").read_text())["round_trip"] == round_trip
    capsys.readouterr()

    main([*command, "--num-inference-steps", "2"])
    assert "reused 2 reconstruction(s)" in capsys.readouterr().out

    with pytest.raises(SystemExit) as info:
        main([*command, "--num-inference-steps", "3", "--height", "32"])
    assert info.value.code == 2
    message = capsys.readouterr().err
    assert "holds 2 reconstruction(s) made with other settings: num_inference_steps: 2 → 3; height: (not set) → 32" \
        in message and "--overwrite" in message

    main([*command, "--num-inference-steps", "3", "--height", "32", "--overwrite"])
    report = json.loads((out / "scores.json").read_text())
    assert report["reused"] == 0 and report["settings"]["round_trip"]["height"] == 32
    assert "reused" not in capsys.readouterr().out
