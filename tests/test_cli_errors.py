"""Mistakes a user can act on end as one line, `uae-hf: <message>` with exit status 2, naming the way out."""

import json
import os
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest

from uae_hf.cli import main

from network_block import BLOCK_NETWORK


def fails(argv, capsys) -> str:
    """Run `uae-hf argv`; it must exit with status 2 and one `uae-hf: ` line on stderr, which is returned."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("uae-hf: ") and stderr.count("\n") == 1, stderr[-2000:]
    return stderr


@pytest.fixture()
def image(photos, tmp_path):
    path = tmp_path / "photo.png"
    photos[0].save(path)
    return path


def unloadable_pipeline(folder: Path) -> Path:
    """A folder that passes the CLI's checks as a UAE pipeline (its model_index.json says so) but holds no model: a
    command given it fails when the pipeline loads, so an error that names something else came first."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": ["pipeline", "UAEReconstructionPipeline"]}))
    return folder


# What an argument mistake may import: nothing that loads a model (torch alone takes seconds to import).
HEAVY_MODULES = ("torch", "transformers", "diffusers", "datasets", "evaluate", "trl", "peft", "gradio")

RUN_MISTAKES = BLOCK_NETWORK + """
import contextlib, io, json, sys
from uae_hf.cli import main
outcomes = {}
for name, argv in json.loads(sys.argv[1]).items():
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        try:
            main(argv)
            outcomes[name] = [0, stderr.getvalue()]
        except SystemExit as exit:
            outcomes[name] = [exit.code, stderr.getvalue()]
print(json.dumps({"outcomes": outcomes, "imported": [name for name in json.loads(sys.argv[2]) if name in sys.modules]}))
"""


def argument_mistakes(tiny_dir: Path, photo: PIL.Image.Image, folder: Path) -> dict[str, tuple[list[str], str]]:
    """Each argument mistake that needs no model: its `uae-hf` arguments, and what its one-line error says."""
    images, empty, unmatched = folder / "images", folder / "empty", folder / "unmatched"
    for path in (images, empty, unmatched):
        path.mkdir()
    photo.save(images / "photo.png")
    photo.save(unmatched / "other.png")
    image, sd3, encoder = str(images / "photo.png"), str(tiny_dir / "decoder"), str(tiny_dir / "encoder")
    pipeline = str(unloadable_pipeline(folder / "pipeline"))
    other = folder / "other-pipeline"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    out = ["--output-dir", str(folder / "out")]
    reconstruct = ["reconstruct", image, *out, "--pipeline"]
    bench = ["bench", "--images-dir", str(images), *out]
    recipe = folder / "recipe.yaml"
    recipe.write_text("per_device_eval_batch_size: -2\nuse_cpu: true\n")
    return {
        "missing image": (["reconstruct", str(images / "missing.png"), *out, "--pipeline", pipeline],
                          "missing.png: no such image file: nothing to reconstruct"),
        "folder as image": (["reconstruct", str(images), *out, "--pipeline", pipeline],
                            "is a folder: pass the image files in it"),
        "no model_index.json": ([*reconstruct, str(empty)], "not a pipeline folder (it has no model_index.json)"),
        "another diffusers pipeline": ([*reconstruct, str(other)], "is a StableDiffusionPipeline, not a UAE pipeline"),
        "plain SD3 without --encoder": ([*reconstruct, sd3], "is a plain StableDiffusion3Pipeline: it has no encoder to "
                                        "caption images. Pass --encoder"),
        "plain SD3 in embeddings mode": ([*reconstruct, sd3, "--encoder", encoder, "--conditioning-mode", "embeddings"],
                                         "--conditioning-mode embeddings needs a projector"),
        "--encoder with a UAE pipeline": ([*reconstruct, pipeline, "--encoder", encoder], "drop --encoder"),
        "missing --encoder": ([*reconstruct, sd3, "--encoder", str(folder / "no-vlm")], "no-vlm: no such folder"),
        "--encoder-adapter not an adapter": ([*reconstruct, pipeline, "--encoder-adapter", str(images)],
                                             "not a PEFT adapter folder (it has no adapter_config.json)"),
        "empty --images-dir": (["bench", "--images-dir", str(empty), *out, "--pipeline", pipeline],
                               "--images-dir: no images"),
        "unknown backbone": ([*bench, "--reconstructions", str(images), "--backbones", "clip+dino"],
                             "unknown backbone 'dino' (did you mean dinov2 or dinov3?)"),
        "checkpoint of an unscored backbone": (
            [*bench, "--reconstructions", str(images), "--backbones", "clip", "--checkpoint", "siglip=x/y"],
            "--checkpoint siglip=x/y: siglip is not scored (--backbones clip: clip)"),
        "missing checkpoint folder": ([*bench, "--reconstructions", str(images), "--checkpoint", "clip=/no/clip"],
                                      "--checkpoint clip=/no/clip: no such folder"),
        "no reconstruction matches": ([*bench, "--reconstructions", str(unmatched)],
                                      "its images (other.png) match none of the references (photo.png)"),
        "bench: no model_index.json": ([*bench, "--pipeline", str(empty)], "not a pipeline folder"),
        "bench: --batch-size -1": ([*bench, "--pipeline", pipeline, "--batch-size", "-1"],
                                   "argument --batch-size: -1 is not a positive integer"),
        "--output-dir a file": (["reconstruct", image, "--pipeline", pipeline, "--output-dir", image],
                                "--output-dir " + image + " is a file: pass a folder to write into"),
        "app: no model_index.json": (["app", "--pipeline", str(empty)], "not a pipeline folder"),
        "convert-release: missing release folder": (["convert-release", str(folder / "no-release"), str(folder / "x")],
                                                    "no-release: no such folder; pass the release's folder"),
        "tiny-models: a file as output folder": (["tiny-models", image], "is a file: pass a folder to write into"),
        "train: --max_steps 0": (["train", "--max_steps", "0"], "--max_steps 0 trains nothing"),
        "train: --per_device_train_batch_size 0": (["train", "--per_device_train_batch_size", "0"],
                                                   "--per_device_train_batch_size 0: pass a positive number"),
        "train: the recipe's per_device_eval_batch_size": (["train", "--config", str(recipe)],
                                                           "--per_device_eval_batch_size -2: pass a positive number"),
        "train: --gradient-accumulation-steps=0": (["train", "--gradient-accumulation-steps=0"],
                                                   "--gradient_accumulation_steps 0: pass a positive number"),
    }


def test_argument_mistakes_are_one_line_before_any_model_library_loads(tiny_dir, photos, tmp_path):
    """Today 8-43 s each (on a 2-core machine), as torch, diffusers and evaluate load first; a plain SD3 folder ends
    in a traceback after loading, `--max_steps 0` trains a step, a negative batch size says `maxlen must be
    non-negative`. All run in one fresh interpreter, which must not have imported a model library at the end."""
    mistakes = argument_mistakes(tiny_dir, photos[0], tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", RUN_MISTAKES, json.dumps({name: argv for name, (argv, _) in mistakes.items()}),
         json.dumps(HEAVY_MODULES)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    for name, (_, expected) in mistakes.items():
        status, stderr = report["outcomes"][name]
        assert status == 2 and stderr.startswith("uae-hf: ") and stderr.count("\n") == 1, (name, stderr)
        assert expected in stderr, (name, stderr)
    assert report["imported"] == []


def test_the_cli_knows_every_registered_backbone():
    """The CLI checks backbone names from its own list, without the registry's module (torch, transformers)."""
    from uae_hf import BACKBONES, PAPER_BACKBONES
    from uae_hf.cli import BACKBONE_NAMES, DEFAULT_BACKBONES

    assert sorted(BACKBONE_NAMES) == sorted(BACKBONES) and sorted(DEFAULT_BACKBONES) == sorted(PAPER_BACKBONES)


def test_a_missing_pipeline_is_one_line_without_a_traceback(image, tmp_path):
    """Today: a 60-line traceback ending in huggingface_hub's offline error."""
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_NETWORK + "from uae_hf.cli import main; main()", "reconstruct", str(image),
         "--pipeline", "no-such-pipe", "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2
    assert result.stderr.startswith("uae-hf: --pipeline no-such-pipe: no such folder") and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def test_pipeline_folder_mistakes(image, tmp_path, capsys):
    """Today: `Repo id must be in the form 'repo_name'` for a folder that does not exist."""
    common = ["reconstruct", str(image), "--output-dir", str(tmp_path / "out"), "--pipeline"]
    assert "no such folder" in fails([*common, str(tmp_path / "nope" / "pipeline")], capsys)
    (tmp_path / "empty").mkdir()
    assert "not a pipeline folder (it has no model_index.json)" in fails([*common, str(tmp_path / "empty")], capsys)
    assert "is a file, not a pipeline folder" in fails([*common, str(image)], capsys)


def test_an_unavailable_backbone_names_itself_and_the_local_copy_flag(image, tmp_path, capsys):
    """Today: `OSError: We couldn't connect to 'https://huggingface.co'`, with a traceback."""
    (tmp_path / "recon").mkdir()
    PIL.Image.open(image).save(tmp_path / "recon" / "photo.png")
    stderr = fails(["bench", "--images-dir", str(image.parent), "--reconstructions", str(tmp_path / "recon"),
                    "--output-dir", str(tmp_path / "out"), "--backbones", "clip",
                    "--checkpoint", "clip=nobody/no-such-clip"], capsys)
    assert "cannot load the clip backbone (nobody/no-such-clip)" in stderr
    assert "HF_HUB_OFFLINE=1" in stderr and "--checkpoint clip=PATH" in stderr
    assert "couldn't connect" not in stderr


def test_an_unavailable_backbone_in_python_says_how_to_pass_a_folder():
    from uae_hf import ImageEmbedder
    from uae_hf.rewards.similarity import BackboneUnavailableError

    with pytest.raises(BackboneUnavailableError, match=r"'dinov2' backbone from 'nobody/dino'.*checkpoints=") as info:
        ImageEmbedder("dinov2", "nobody/dino")
    assert isinstance(info.value, OSError) and info.value.backbone == "dinov2"
    with pytest.raises(BackboneUnavailableError, match="no such folder"):
        ImageEmbedder("clip", "/no/such/folder/clip")


def test_an_uncached_backbone_with_the_hub_out_of_reach_fails_at_once(monkeypatch):
    """Today (online mode, no network): huggingface_hub retries for about 25 s, then says it could not connect."""
    from huggingface_hub import constants

    from uae_hf import ImageEmbedder
    from uae_hf.rewards.similarity import BackboneUnavailableError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online mode; the network block resolves no name
    with pytest.raises(BackboneUnavailableError, match="huggingface.co does not resolve.*not in the local Hugging "
                       "Face cache.*checkpoints=") as info:
        ImageEmbedder("clip", "nobody/no-such-clip")
    assert info.value.backbone == "clip"


def test_bench_argument_mistakes(image, tmp_path, capsys):
    out = ["--output-dir", str(tmp_path / "out")]
    # today: "reference folder ... does not exist"
    assert "--images-dir" in (stderr := fails(["bench", "--images-dir", str(image), "--pipeline", "p", *out], capsys))
    assert "is a file, not a folder" in stderr
    # today: "pass --pipeline (round trip) or --reconstructions (score only), not both", for neither
    assert "neither --pipeline" in fails(["bench", "--images-dir", str(tmp_path), *out], capsys)
    assert "both --pipeline and --reconstructions" in fails(
        ["bench", "--images-dir", str(tmp_path), "--pipeline", "p", "--reconstructions", "r", *out], capsys)
    assert "--reconstructions r does not exist" in fails(
        ["bench", "--images-dir", str(tmp_path), "--reconstructions", "r", *out], capsys)
    assert "invalid choice: 'offical'" in fails(
        ["bench", "--images-dir", str(tmp_path), "--reconstructions", "r", "--protocol", "offical", *out], capsys)


def test_reconstruct_refuses_the_same_image_twice(image, tmp_path, capsys):
    """Today: "wrote 2 reconstructions", and one file."""
    assert "is given 2 times" in fails(["reconstruct", str(image), str(image), "--pipeline", "unused",
                                        "--output-dir", str(tmp_path / "out")], capsys)


def test_a_misspelt_stage_names_the_stages_without_a_usage_dump(capsys):
    """Today: argparse's 240-line usage of every training option, then the error."""
    stderr = fails(["train", "--stage", "understandin"], capsys)
    assert "invalid choice: 'understandin'" in stderr
    assert all(stage in stderr for stage in ("understanding", "generation", "pretrain", "cold_start"))


def test_recipe_typos_list_the_unknown_keys_with_the_closest_names(tmp_path, capsys):
    """Today: a traceback about bf16 on CPU, or `Unknown arguments from config file` after every check ran."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("stagee: understanding\nlearning_rat: 1.0e-5\nnum_generations: 4\n")
    stderr = fails(["train", "--config", str(recipe)], capsys)
    assert "unknown key(s) in the --config recipe" in stderr
    assert "stagee (did you mean stage" in stderr and "learning_rat (did you mean learning_rate?)" in stderr
    assert "num_generations" not in stderr
    assert "--rewrd_backbones (did you mean --reward_backbones" in fails(
        ["train", "--rewrd_backbones", "clip"], capsys)
    assert "cannot read the --config recipe" in fails(["train", "--config", str(tmp_path / "missing.yaml")], capsys)


def test_train_names_an_unavailable_backbone_and_the_recipe_key(monkeypatch, capsys):
    from uae_hf.rewards.similarity import BackboneUnavailableError
    from uae_hf.trainer import train_script

    def train(*args):
        raise BackboneUnavailableError("clip", "openai/clip-vit-large-patch14", OSError("offline"))

    monkeypatch.setattr(train_script, "train", train)
    stderr = fails(["train", "--use_cpu", "true", "--bf16", "false"], capsys)
    assert "cannot load the clip backbone (openai/clip-vit-large-patch14)" in stderr
    assert "backbone_checkpoints: {clip: PATH}" in stderr


def test_verbose_shows_the_traceback_of_the_cause(image, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--images-dir", str(image.parent), "--reconstructions", str(tmp_path), "--output-dir",
              str(tmp_path / "out"), "--backbones", "clip", "--checkpoint", "clip=nobody/no-such-clip", "--verbose"])
    stderr = capsys.readouterr().err
    assert "Traceback" in stderr and stderr.rstrip().splitlines()[-1].startswith("uae-hf: cannot load the clip")


@pytest.mark.parametrize("device, expected", [("cuda", "no usable CUDA GPU"), ("gpu0", "'gpu0' is not a device")])
def test_an_unavailable_or_malformed_device_is_refused_before_any_model_loads(device, expected, image, tmp_path, capsys):
    """Today: `--device cuda` loads the pipeline for 40 s, then a 40-line traceback (`Found no NVIDIA driver`)."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    stderr = fails(["reconstruct", str(image), "--pipeline", "unused", "--output-dir", str(tmp_path / "out"),
                    "--device", device], capsys)  # "unused" is no pipeline: an error after loading would name it
    assert "argument --device" in stderr and expected in stderr and "unused" not in stderr


@pytest.mark.parametrize("flag", ["--batch-size", "--num-inference-steps", "--max-new-tokens", "--height"])
def test_numeric_arguments_below_one_are_refused(flag, image, tmp_path, capsys):
    """Today: `--batch-size 0` is `range() arg 3 must not be zero`; `--num-inference-steps 0` writes an image."""
    stderr = fails(["reconstruct", str(image), "--pipeline", "unused", "--output-dir", str(tmp_path / "out"), flag,
                    "0"], capsys)
    assert f"argument {flag}" in stderr and "0 is not a positive integer" in stderr


def test_no_abbreviated_options_and_a_typo_names_the_closest_option(image, tmp_path, capsys):
    """Today: `--output-di` is taken for `--output-dir`, and `uae-hf train --learning-rat 1` trains at rate 1."""
    stderr = fails(["reconstruct", str(image), "--pipeline", "p", "--output-di", str(tmp_path / "out")], capsys)
    assert "--output-dir" in stderr  # required and not given: the prefix did not stand in for it
    stderr = fails(["reconstruct", str(image), "--pipeline", "p", "--output-dir", str(tmp_path), "--num-inference-step",
                    "4"], capsys)
    assert "--num-inference-step (did you mean --num-inference-steps?)" in stderr
    stderr = fails(["train", "--learning_rat", "1"], capsys)
    assert "--learning_rat (did you mean --learning_rate" in stderr
    stderr = fails(["train", "--config", "examples/recipes/pretrain_tiny.yaml", "--learning-rat", "1"], capsys)
    assert "--learning-rat" in stderr and "did you mean --learning_rate" in stderr


def test_train_on_a_cpu_without_a_recipe_or_with_a_gpu_recipe_says_what_to_pass(capsys):
    """Today: transformers' `Your setup doesn't support bf16/gpu. You need to assign use_cpu...`."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    stderr = fails(["train"], capsys)
    assert "no --config recipe" in stderr and "understanding_tiny.yaml" in stderr
    stderr = fails(["train", "--config", "examples/recipes/generation_sd3.5.yaml"], capsys)
    assert "this recipe trains in bf16 on a GPU" in stderr and "--use_cpu true --bf16 false" in stderr


def test_pushing_without_the_hub_or_a_token_is_refused_before_training(monkeypatch, tmp_path, capsys):
    """Today: an 83-line `ConnectError` traceback once the Trainer tries to create the repo."""
    from huggingface_hub import constants

    from uae_hf.trainer import train_script

    monkeypatch.setattr(train_script, "train", lambda *args: pytest.fail("trained"))
    flags = ["train", "--use_cpu", "true", "--bf16", "false", "--push_to_hub", "true", "--output_dir", str(tmp_path)]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE is set" in fails(flags, capsys)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online, but no name resolves (the network block)
    assert "huggingface.co does not resolve" in fails(flags, capsys)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # behind a proxy the name is the proxy's to resolve
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert "no Hugging Face token is set" in fails(flags, capsys)
