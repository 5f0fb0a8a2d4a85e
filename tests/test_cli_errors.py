"""Mistakes a user can act on end as one line, `uae-hf: <message>` with exit status 2, naming the way out."""

import os
import subprocess
import sys

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
