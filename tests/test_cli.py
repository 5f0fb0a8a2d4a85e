import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import yaml

from uae_hf.cli import main

from network_block import BLOCK_NETWORK
from test_cli_errors import unloadable_pipeline


def test_tiny_models_command(tmp_path, capsys):
    main(["tiny-models", str(tmp_path / "twins"), "--no-t5"])
    assert (tmp_path / "twins" / "decoder" / "model_index.json").exists()
    assert not (tmp_path / "twins" / "decoder" / "text_encoder_3").exists()
    assert "tiny twins written" in capsys.readouterr().out


def test_reconstruct_writes_images_captions_and_grid(pipe, photos, tmp_path):
    pipe.save_pretrained(tmp_path / "pipeline")
    paths = []
    for index, photo in enumerate(photos):
        paths.append(tmp_path / f"photo{index}.png")
        photo.save(paths[-1])
    out = tmp_path / "out"
    main(["reconstruct", *map(str, paths), "--pipeline", str(tmp_path / "pipeline"), "--output-dir", str(out),
          "--num-inference-steps", "2", "--max-new-tokens", "6", "--batch-size", "2"])
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [row["image"] for row in rows] == list(map(str, paths))
    for row in rows:
        assert PIL.Image.open(row["reconstruction"]).size == (64, 64)
    grid = PIL.Image.open(out / "grid.png")
    assert grid.width == 512 and grid.height > 3 * 256
    # --seed fixes the sampled captions too, whatever the global RNG: the same run again gives the same file
    torch.manual_seed(99)
    main(["reconstruct", *map(str, paths), "--pipeline", str(tmp_path / "pipeline"), "--output-dir", str(tmp_path / "again"),
          "--num-inference-steps", "2", "--max-new-tokens", "6", "--batch-size", "2"])
    again = [json.loads(line) for line in (tmp_path / "again" / "captions.jsonl").read_text().splitlines()]
    assert [row["caption"] for row in again] == [row["caption"] for row in rows]


def test_reconstruct_with_a_plain_sd3_pipeline_captions_with_the_encoder_in_text_mode(tiny_dir, photos, tmp_path):
    """Today: `StableDiffusion3Pipeline.__call__() got an unexpected keyword argument 'image'`, after loading."""
    photos[0].save(tmp_path / "photo.png")
    out = tmp_path / "out"
    main(["reconstruct", str(tmp_path / "photo.png"), "--pipeline", str(tiny_dir / "decoder"), "--encoder",
          str(tiny_dir / "encoder"), "--output-dir", str(out), "--num-inference-steps", "2", "--max-new-tokens", "6"])
    [row] = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert row["image"] == str(tmp_path / "photo.png") and PIL.Image.open(row["reconstruction"]).size == (64, 64)


@pytest.mark.parametrize("family", ["flux1", "qwen_image"])
def test_bench_round_trips_with_a_vlm_and_a_decoder_of_another_family(family, tiny_dir, photos, backbone_checkpoints,
                                                                      tmp_path):
    """`--pipeline` of a supported family + `--encoder`: the paired round trip, as `PairedRoundTrip` gives it in
    Python for image 0's seed, with the family's own guidance default."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from uae_hf import PairedRoundTrip, load_saved_pipeline

    references = tmp_path / "references"
    references.mkdir()
    photos[0].save(references / "photo.png")
    decoder = tiny_dir / "decoders" / family
    main(["bench", "--images-dir", str(references), "--pipeline", str(decoder), "--encoder", str(tiny_dir / "encoder"),
          "--output-dir", str(tmp_path / "out"), "--backbones", "clip", "--checkpoint",
          f"clip={backbone_checkpoints['clip']}", "--num-inference-steps", "2", "--max-new-tokens", "6", "--height",
          "32", "--width", "32"])
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    [row] = scores["per_image"]
    pair = PairedRoundTrip(AutoModelForImageTextToText.from_pretrained(tiny_dir / "encoder"),
                           AutoProcessor.from_pretrained(tiny_dir / "encoder"), load_saved_pipeline(decoder))
    expected = pair(image=[photos[0]], generator=[torch.Generator().manual_seed(0)], num_inference_steps=2,
                    max_new_tokens=6, height=32, width=32)
    assert row["caption"] == expected.captions[0]
    saved = np.asarray(PIL.Image.open(next((tmp_path / "out").rglob("photo*.png"))).convert("RGB"), dtype=int)
    assert np.abs(saved - np.asarray(expected.images[0], dtype=int)).max() <= 1
    assert scores["settings"]["round_trip"]["guidance_scale"] == pair.decoder_family.default_guidance_scale


def test_bench_names_reconstructions_that_match_no_reference(photos, backbone_checkpoints, tmp_path, capsys):
    """Today: a reconstruction named unlike every reference is left out without a word, exit status 0."""
    references, reconstructions = tmp_path / "references", tmp_path / "reconstructions"
    references.mkdir()
    reconstructions.mkdir()
    for name in ("photo.png", "zebra.png"):
        photos[0].save(references / name)
    for name, photo in (("recon_photo.png", photos[0]), ("photo-2.png", photos[1]), ("zebra.png", photos[2])):
        photo.save(reconstructions / name)
    main(["bench", "--images-dir", str(references), "--reconstructions", str(reconstructions), "--output-dir",
          str(tmp_path / "out"), "--backbones", "clip", "--checkpoint", f"clip={backbone_checkpoints['clip']}",
          "--limit", "1"])
    # zebra.png is zebra's, a reference beyond --limit: left out, but not named as matching nothing
    assert "uae-hf: 1 reconstruction(s) match no reference in --images-dir, not scored: photo-2.png\n" in \
        capsys.readouterr().err
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert [row["image"] for row in scores["per_image"]] == ["photo"]
    assert [item["image"] for item in scores["skipped"]] == ["photo-2.png", "zebra.png"]


def test_peft_notices_about_the_demo_adapters_are_quiet_unless_verbose(tmp_path):
    """Today `uae-hf demo` prints PEFT's `Could not find a config file in ../../models/encoder` (an adapter whose base
    is a relative path, saved offline) and `Model has tie_word_embeddings=True and a tied layer is part of the adapter`
    (an adapter with its own embeddings): real PEFT calls here, inside the CLI's quiet context."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from uae_hf.cli import _quiet_libraries

    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, tie_word_embeddings=True)

    def notices(verbose: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _quiet_libraries(verbose):
                model = get_peft_model(LlamaForCausalLM(config),
                                       LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
                model.peft_config["default"].base_model_name_or_path = "../../models/encoder"
                model.save_pretrained(tmp_path / f"adapter-{verbose}")
        return [str(warning.message) for warning in caught
                if str(warning.message).startswith(("Model has `tie_word_embeddings=True`", "Could not find a config"))]

    assert notices(verbose=False) == []
    assert len(notices(verbose=True)) == 2


def test_reconstruct_skips_and_names_unreadable_files_before_loading_the_pipeline(pipe, photos, tmp_path, capsys):
    """Today: the first bad file stops the run (bench skips and reports it)."""
    bad, missing, good = tmp_path / "broken.png", tmp_path / "missing.png", tmp_path / "good.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    photos[0].save(good)
    with pytest.raises(SystemExit, match=r"broken\.png.*\(and 1 more unreadable image\(s\)\): nothing to"):
        main(["reconstruct", str(bad), str(missing), "--pipeline", str(unloadable_pipeline(tmp_path / "unloadable")),
              "--output-dir", str(tmp_path / "out")])
    assert capsys.readouterr().err.count("\n") == 1  # one line (that pipeline fails to load: nothing loaded it)
    pipe.save_pretrained(tmp_path / "pipeline")
    main(["reconstruct", str(bad), str(good), "--pipeline", str(tmp_path / "pipeline"), "--output-dir",
          str(tmp_path / "out"), "--num-inference-steps", "2", "--max-new-tokens", "60", "--temperature", "1"])
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "broken.png" in captured.err
    assert "wrote 1 reconstructions" in captured.out and "skipped 1 unreadable image(s)" in captured.out
    rows = [json.loads(line) for line in (tmp_path / "out" / "captions.jsonl").read_text().splitlines()]
    assert [row["image"] for row in rows] == [str(good)]
    printed = next(line for line in captured.out.splitlines() if line.startswith(str(good)))
    assert len(printed) <= len(str(good)) + 160  # long captions are shortened in the console, whole in the file


def assert_log_history_saved(out: Path, steps: int) -> None:
    """A run leaves its trainer state, log history included, as TRL's example scripts do."""
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    assert any("train_loss" in record for record in state["log_history"])  # the run's summary record


def tensorboard_events(output_dir: Path):
    """Everything the run's TensorBoard event files hold (the Trainer writes them under output_dir)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(output_dir.rglob("events.out.tfevents.*"))
    assert len(files) == 1, files
    events = EventAccumulator(str(files[0]), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


@pytest.mark.slow
def test_train_runs_the_tiny_recipe_with_no_other_argument(tmp_path):
    recipe = Path(__file__).parents[1] / "examples" / "recipes" / "understanding_tiny.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "uae_hf.cli", "train", "--config", str(recipe), "--max_steps", "3",
         "--log_reconstructions_steps", "1", "--logging_steps", "1", "--report_to", "tensorboard"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "outputs" / "understanding-tiny"
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md", "reconstructions/step-000001.png"):
        assert (out / name).exists(), name
    assert_log_history_saved(out, steps=3)
    # TensorBoard: the grids beside the Trainer's curves (reward, caption length), step by step
    events = tensorboard_events(out)
    assert events.Images("train/reconstructions")[0].width == PIL.Image.open(out / "reconstructions" / "step-000001.png").width
    assert [event.step for event in events.Images("train/reconstructions")] == [1, 2, 3]
    for curve in ("train/reward", "train/completions/mean_length"):
        assert [event.step for event in events.Scalars(curve)] == [1, 2, 3], curve
    assert (tmp_path / "outputs" / "tiny-models" / "decoder" / "model_index.json").exists()  # built on demand


@pytest.mark.slow
def test_train_runs_the_tiny_generation_recipe_and_logs_grids_to_both_trackers(tmp_path):
    """The tiny recipe with two trackers (a list, as a recipe gives it: the command line takes one)."""
    shipped = Path(__file__).parents[1] / "examples" / "recipes" / "generation_tiny.yaml"
    recipe = tmp_path / "generation_tiny.yaml"
    recipe.write_text(yaml.safe_dump(yaml.safe_load(shipped.read_text()) | {"report_to": ["tensorboard", "trackio"]}))
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_NETWORK + "from uae_hf.cli import main; main()", "train", "--config", str(recipe),
         "--max_steps", "2", "--log_reconstructions_steps", "1", "--project", "uae-tiny"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, env={**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "outputs" / "generation-tiny"
    assert (out / "pytorch_lora_weights.safetensors").exists() and "flow-grpo" in (out / "README.md").read_text()
    assert_log_history_saved(out, steps=2)
    # trackio, local and offline: the run's grids among its media, beside its metrics database
    assert len(list((tmp_path / "trackio" / "media" / "uae-tiny").rglob("*.png"))) == 2
    assert (tmp_path / "trackio" / "uae-tiny.db").is_file()
    events = tensorboard_events(out)  # a diffusers model: its config as the TensorBoard callback records a model's
    assert [event.step for event in events.Images("train/reconstructions")] == [1, 2]
    config = json.loads(events.Tensors("model_config/text_summary")[0].tensor_proto.string_val[0])
    assert config["_class_name"] == "SD3Transformer2DModel"


@pytest.mark.slow
@pytest.mark.parametrize("recipe, saved", [("pretrain_tiny.yaml", "projector/config.json"),
                                           ("generation_nft_tiny.yaml", "pytorch_lora_weights.safetensors"),
                                           ("cold_start_tiny.yaml", "encoder_adapter/adapter_config.json")])
def test_train_runs_the_pretrain_cold_start_and_diffusion_nft_recipes(recipe, saved, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's relative output folder
    main(["train", "--config", str(Path(__file__).parents[1] / "examples" / "recipes" / recipe), "--max_steps", "2",
          "--tiny_models_dir", str(tiny_dir)])
    out = next((tmp_path / "outputs").glob("*-tiny"))
    assert (out / saved).exists() and (out / "README.md").exists()
    assert_log_history_saved(out, steps=2)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux1", "qwen_image"])
def test_train_runs_stage_two_with_another_family_s_decoder_as_the_reward(family, tiny_dir, tmp_path):
    """The tiny stage-2 recipe of each family, as shipped (the session's twins, our output folder): the encoder's
    LoRA trains on that decoder's reconstruction reward and loads back with PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    recipe = Path(__file__).parents[1] / "examples" / "recipes" / f"understanding_{family}_tiny.yaml"
    out = tmp_path / "out"
    main(["train", "--config", str(recipe), "--tiny_models_dir", str(tiny_dir), "--output_dir", str(out)])
    assert_log_history_saved(out, steps=4)
    rewards = [record["rewards/reconstruction/mean"] for record in json.loads((out / "trainer_state.json").read_text())[
        "log_history"] if "rewards/reconstruction/mean" in record]
    assert len(rewards) == 4 and all(0 < reward <= 1 for reward in rewards)
    assert (out / "reconstructions" / "step-000001.png").exists()
    encoder = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_dir / "encoder"), out)
    assert any("lora_" in name for name, _ in encoder.named_parameters())


@pytest.mark.slow
def test_train_resumes_from_the_last_checkpoint(tiny_dir, tmp_path, monkeypatch, capsys):
    recipe = Path(__file__).parents[1] / "examples" / "recipes" / "cold_start_tiny.yaml"
    monkeypatch.chdir(tmp_path)

    def train(*flags) -> str:
        main(["train", "--config", str(recipe), "--tiny_models_dir", str(tiny_dir), "--logging_steps", "1",
              "--save_strategy", "steps", "--save_steps", "1", *flags])
        return capsys.readouterr().out

    train("--max_steps", "2")
    resumed = train("--max_steps", "3", "--resume_from_checkpoint", "true")
    out = tmp_path / "outputs" / "cold-start-tiny"
    assert [path.name for path in sorted(out.glob("*checkpoint-*"))] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert resumed.count("'loss'") == 1  # only step 3 ran


@pytest.mark.parametrize("recipe, config_name", [("generation_sd3.5.yaml", "FlowGRPOConfig"),
                                                 ("generation_flux1-dev.yaml", "FlowGRPOConfig"),
                                                 ("generation_qwen_image.yaml", "FlowGRPOConfig"),
                                                 ("generation_flux2_klein-base-4b.yaml", "FlowGRPOConfig"),
                                                 ("generation_nft_sd3.5.yaml", "DiffusionNFTConfig"),
                                                 ("pretrain_sd3.5.yaml", "DecoderPretrainingConfig"),
                                                 ("cold_start_sd3.5.yaml", "ColdStartConfig"),
                                                 ("understanding_qwen3-vl-4b_sd3.5.yaml", "UnifiedGRPOConfig"),
                                                 ("understanding_gemma3-4b_sd3.5.yaml", "UnifiedGRPOConfig")])
def test_other_real_size_recipes_parse(recipe, config_name):
    """Each recipe's `stage:` picks its trainer's own config, which accepts every key of the recipe."""
    from trl import ModelConfig, TrlParser

    import uae_hf
    from uae_hf.trainer.train_script import UnifiedScriptArguments, recipe_stage

    path = Path(__file__).parents[1] / "examples" / "recipes" / recipe
    argv = ["--config", str(path), "--use_cpu", "true", "--bf16", "false"]
    config_class = getattr(uae_hf, config_name)
    parser = TrlParser((UnifiedScriptArguments, config_class, ModelConfig))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated option names in our recipes
        script, config, _ = parser.parse_args_and_config(argv)
    assert recipe_stage(argv) == script.stage and type(config) is config_class


def test_real_size_recipe_parses():
    from trl import ModelConfig, TrlParser

    from uae_hf import UnifiedGRPOConfig
    from uae_hf.trainer.train_script import UnifiedScriptArguments

    recipe = Path(__file__).parents[1] / "examples" / "recipes" / "understanding_qwen2.5-vl-3b_sd3.5.yaml"
    parser = TrlParser((UnifiedScriptArguments, UnifiedGRPOConfig, ModelConfig))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated option names in our recipes
        script, config, model = parser.parse_args_and_config(["--config", str(recipe), "--use_cpu", "true", "--bf16",
                                                              "false"])
    assert config.activation_checkpointing and model.dtype == "bfloat16"
    assert model.model_name_or_path == "Qwen/Qwen2.5-VL-3B-Instruct" and model.lora_r == 32 and model.lora_alpha == 64
    assert config.reward_backbones == ["clip"] and config.heldout_backbones == ["dinov2"]
    assert config.decoder_num_inference_steps == 10 and script.decoder == "path/to/uae-pipeline"


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("dataset split (default: test)", "decoder sampling steps (default: 40)",
                     "guidance scale (default: its own; 5.0 for a UAE or SD3 pipeline", "caption length limit (default: 512)",
                     "images per pipeline call (default: 4)", "(default: float32)"):
        assert expected in text, expected


def test_reconstruct_keeps_images_of_one_name_apart_and_is_quiet(pipe, photos, tmp_path, capfd):
    """Today: d1/x.png and d2/x.png both write reconstructions/x.png; loading bars from every library."""
    import transformers

    pipe.save_pretrained(tmp_path / "pipeline")
    paths = [tmp_path / "d1" / "x.png", tmp_path / "d2" / "x.png", tmp_path / "d2" / "x.jpg"]
    for path, photo in zip(paths, photos):
        path.parent.mkdir(exist_ok=True)
        photo.save(path)
    out = tmp_path / "out"
    bars = transformers.utils.logging.is_progress_bar_enabled()
    capfd.readouterr()
    main(["reconstruct", *map(str, paths), "--pipeline", str(tmp_path / "pipeline"), "--output-dir", str(out),
          "--num-inference-steps", "2", "--max-new-tokens", "6"])
    captured = capfd.readouterr()
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [row["image"] for row in rows] == list(map(str, paths))
    assert [Path(row["reconstruction"]).relative_to(out / "reconstructions").as_posix() for row in rows] == [
        "d1/x.png.png", "d2/x.png.png", "x.jpg.png"]
    assert all(Path(row["reconstruction"]).is_file() for row in rows)
    assert "wrote 3 reconstructions" in captured.out
    assert "reconstructing" in captured.err  # the command's own progress bar stays
    assert "Loading" not in captured.err and "it/s" not in captured.err.replace("image/s", "")
    assert transformers.utils.logging.is_progress_bar_enabled() == bars  # main leaves the libraries as they were
