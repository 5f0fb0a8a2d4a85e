"""Precision: every entry point that loads, builds or wraps a model keeps the dtype it is given (users run bf16).

The twins are stored in float32, so any path that silently falls back to a library default (diffusers' `from_pipe`
casts to float32; diffusers' `from_pretrained` loads float32 unless told otherwise) shows up here as a float32
parameter in a pipeline that was asked for bfloat16.
"""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline
from synthetic_release import build_synthetic_release
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from uae_hf import (
    ColdStartConfig,
    ColdStartTrainer,
    DecoderPretrainingConfig,
    DecoderPretrainingTrainer,
    DiffusionNFTConfig,
    DiffusionNFTTrainer,
    FlowGRPOConfig,
    FlowGRPOTrainer,
    UAEProjector,
    UAEReconstructionPipeline,
    UnifiedGRPOConfig,
    UnifiedGRPOTrainer,
    load_saved_pipeline,
    load_uae_pipeline,
)
from uae_hf import cli
from uae_hf.pipelines.uae_reconstruction import pipeline_uae_reconstruction
from uae_hf.trainer.train_script import _assemble_decoder

BF16 = torch.bfloat16


def parameter_dtypes(pipe) -> dict[str, set[torch.dtype]]:
    """Each model component's set of parameter dtypes; trained LoRA weights aside (they keep float32 master weights
    by design, see the training test)."""
    return {name: {p.dtype for n, p in module.named_parameters() if "lora_" not in n}
            for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}


def assert_all(pipe, dtype):
    dtypes = parameter_dtypes(pipe)
    assert {"transformer", "vae", "text_encoder", "text_encoder_2"} <= set(dtypes)
    wrong = {name: found for name, found in dtypes.items() if found != {dtype}}
    assert not wrong, f"components not in {dtype}: {wrong}"


@pytest.fixture(scope="module")
def saved_bf16(tiny_dir, tmp_path_factory):
    """A UAE pipeline saved in bfloat16 (the twins themselves are stored in float32)."""
    folder = tmp_path_factory.mktemp("saved-bf16")
    load_uae_pipeline(tiny_dir / "decoder", tiny_dir / "encoder", tiny_dir / "projector",
                      torch_dtype=BF16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def release(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    build_synthetic_release(tiny_dir, root)
    return root


def _from_pipe(tiny_dir, **_):
    sd3 = StableDiffusion3Pipeline.from_pretrained(tiny_dir / "decoder", dtype=BF16)
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "encoder", dtype=BF16)
    projector = UAEProjector.from_pretrained(tiny_dir / "projector", dtype=BF16)
    pipe = UAEReconstructionPipeline.from_pipe(sd3, vlm=vlm, processor=AutoProcessor.from_pretrained(
        tiny_dir / "encoder"), projector=projector)
    assert_all(sd3, BF16)  # the shared modules of the given pipeline were not cast either
    return pipe


def _text_mode_from_pipe(tiny_dir, **_):
    return UAEReconstructionPipeline.from_pipe(
        StableDiffusion3Pipeline.from_pretrained(tiny_dir / "decoder", dtype=BF16), conditioning_mode="text")


def _trainer_text_mode_decoder(tiny_dir, tmp_path, **_):
    """A plain SD3 pipeline given to the trainer as its decoder (text mode)."""
    from uae_hf.sample_data import skimage_photos

    args = UnifiedGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=True, report_to=[], num_generations=2,
                             per_device_train_batch_size=2, backbone_checkpoints={"clip": str(tiny_dir / "backbones" / "clip")})
    trainer = UnifiedGRPOTrainer(
        model=Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "encoder", dtype=BF16),
        decoder=StableDiffusion3Pipeline.from_pretrained(tiny_dir / "decoder", dtype=BF16), args=args,
        train_dataset=skimage_photos(32).select(range(2)), processing_class=AutoProcessor.from_pretrained(tiny_dir / "encoder"))
    assert trainer.decoder.config.conditioning_mode == "text"
    return trainer.decoder


def _convert_release(tiny_dir, release, tmp_path, **_):
    cli.main(["convert-release", str(release), str(tmp_path / "converted"), "--dtype", "bfloat16"])
    return load_saved_pipeline(tmp_path / "converted")  # no dtype asked: as stored, which must be bf16


def _cli_pipeline(tiny_dir, saved_fp32, tmp_path, monkeypatch, **_):
    """The pipeline `uae-hf reconstruct --dtype bfloat16` hands to its round trip."""
    handed = []
    monkeypatch.setattr(cli, "reconstruct", lambda pipeline, *args, **kwargs: handed.append(pipeline) or [])
    image = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(image)
    cli.main(["reconstruct", str(image), "--pipeline", str(saved_fp32), "--output-dir", str(tmp_path / "out"),
              "--dtype", "bfloat16", "--device", "cpu"])
    return handed[0]


def _train_script_decoder(tiny_dir, tmp_path, **_):
    """The decoder `uae-hf train --dtype bfloat16` assembles and trains with (one step of the tiny stage-3 recipe)."""
    from uae_hf.trainer.train_script import main as train_main

    recipe = Path(__file__).parents[1] / "examples" / "recipes" / "generation_tiny.yaml"
    trainer = train_main(["--config", str(recipe), "--max_steps", "1", "--dtype", "bfloat16", "--bf16", "true", "--use_cpu", "true",
                          "--output_dir", str(tmp_path / "run"), "--tiny_models_dir", str(tiny_dir),
                          "--log_reconstructions_steps", "0"])
    return trainer.decoder


def _app_pipeline(tiny_dir, saved_fp32=None, **_):
    """The pipeline `uae-hf app --dtype bfloat16` round-trips with: a saved folder's, or the tiny twins'."""
    source = ["--pipeline", str(saved_fp32)] if saved_fp32 else []
    args = cli.build_parser().parse_args(["app", *source, "--dtype", "bfloat16", "--device", "cpu", "--backbones", "clip",
                                          "--checkpoint", f"clip={tiny_dir / 'backbones' / 'clip'}"])
    cli._check_app(args)  # what `uae-hf app` checks and finds first
    return cli._app_round_trips(args).pipeline


ENTRY_POINTS = {
    "load_uae_pipeline": lambda tiny_dir, **_: load_uae_pipeline(
        tiny_dir / "decoder", tiny_dir / "encoder", tiny_dir / "projector", torch_dtype=BF16),
    "from_pipe": _from_pipe,
    "from_pipe text mode": _text_mode_from_pipe,
    "trainer text-mode decoder": _trainer_text_mode_decoder,
    "load_saved_pipeline": lambda saved_fp32, **_: load_saved_pipeline(saved_fp32, torch_dtype=BF16),
    "load_saved_pipeline as stored": lambda saved_bf16, **_: load_saved_pipeline(saved_bf16),
    "load_saved_pipeline remote code": lambda saved_fp32, **_: load_saved_pipeline(
        saved_fp32, trust_remote_code=True, torch_dtype=BF16),
    "DiffusionPipeline remote code": lambda saved_fp32, **_: DiffusionPipeline.from_pretrained(
        saved_fp32, trust_remote_code=True, dtype=BF16),
    "from_uae_release": lambda release, **_: UAEReconstructionPipeline.from_uae_release(release, torch_dtype=BF16),
    "uae-hf convert-release --dtype": _convert_release,
    "uae-hf reconstruct --dtype": _cli_pipeline,
    "uae-hf train --dtype": _train_script_decoder,
    "uae-hf app --dtype": _app_pipeline,
    "uae-hf app --dtype (tiny twins)": lambda tiny_dir, **_: _app_pipeline(tiny_dir),
    "uae-hf train --projector new": lambda tiny_dir, **_: _assemble_decoder(
        str(tiny_dir / "decoder"), str(tiny_dir / "encoder"), "new", BF16),
}


@pytest.fixture(scope="module")
def saved_fp32(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved-fp32")
    pipe.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_every_entry_point_keeps_the_requested_dtype(entry_point, tiny_dir, saved_fp32, saved_bf16, release, tmp_path,
                                                     monkeypatch):
    pipe = ENTRY_POINTS[entry_point](tiny_dir=tiny_dir, saved_fp32=saved_fp32, saved_bf16=saved_bf16,
                                     release=release, tmp_path=tmp_path, monkeypatch=monkeypatch)
    assert_all(pipe, BF16)
    assert_all(pipe.to("cpu"), BF16)


def test_without_a_dtype_each_component_keeps_its_own(tiny_dir):
    """from_pipe with no dtype casts nothing, even when components differ (an fp32 projector beside a bf16 DiT)."""
    sd3 = StableDiffusion3Pipeline.from_pretrained(tiny_dir / "decoder", dtype=BF16)
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "encoder", dtype=torch.float32)
    pipe = UAEReconstructionPipeline.from_pipe(sd3, vlm=vlm, processor=AutoProcessor.from_pretrained(
        tiny_dir / "encoder"), projector=UAEProjector.from_pretrained(tiny_dir / "projector"))
    dtypes = parameter_dtypes(pipe)
    assert dtypes["transformer"] == dtypes["vae"] == {BF16}
    assert dtypes["vlm"] == dtypes["projector"] == {torch.float32}
    # mixed components are cast at the boundary of each call: the round trip runs and the models stay as they were
    out = pipe(captions=["a red square"], height=32, width=32, num_inference_steps=2, output_type="np")
    assert np.isfinite(out.images).all()
    assert parameter_dtypes(pipe) == dtypes
    assert parameter_dtypes(UAEReconstructionPipeline.from_pipe(pipe, dtype=torch.float32))["vae"] == {
        torch.float32}


def test_large_float32_weights_on_a_gpu_warn_once(pipe, monkeypatch):
    """The check behind the warning, with the CPU standing in for CUDA and the 1B threshold lowered to the twins."""
    monkeypatch.setattr(pipeline_uae_reconstruction, "FLOAT32_WARNING_DEVICES", ("cpu",))
    monkeypatch.setattr(pipeline_uae_reconstruction, "FLOAT32_WARNING_PARAMETERS", 1000)
    monkeypatch.setattr(pipe, "_warned_float32", False)
    with pytest.warns(UserWarning, match="float32 on a GPU"):
        pipe.to("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.to("cpu")  # once per pipeline


def test_bfloat16_pipeline_does_not_warn(tiny_dir, monkeypatch):
    monkeypatch.setattr(pipeline_uae_reconstruction, "FLOAT32_WARNING_DEVICES", ("cpu",))
    monkeypatch.setattr(pipeline_uae_reconstruction, "FLOAT32_WARNING_PARAMETERS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        load_uae_pipeline(tiny_dir / "decoder", tiny_dir / "encoder", tiny_dir / "projector",
                          torch_dtype=BF16).to("cpu")


def test_bfloat16_round_trip_stays_close_to_float32(tiny_dir, pipe):
    """The same captions and noise through the same weights, in bf16 and in fp32.

    bf16 keeps 8 mantissa bits (relative rounding 2^-9 ≈ 0.2% per operation); through the LLM and the projector
    the conditioning differs by 0.6% (relative norm, measured on the twins) and after 4 DiT steps and the VAE the
    pixels (in [0, 1], spread 0.18) by 0.0025 on average, 0.027 at most. The bounds leave 3-4× room for other CPUs'
    kernels. A dtype bug (a component left in fp32 where bf16 was asked, an
    embedding fed in the wrong dtype) either fails loudly or is caught by the dtype tests above; this test catches
    the opposite failure: a bf16 path that runs but computes something else.
    """
    bf16 = load_uae_pipeline(tiny_dir / "decoder", tiny_dir / "encoder", tiny_dir / "projector", torch_dtype=BF16)
    bf16.set_progress_bar_config(disable=True)
    captions = ["a red circle on a white background", "an astronaut next to a flag, a helmet on the table"]
    with torch.no_grad():
        conditioning = {name: p.encode_captions(captions)["prompt_embeds"].float()
                        for name, p in (("fp32", pipe), ("bf16", bf16))}
    relative = (conditioning["bf16"] - conditioning["fp32"]).norm() / conditioning["fp32"].norm()
    assert relative < 0.02
    kwargs = dict(height=64, width=64, num_inference_steps=4, output_type="np")
    images = {name: p.generate(captions, generator=[torch.Generator().manual_seed(i) for i in range(2)],
                               **kwargs).images for name, p in (("fp32", pipe), ("bf16", bf16))}
    assert images["bf16"].dtype == np.float32 and np.isfinite(images["bf16"]).all()
    difference = np.abs(images["bf16"] - images["fp32"])
    assert difference.mean() < 0.01 and difference.max() < 0.1
    # and the two are not trivially equal: bf16 really ran in bf16
    assert difference.mean() > 0


STAGES = {  # each stage's config and trainer, and its own settings
    "understanding": (UnifiedGRPOConfig, UnifiedGRPOTrainer, dict(num_generations=4, max_completion_length=8)),
    "generation": (FlowGRPOConfig, FlowGRPOTrainer, dict(num_generations=4, max_completion_length=8,
                                                         decoder_lora_r=8, decoder_lora_alpha=16)),
    "generation_nft": (DiffusionNFTConfig, DiffusionNFTTrainer, dict(num_generations=4, max_completion_length=8,
                                                                   decoder_lora_r=8, decoder_lora_alpha=16)),
    "pretrain": (DecoderPretrainingConfig, DecoderPretrainingTrainer, dict(decoder_lora_r=8, decoder_lora_alpha=16)),
    "cold_start": (ColdStartConfig, ColdStartTrainer, dict(cold_start_trainable=["projector", "llm_lora", "dit_lora"],
                                                           decoder_lora_r=8, decoder_lora_alpha=16, llm_lora_r=4,
                                                           llm_lora_alpha=8)),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_one_bf16_training_step_of_every_stage(stage, tiny_dir, tmp_path):
    """Models loaded in bf16 and `bf16=True` (autocast), as on a GPU: the step runs, the trained weights move (with
    float32 master weights, as PEFT keeps adapters), and no frozen model is upcast."""
    from peft import LoraConfig

    from uae_hf.sample_data import skimage_photos

    config_class, trainer_class, settings = STAGES[stage]
    pipe = load_uae_pipeline(tiny_dir / "decoder", tiny_dir / "encoder", tiny_dir / "projector", torch_dtype=BF16)
    args = config_class(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
        report_to=[], use_cpu=True, bf16=True, seed=0, save_strategy="no", decoder_height=64, decoder_width=64,
        decoder_num_inference_steps=2, lr_scheduler_type="constant", log_reconstructions_steps=0,
        backbone_checkpoints={"clip": str(tiny_dir / "backbones" / "clip")}, backbone_dtype="bfloat16", **settings,
    )
    peft = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trainer_class(model=pipe.vlm, decoder=pipe, args=args, train_dataset=skimage_photos(64).select(
        range(4)), processing_class=pipe.processor, peft_config=peft if stage == "understanding" else None)
    trained = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    frozen = {id(p) for p in trained.values()}
    assert trained and {p.dtype for p in trained.values()} == {torch.float32}
    before = {name: p.detach().clone() for name, p in trained.items()}
    trainer.train()
    assert any(not torch.equal(before[name], p) for name, p in trained.items())
    loss = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    assert loss and np.isfinite(loss).all()
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            upcast = [n for n, p in module.named_parameters() if p.dtype != BF16 and id(p) not in frozen]
            assert not upcast, f"{name}: {upcast[:3]} are no longer bf16"
