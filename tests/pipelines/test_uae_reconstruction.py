"""UAEReconstructionPipeline: round trips, batching, saving/loading, adapters, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from network_block import BLOCK_NETWORK

from uae_hf import UAEReconstructionPipeline
from uae_hf.hub import pipeline_model_card

FAST = dict(num_inference_steps=3, output_type="np")
CAPTIONS = [
    "a cat",
    "an astronaut in an orange suit stands next to an American flag; behind her a space shuttle model, and in front "
    "of her a black and white helmet on a table. The background is grey and the light comes from the left.",
    "a cup",
]


def generators(n, offset=0):
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


@pytest.mark.parametrize("mode", ["embeddings", "text"])
def test_round_trip_in_both_modes(pipe, photos, mode):
    out = pipe(image=photos[:2], max_new_tokens=8, conditioning_mode=mode, generator=generators(2), **FAST)
    assert len(out.captions) == 2 and all(isinstance(caption, str) for caption in out.captions)
    size = pipe.default_sample_size * pipe.vae_scale_factor
    assert out.images.shape == (2, size, size, 3)
    assert (out.truncated is None) == (mode == "embeddings")
    pil = pipe.generate(out.captions[:1], conditioning_mode=mode, num_inference_steps=2).images
    assert isinstance(pil[0], PIL.Image.Image)


def test_modes_condition_differently(pipe):
    embeddings = pipe.generate(CAPTIONS[:1], generator=generators(1), **FAST).images
    text = pipe.generate(CAPTIONS[:1], conditioning_mode="text", generator=generators(1), **FAST).images
    assert np.abs(embeddings - text).max() > 1e-3


def test_identical_seeds_give_identical_outputs_and_no_generation_flag_warning(pipe, photos, monkeypatch):
    from transformers.generation import configuration_utils

    warned = []  # transformers warns once per process: recorded here whatever ran before
    monkeypatch.setattr(configuration_utils.logger, "warning_once", warned.append)
    torch.manual_seed(0)
    first = pipe(image=photos[:2], max_new_tokens=8, generator=generators(2), **FAST)
    # today: "The following generation flags are not valid and may be ignored: ['temperature']" on a sampled call
    assert not [message for message in warned if "generation flags" in message]
    torch.manual_seed(0)
    second = pipe(image=photos[:2], max_new_tokens=8, generator=generators(2), **FAST)
    assert first.captions == second.captions
    np.testing.assert_array_equal(first.images, second.images)


@pytest.mark.parametrize("mode", ["embeddings", "text"])
def test_batch_equals_single_calls_item_by_item(pipe, mode):
    batch = pipe.generate(CAPTIONS, conditioning_mode=mode, generator=generators(3), **FAST).images
    for index, caption in enumerate(CAPTIONS):
        single = pipe.generate([caption], conditioning_mode=mode, generator=generators(1, index), **FAST).images
        np.testing.assert_allclose(batch[index], single[0], atol=1e-4, rtol=0)


def test_unmasked_batch_padding_would_change_the_result(pipe):
    """The key mask is what keeps batching exact: without it the short caption sees the long one's padding."""
    from uae_hf import encode_generate_prompts

    conditioning = encode_generate_prompts(pipe.vlm, pipe.processor.tokenizer, pipe.projector, CAPTIONS[:2])
    assert conditioning.lengths[0] < conditioning.lengths[1]
    pooled = pipe.uae_pooled_prompt_embeds().expand(2, -1)
    kwargs = dict(
        prompt_embeds=conditioning.prompt_embeds,
        negative_prompt_embeds=conditioning.negative_prompt_embeds,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=pooled,
        generator=generators(2),
        guidance_scale=5.0,
        **FAST,
    )
    masked = super(UAEReconstructionPipeline, pipe).__call__(
        joint_attention_kwargs={"encoder_attention_mask": conditioning.text_mask()}, **kwargs
    ).images
    kwargs["generator"] = generators(2)
    unmasked = super(UAEReconstructionPipeline, pipe).__call__(**kwargs).images
    single = pipe.generate(CAPTIONS[:1], generator=generators(1), **FAST).images
    np.testing.assert_allclose(masked[0], single[0], atol=1e-4, rtol=0)
    assert np.abs(unmasked[0] - single[0]).max() > 1e-3


def test_num_images_per_prompt_is_item_major(pipe):
    out = pipe.generate(CAPTIONS[:2], num_images_per_prompt=2, generator=generators(4), **FAST)
    assert out.images.shape[0] == 4 and out.captions == CAPTIONS[:2]
    second_caption = pipe.generate(CAPTIONS[1:2], generator=generators(1, 2), **FAST).images
    np.testing.assert_allclose(out.images[2], second_caption[0], atol=1e-4, rtol=0)


def test_text_mode_reports_truncated_captions(pipe):
    long_caption = "a very detailed description of a red circle " * 30
    out = pipe.generate(["a cat", long_caption], conditioning_mode="text", num_inference_steps=1, output_type="np")
    assert out.truncated == [False, True]


def test_every_model_component_is_in_the_offload_sequence(pipe):
    offloaded = pipe.model_cpu_offload_seq.split("->")
    modules = [name for name, component in pipe.components.items() if isinstance(component, torch.nn.Module)]
    assert set(modules) <= set(offloaded), set(modules) - set(offloaded)


RELOAD_SCRIPT = BLOCK_NETWORK + """
import sys
sys.modules["uae_hf"] = None  # the saved folder must not need uae_hf
import numpy as np, torch
from diffusers import DiffusionPipeline

folder, decoder, out_path = sys.argv[1:4]
kwargs = dict(num_inference_steps=3, output_type="np")
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
assert type(pipe).__name__ == "UAEReconstructionPipeline"
first = pipe.generate(["a cat", "a cup on a wooden table"], generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs).images
custom = DiffusionPipeline.from_pretrained(
    decoder, custom_pipeline=folder + "/pipeline.py", trust_remote_code=True,
    vlm=pipe.vlm, processor=pipe.processor, projector=pipe.projector,
    text_encoder_3=None, tokenizer_3=None,
)
custom.set_progress_bar_config(disable=True)
second = custom.generate(["a cat", "a cup on a wooden table"], generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs).images
np.save(out_path, np.stack([first, second]))
"""


# Decoded pixels of the same seeded run in another process: identical with 2 threads; 3.6e-7 apart with 1 thread (both
# processes at OMP_NUM_THREADS=1, as on each pytest-xdist worker of a 2-core machine); a grey level is 3.9e-3.
ACROSS_PROCESSES = 2e-6


def test_save_and_reload_in_a_fresh_process_without_uae_hf(pipe, tiny_dir, tmp_path):
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder, model_card=pipeline_model_card(pipe, "someone/uae-tiny"))
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "UAEReconstructionPipeline"]
    assert index["projector"] == ["projector", "UAEProjector"]
    assert (folder / "pipeline.py").exists() and (folder / "projector" / "projector.py").exists()
    assert "uae_hf" not in (folder / "pipeline.py").read_text().split('"""', 2)[2].split("CAPTION_INSTRUCTION")[0]
    assert "trust_remote_code=True" in (folder / "README.md").read_text()

    expected = pipe.generate(["a cat", "a cup on a wooden table"], generator=generators(2), **FAST).images
    out_path = tmp_path / "images.npy"
    result = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(folder), str(tiny_dir / "decoder"), str(out_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded, through_custom_pipeline = np.load(out_path)
    np.testing.assert_allclose(reloaded, expected, rtol=0, atol=ACROSS_PROCESSES)
    np.testing.assert_allclose(through_custom_pipeline, expected, rtol=0, atol=ACROSS_PROCESSES)


def test_pipeline_modules_import_only_torch_transformers_diffusers():
    """Every module a saved folder carries (`pipeline.py` and its siblings) imports no `uae_hf`, and `pipeline.py`
    imports each sibling itself: diffusers copies only those (`get_relative_imports` of `pipeline.py`, one level)."""
    import ast
    import inspect

    from diffusers.utils.dynamic_modules_utils import get_relative_imports

    from uae_hf.pipelines.uae_reconstruction import pipeline_uae_reconstruction as module

    siblings = set(module.SIBLING_MODULES)
    folder = Path(inspect.getfile(module)).parent
    assert set(get_relative_imports(inspect.getfile(module))) == siblings
    for path in [Path(inspect.getfile(module))] + [folder / f"{name}.py" for name in sorted(siblings)]:
        tree = ast.parse(path.read_text())
        roots = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
        roots |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                  and node.level == 0}
        assert roots <= {"torch", "transformers", "diffusers", "huggingface_hub", "numpy", "PIL", "contextlib",
                         "inspect", "json", "shutil", "dataclasses", "pathlib", "tempfile", "warnings", "copy",
                         "sys", "os", "socket", "urllib"}, (path.name, roots)
        relative = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0}
        assert relative <= siblings and all(node.level == 1 for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom) and node.level > 0), path.name


TWO_FOLDERS_SCRIPT = BLOCK_NETWORK + """
import sys
sys.modules["uae_hf"] = None
from diffusers import DiffusionPipeline

for folder in sys.argv[1:3]:
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    print(sys.modules[type(pipe).__module__].NEGATIVE_PROMPT)
"""


def test_a_second_saved_folder_runs_its_own_sibling_modules(pipe, tmp_path):
    """diffusers copies every local folder's modules into one shared package and re-runs only `pipeline.py` on a
    later load: the pipeline must not pick up the sibling modules an earlier load left behind."""
    import shutil

    from uae_hf.pipelines.uae_reconstruction.pipeline_uae_reconstruction import NEGATIVE_PROMPT, SIBLING_MODULES

    pipe.save_pretrained(tmp_path / "first")
    assert all((tmp_path / "first" / f"{name}.py").exists() for name in SIBLING_MODULES)
    shutil.copytree(tmp_path / "first", tmp_path / "second")
    with open(tmp_path / "second" / "conditioning.py", "a") as handle:
        handle.write('NEGATIVE_PROMPT = "changed in the second folder"\n')
    result = subprocess.run([sys.executable, "-c", TWO_FOLDERS_SCRIPT, str(tmp_path / "first"), str(tmp_path / "second")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-2:] == [NEGATIVE_PROMPT, "changed in the second folder"]


def test_model_card_lists_parts_and_scores(pipe):
    card = pipeline_model_card(pipe, "someone/uae-tiny", unified_bench={"clip": 88.5, "overall": 86.09})
    assert card.startswith("---\n") and "library_name: diffusers" in card
    assert "64 → 256 → 64" in card and "embeddings" in card
    assert "| 88.50 | 86.09 |" in card
    assert "Unified-Bench" not in pipeline_model_card(pipe, "someone/uae-tiny")


def test_from_pipe_reuses_the_decoder_modules(pipe):
    from diffusers import StableDiffusion3Pipeline

    sd3 = StableDiffusion3Pipeline.from_pipe(pipe)
    again = UAEReconstructionPipeline.from_pipe(sd3, vlm=pipe.vlm, processor=pipe.processor, projector=pipe.projector)
    assert again.transformer is pipe.transformer and again.vae is pipe.vae and again.vlm is pipe.vlm


def _random_dit_lora(pipe, folder):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    pipe.transformer.add_adapter(config, adapter_name="trained")
    state = get_peft_model_state_dict(pipe.transformer, adapter_name="trained")
    UAEReconstructionPipeline.save_lora_weights(
        folder, transformer_lora_layers=state, transformer_lora_adapter_metadata=config.to_dict()
    )
    pipe.transformer.delete_adapters("trained")


def test_decoder_lora_changes_outputs_and_unloads_exactly(pipe, tmp_path):
    base = pipe.generate(CAPTIONS[:1], generator=generators(1), **FAST).images
    torch.manual_seed(1)
    _random_dit_lora(pipe, tmp_path / "lora")
    np.testing.assert_array_equal(pipe.generate(CAPTIONS[:1], generator=generators(1), **FAST).images, base)
    pipe.load_lora_weights(tmp_path / "lora", weight_name="pytorch_lora_weights.safetensors", adapter_name="dit")
    try:
        assert pipe.transformer.peft_config["dit"].lora_alpha == 8  # alpha survived the round trip
        with_lora = pipe.generate(CAPTIONS[:1], generator=generators(1), **FAST).images
        assert np.abs(with_lora - base).max() > 1e-3
        pipe.disable_lora()
        np.testing.assert_array_equal(pipe.generate(CAPTIONS[:1], generator=generators(1), **FAST).images, base)
        pipe.enable_lora()
        np.testing.assert_array_equal(pipe.generate(CAPTIONS[:1], generator=generators(1), **FAST).images, with_lora)
        with pytest.raises(ValueError, match="LoRA"):
            pipe.save_pretrained(tmp_path / "refused")
        assert not (tmp_path / "refused").exists()
    finally:
        pipe.unload_lora_weights()
    np.testing.assert_array_equal(pipe.generate(CAPTIONS[:1], generator=generators(1), **FAST).images, base)
    assert not any("lora" in key or "base_layer" in key for key in pipe.transformer.state_dict())


def test_peft_format_folder_is_rejected_by_load_lora_weights(pipe, tmp_path):
    """diffusers silently loads nothing from a PEFT-format file; ours says so."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    pipe.transformer.add_adapter(LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False), "peft")
    state = get_peft_model_state_dict(pipe.transformer, adapter_name="peft")
    pipe.transformer.delete_adapters("peft")
    save_file({f"base_model.model.{key}": value for key, value in state.items()}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="PEFT adapter"):
        pipe.load_lora_weights(tmp_path, weight_name="adapter_model.safetensors")
    assert not getattr(pipe.transformer, "peft_config", {})
    pipe.unload_lora_weights()
    assert not any("base_layer" in key for key in pipe.transformer.state_dict())


def test_encoder_adapter_changes_outputs_and_disables_exactly(pipe, photos, tmp_path):
    from peft import LoraConfig, get_peft_model

    from uae_hf.tiny_models import build_tiny_encoder

    build_tiny_encoder(tmp_path / "encoder")
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(2)
    donor = get_peft_model(
        Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "encoder"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False),
    )
    donor.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    greedy = dict(max_new_tokens=8, do_sample=False, no_repeat_ngram_size=1)
    base_captions = pipe.caption(photos, **greedy)
    base_images = pipe.generate(CAPTIONS[:1], generator=generators(1), **FAST).images
    pipe.load_encoder_adapter(tmp_path / "adapter")
    try:
        assert pipe.caption(photos, **greedy) != base_captions
        adapted = pipe.generate(CAPTIONS[:1], generator=generators(1), **FAST).images
        assert np.abs(adapted - base_images).max() > 1e-4
        pipe.disable_encoder_adapters()
        assert pipe.caption(photos, **greedy) == base_captions
        np.testing.assert_array_equal(pipe.generate(CAPTIONS[:1], generator=generators(1), **FAST).images, base_images)
        pipe.enable_encoder_adapters()
        with pytest.raises(ValueError, match="adapters loaded"):
            pipe.save_pretrained(tmp_path / "refused")
    finally:
        pipe.unload_encoder_adapter()
    np.testing.assert_array_equal(pipe.generate(CAPTIONS[:1], generator=generators(1), **FAST).images, base_images)
    assert not any("lora" in key or "base_layer" in key for key in pipe.vlm.state_dict())
    # saving after the unload writes the base model under the same key names as a model never given an adapter
    from safetensors import safe_open

    pipe.vlm.save_pretrained(tmp_path / "after_unload")
    Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "encoder").save_pretrained(tmp_path / "never")
    keys = []
    for folder in ("after_unload", "never"):
        with safe_open(str(tmp_path / folder / "model.safetensors"), "pt") as handle:
            keys.append(set(handle.keys()))
    assert keys[0] == keys[1]


def test_adapter_can_change_captions_only(pipe, photos, tmp_path):
    """With conditioning_with_encoder_adapters=False the decoder reads captions with the base LLM, even through an
    adapter that carries its own embeddings and head (modules_to_save); unloading removes those copies too."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    from uae_hf.tiny_models import build_tiny_encoder

    build_tiny_encoder(tmp_path / "encoder")
    torch.manual_seed(3)
    donor = get_peft_model(
        Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "encoder"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                   modules_to_save=["embed_tokens", "lm_head"]),
    )
    with torch.no_grad():
        donor.base_model.model.model.language_model.embed_tokens.modules_to_save["default"].weight.mul_(3.0)
    donor.save_pretrained(tmp_path / "adapter")

    greedy = dict(max_new_tokens=8, do_sample=False, no_repeat_ngram_size=1)
    base_images = pipe.generate(CAPTIONS[:1], generator=generators(1), **FAST).images
    base_captions = pipe.caption(photos, **greedy)
    pipe.load_encoder_adapter(tmp_path / "adapter")
    try:
        pipe.register_to_config(conditioning_with_encoder_adapters=False)
        np.testing.assert_array_equal(pipe.generate(CAPTIONS[:1], generator=generators(1), **FAST).images, base_images)
        assert pipe.caption(photos, **greedy) != base_captions  # the adapter still writes the captions
        pipe.register_to_config(conditioning_with_encoder_adapters=True)
        adapted = pipe.generate(CAPTIONS[:1], generator=generators(1), **FAST).images
        assert np.abs(adapted - base_images).max() > 1e-4
    finally:
        pipe.register_to_config(conditioning_with_encoder_adapters=True)
        pipe.unload_encoder_adapter()
    assert not any("modules_to_save" in key or "original_module" in key for key in pipe.vlm.state_dict())
    assert pipe.caption(photos, **greedy) == base_captions


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_any_image_mode_is_converted(pipe, photos, mode):
    if mode == "I;16":
        image = PIL.Image.fromarray((np.asarray(photos[0].convert("L"), dtype=np.uint16) * 257))
        assert image.mode.startswith("I;16")
    else:
        image = photos[0].convert(mode)
    out = pipe(image=image, max_new_tokens=4, num_inference_steps=1, output_type="np")
    assert len(out.captions) == 1


def test_numpy_images_are_accepted(pipe, photos):
    out = pipe(image=[np.asarray(photos[0])], max_new_tokens=4, num_inference_steps=1, output_type="np")
    assert len(out.captions) == 1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(image="not an image"), TypeError, r"image\[0\]"),
        (dict(image=[]), ValueError, "empty"),
        (dict(), ValueError, "image"),
        (dict(image=["x", "y"], captions=["only one"]), ValueError, "one caption per image"),
        (dict(captions=["a cat"], conditioning_mode="pixels"), ValueError, "conditioning_mode"),
        (dict(captions=[]), ValueError, "captions"),
    ],
)
def test_bad_input_gets_a_clear_error(pipe, kwargs, error, match):
    if "image" in kwargs and isinstance(kwargs["image"], list) and kwargs["image"] and kwargs.get("captions"):
        kwargs = dict(kwargs, image=[PIL.Image.new("RGB", (32, 32))] * 2)
    with pytest.raises(error, match=match):
        pipe(num_inference_steps=1, **kwargs)


def test_projector_width_must_match_the_decoder(pipe):
    from uae_hf import UAEProjector

    wrong = UAEProjector(64, 32, 48)
    with pytest.raises(ValueError, match="joint_attention_dim"):
        UAEReconstructionPipeline.from_pipe(pipe, projector=wrong)


def test_embeddings_mode_needs_a_projector(pipe):
    with pytest.raises(ValueError, match="projector"):
        UAEReconstructionPipeline.from_pipe(pipe, projector=None)


def test_saved_folder_loads_without_running_its_code(pipe, tmp_path):
    """The default loader rebuilds a saved UAE pipeline from uae_hf's classes: no code from the folder runs."""
    from uae_hf.models.projector import UAEProjector
    from uae_hf.pipelines import load_saved_pipeline

    pipe.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "pipeline.py").write_text("raise RuntimeError('remote code ran')\n")
    (tmp_path / "saved" / "projector" / "projector.py").write_text("raise RuntimeError('remote code ran')\n")
    loaded = load_saved_pipeline(tmp_path / "saved")
    assert type(loaded) is UAEReconstructionPipeline and type(loaded.projector) is UAEProjector
    expected = pipe.generate(["a cat"], generator=generators(1), **FAST).images
    np.testing.assert_array_equal(loaded.generate(["a cat"], generator=generators(1), **FAST).images, expected)
    with pytest.raises(RuntimeError, match="remote code ran"):
        load_saved_pipeline(tmp_path / "saved", trust_remote_code=True)


SEEDED_ROUND_TRIP_SCRIPT = BLOCK_NETWORK + """
import json, sys
sys.modules["uae_hf"] = None
import numpy as np, torch
from diffusers import DiffusionPipeline

folder, photos_path, global_seed, out_path = sys.argv[1:5]
torch.manual_seed(int(global_seed))  # anything else the process does with the global RNG must not matter
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
photos = list(np.load(photos_path))
out = pipe(image=photos, generator=[torch.Generator().manual_seed(10 + i) for i in range(len(photos))],
           max_new_tokens=8, num_inference_steps=3, output_type="np")
np.save(out_path + ".npy", out.images)
open(out_path + ".json", "w").write(json.dumps(out.captions))
"""


def test_a_seeded_round_trip_is_the_same_in_any_process(pipe, photos, tmp_path):
    """Captions are sampled with generators derived from the ones given (not the global RNG): the same seeded call
    gives the same captions and images here and in a fresh process with another global seed."""
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    photos_path = tmp_path / "photos.npy"
    np.save(photos_path, np.stack([np.asarray(photo) for photo in photos[:2]]))
    torch.manual_seed(123)
    here = pipe(image=photos[:2], generator=generators(2, 10), max_new_tokens=8, num_inference_steps=3,
                output_type="np")
    out_path = tmp_path / "process"
    result = subprocess.run([sys.executable, "-c", SEEDED_ROUND_TRIP_SCRIPT, str(folder), str(photos_path), "0",
                             str(out_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(Path(f"{out_path}.json").read_text()) == here.captions
    np.testing.assert_allclose(np.load(f"{out_path}.npy"), here.images, rtol=0, atol=ACROSS_PROCESSES)
    # and the noise is still what the same generators give `generate` (captions do not consume them)
    again = pipe.generate(here.captions, generator=generators(2, 10), num_inference_steps=3, output_type="np")
    np.testing.assert_array_equal(again.images, here.images)


def test_saved_configs_carry_no_local_paths(pipe, tiny_dir, tmp_path):
    """Where the parts were loaded from is a path of this machine: no saved JSON keeps it, and the folder reloads."""
    from uae_hf.pipelines import load_saved_pipeline

    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    configs = sorted(folder.rglob("*.json"))
    assert {path.relative_to(folder).as_posix() for path in configs} >= {
        "model_index.json", "transformer/config.json", "vae/config.json", "projector/config.json", "vlm/config.json"}
    for path in configs:
        text = path.read_text()
        assert str(tiny_dir) not in text and str(tiny_dir.resolve()) not in text, path
        assert "_name_or_path" not in json.loads(text), path
    loaded = load_saved_pipeline(folder)
    loaded.set_progress_bar_config(disable=True)
    expected = pipe.generate(["a cat"], generator=generators(1), **FAST).images
    np.testing.assert_array_equal(loaded.generate(["a cat"], generator=generators(1), **FAST).images, expected)


def test_a_hub_source_is_kept_in_the_saved_configs(pipe, tmp_path):
    before = pipe.config["_name_or_path"], pipe.transformer.config["_name_or_path"]
    pipe.register_to_config(_name_or_path="someone/uae-tiny")
    pipe.transformer.register_to_config(_name_or_path="stabilityai/stable-diffusion-3.5-medium")
    try:
        pipe.save_pretrained(tmp_path / "saved")
    finally:
        pipe.register_to_config(_name_or_path=before[0])
        pipe.transformer.register_to_config(_name_or_path=before[1])
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_name_or_path"] == "someone/uae-tiny"
    transformer = json.loads((tmp_path / "saved" / "transformer" / "config.json").read_text())
    assert transformer["_name_or_path"] == "stabilityai/stable-diffusion-3.5-medium"
    assert "_name_or_path" not in json.loads((tmp_path / "saved" / "vae" / "config.json").read_text())


def test_push_to_hub_without_the_hub_fails_before_saving_anything(pipe, monkeypatch, tmp_path):
    """Today: diffusers' bare `ConnectError` from `create_repo`."""
    import tempfile

    from huggingface_hub import constants

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the folder to upload would be saved
    with pytest.raises(ConnectionError, match="cannot push to me/uae: the Hub cannot be reached: HF_HUB_OFFLINE"):
        pipe.push_to_hub("me/uae")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online mode; the network block resolves no name
    with pytest.raises(ConnectionError, match="huggingface.co does not resolve.*save_pretrained"):
        pipe.push_to_hub("me/uae")
    assert not list(tmp_path.iterdir())


def test_several_images_per_prompt_with_one_generator_per_output_row(pipe, photos):
    """SD3 takes one generator per output row; each image's caption follows the first of its rows."""
    rows = [torch.Generator().manual_seed(i) for i in range(4)]
    out = pipe(image=photos[:2], num_images_per_prompt=2, generator=rows, height=64, width=64,
               num_inference_steps=2, max_new_tokens=8)
    alone = pipe(image=photos[:2], generator=[torch.Generator().manual_seed(i) for i in (0, 2)], height=64,
                 width=64, num_inference_steps=2, max_new_tokens=8)
    assert len(out.images) == 4 and out.captions == alone.captions
