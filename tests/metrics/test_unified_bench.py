import subprocess
import sys
import warnings
from pathlib import Path

import evaluate
import numpy as np
import PIL.Image
import pytest
import torch
from network_block import BLOCK_NETWORK

import uae_hf
from uae_hf.metrics import METRICS_DIR


@pytest.fixture(scope="module")
def bench(backbone_checkpoints):
    checkpoints = {name: backbone_checkpoints[name] for name in uae_hf.PAPER_BACKBONES}
    return evaluate.load("unified_bench", checkpoints=checkpoints)


def test_results_follow_the_paper_protocol(bench, photos):
    results = bench.compute(predictions=photos, references=photos[::-1], return_per_image=True)
    backbones = ["clip", "dinov2", "dinov3", "longclip"]
    assert list(results) == [*backbones, "overall", "unified_bench", "per_image"]
    assert results["overall"] == pytest.approx(np.mean([results[name] for name in backbones]))
    assert results["unified_bench"] == pytest.approx(100 * results["overall"])
    assert len(results["per_image"]) == len(photos)
    assert results["per_image"][1]["clip"] == pytest.approx(1.0, abs=1e-5)  # the middle photo is its own reverse
    for name in backbones:
        assert results[name] == pytest.approx(np.mean([row[name] for row in results["per_image"]]))


def test_official_protocol_is_a_load_time_option(bench, backbone_checkpoints, photos):
    """Same results layout; on square photos the protocols agree within 1e-4 on the twins (see
    tests/rewards/test_similarity.py for the measured differences)."""
    checkpoints = {name: backbone_checkpoints[name] for name in uae_hf.PAPER_BACKBONES}
    official = evaluate.load("unified_bench", checkpoints=checkpoints, protocol="official")
    assert official.similarity.protocol == "official"
    results = official.compute(predictions=photos, references=photos[::-1], return_per_image=True)
    default = bench.compute(predictions=photos, references=photos[::-1])
    assert list(results) == ["clip", "longclip", "dinov2", "dinov3", "overall", "unified_bench", "per_image"]
    for name in [*uae_hf.PAPER_BACKBONES, "overall"]:
        assert results[name] == pytest.approx(default[name], abs=1e-4), name
    assert results["unified_bench"] == pytest.approx(100 * results["overall"])
    with pytest.raises(ValueError, match="choose from"):
        evaluate.load("unified_bench", "clip", checkpoints={"clip": backbone_checkpoints["clip"]}, protocol="paper")


def test_official_protocol_reads_files_as_score_i2i(bench, backbone_checkpoints, photos, tmp_path):
    """Score_i2i.py reads each file with `Image.open(path).convert("RGB")`, which drops alpha and clips 16-bit values
    at 255, and its processors (transformers 4.56) ignore a PNG colour key that `convert("RGB")` keeps (transformers
    5's paint it white); the default protocol composites on white and maps by range (0.016 to 0.53 lower per pair
    here). The official means are Score_i2i.py's: Python floats summed pair by pair, backbones in its order."""
    transparent = photos[0].convert("RGBA")
    transparent.putalpha(PIL.Image.linear_gradient("L").resize(photos[0].size))
    palette = photos[2].quantize(16)
    images = {"rgba.png": transparent, "la.png": transparent.convert("LA"),
              "deep.png": PIL.Image.fromarray(np.asarray(photos[1].convert("L")).astype(np.uint16) * 257),
              "keyed.png": palette}
    for name, image in images.items():
        image.save(tmp_path / name, transparency=_commonest(palette) if name == "keyed.png" else None)
    paths = [str(tmp_path / name) for name in images]
    assert "transparency" in PIL.Image.open(paths[-1]).info
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's advice to convert a keyed palette to RGBA
        as_released = [PIL.Image.fromarray(np.asarray(PIL.Image.open(path).convert("RGB"))) for path in paths]
    checkpoints = {name: backbone_checkpoints[name] for name in uae_hf.PAPER_BACKBONES}
    official = evaluate.load("unified_bench", checkpoints=checkpoints, protocol="official")
    results = official.compute(predictions=paths, references=as_released, return_per_image=True)
    assert list(results)[:4] == ["clip", "longclip", "dinov2", "dinov3"]
    for row in results["per_image"]:
        assert row == pytest.approx(dict.fromkeys(row, 1.0), abs=1e-5)
    for name, values in results.items():
        if name in checkpoints:
            assert values == sum(row[name] for row in results["per_image"]) / 4  # exactly, not to float32 rounding
    assert results["unified_bench"] == 100 * sum(results[name] for name in ("clip", "longclip", "dinov2", "dinov3")) / 4
    default = bench.compute(predictions=paths, references=as_released)
    assert all(default[name] < 0.99 for name in checkpoints)


def _commonest(image: PIL.Image.Image) -> int:
    """The commonest value of a one-band image: as a colour key, it makes many pixels transparent."""
    return int(np.bincount(np.asarray(image).ravel()).argmax())


def test_an_image_with_a_colour_key_scores_1_against_itself_as_one_without(bench, photos, tmp_path):
    """Default rules: a PNG colour key is transparency (composited on white), so the keyed file is another image than
    its unkeyed twin, and each scores 1.0 against itself. Before, the key survived `to_rgb` for a grey image: the
    reference cache (keyed by pixels) served the unkeyed twin's embedding, while transformers 5 painted the keyed
    prediction's key white."""
    grey = photos[0].convert("L")  # its commonest level, black, covers 11% of it
    grey.save(plain := tmp_path / "plain.png")
    grey.save(keyed := tmp_path / "keyed.png", transparency=_commonest(grey))
    assert "transparency" in PIL.Image.open(keyed).info
    results = bench.compute(predictions=[str(plain), str(keyed), str(keyed)],
                            references=[str(plain), str(keyed), str(plain)], return_per_image=True)
    plain_row, keyed_row, across = results["per_image"]
    assert plain_row == pytest.approx(dict.fromkeys(plain_row, 1.0), abs=1e-5)
    assert keyed_row == pytest.approx(dict.fromkeys(keyed_row, 1.0), abs=1e-5)
    assert all(value < 0.999 for value in across.values())  # the key's pixels are white, not grey


def test_paths_arrays_and_tensors_are_accepted(bench, photos, tmp_path):
    path = tmp_path / "photo.png"
    photos[0].save(path)
    array = np.array(photos[0])
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    results = bench.compute(predictions=[str(path), array, tensor], references=[photos[0]] * 3)
    assert results["unified_bench"] == pytest.approx(100.0, abs=1e-3)


def test_config_name_picks_backbones(backbone_checkpoints, photos):
    two = evaluate.load("unified_bench", "clip+siglip", checkpoints={k: backbone_checkpoints[k] for k in ("clip", "siglip")})
    results = two.compute(predictions=photos[:2], references=photos[1:3])
    assert set(results) == {"clip", "siglip", "overall", "unified_bench"}
    with pytest.raises(ValueError, match="choose from"):
        evaluate.load("unified_bench", "clip+nope")


def test_bad_inputs_get_clear_errors(bench, photos, tmp_path):
    with pytest.raises(ValueError, match="one reconstruction per reference"):
        bench.compute(predictions=photos[:2], references=photos[:1])
    with pytest.raises(ValueError, match="empty"):
        bench.compute(predictions=[], references=[])
    truncated = tmp_path / "truncated.jpg"
    photos[0].save(tmp_path / "full.jpg")
    truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.jpg"):
        bench.compute(predictions=[str(truncated)], references=[photos[0]])


FRESH_PROCESS = BLOCK_NETWORK + """
import sys
import numpy as np
import PIL.Image
mode, clip = sys.argv[1], sys.argv[2]
image = PIL.Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3))
import evaluate
if mode == "bare-name":
    import uae_hf
    path = "unified_bench"
else:
    path = mode
bench = evaluate.load(path, "clip", checkpoints={"clip": clip})
print("RESULT", type(bench).__name__, bench.compute(predictions=[image], references=[image])["unified_bench"])
"""


@pytest.mark.parametrize("how", ["bare-name", "path"])
def test_loads_offline_from_an_empty_directory(how, backbone_checkpoints, tmp_path):
    mode = "bare-name" if how == "bare-name" else uae_hf.metric_path("unified_bench")
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, mode, backbone_checkpoints["clip"]],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    _, name, score = line.split()
    assert name == "UnifiedBench" and float(score) == pytest.approx(100.0, abs=1e-3)  # a number, not its printed text


def test_a_local_unified_bench_folder_takes_precedence(tmp_path, monkeypatch):
    local = tmp_path / "unified_bench"
    local.mkdir()
    (local / "unified_bench.py").write_text(
        "import datasets\n"
        "import evaluate\n"
        "class LocalBench(evaluate.Metric):\n"
        "    def _info(self):\n"
        "        return evaluate.MetricInfo(description='', citation='', inputs_description='',\n"
        "            features=datasets.Features({'predictions': datasets.Value('int32'),\n"
        "                                        'references': datasets.Value('int32')}))\n"
        "    def _compute(self, predictions, references):\n"
        "        return {'local': 1}\n"
    )
    monkeypatch.chdir(tmp_path)
    assert evaluate.load("unified_bench").compute(predictions=[1], references=[1]) == {"local": 1}


def test_folder_is_ready_for_an_evaluate_space():
    folder = Path(uae_hf.metric_path("unified_bench"))
    assert folder == METRICS_DIR / "unified_bench"
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "app_file: app.py" in card
    assert "| UAE | 86.09 |" in card and "Values from Popular Papers" in card
    assert "evaluate.load" in (folder / "app.py").read_text()
    assert "uae-hf" in (folder / "requirements.txt").read_text()
    with pytest.raises(ValueError, match="available"):
        uae_hf.metric_path("bleu")
