"""Loading the released UAE model's layout (a synthetic twin of it) and every kind of damage."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from synthetic_release import build_synthetic_release

from uae_hf import ReleaseFormatError, UAEProjector, UAEReconstructionPipeline, encode_generate_prompts
from uae_hf.cli import main


@pytest.fixture(scope="module")
def release(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    pairs = build_synthetic_release(tiny_dir, root)
    return root, pairs


def hand_merged_reference(tiny_dir, pairs):
    """The release's computation, by hand: W + (alpha / r) · B @ A on fresh twins."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    sd3 = StableDiffusion3Pipeline.from_pretrained(tiny_dir / "decoder", text_encoder_3=None, tokenizer_3=None)
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "encoder").eval()
    llm_modules = dict(vlm.model.language_model.named_modules())
    dit_modules = dict(sd3.transformer.named_modules())
    with torch.no_grad():
        for name, (a, b) in pairs["llm"].items():
            layer = llm_modules[name]
            layer.weight.copy_((layer.weight.float() + (64 / 32) * (b.float() @ a.float())).to(layer.weight.dtype))
        for name, (a, b) in pairs["dit"].items():
            layer = dit_modules[name]
            layer.weight.copy_((layer.weight.float() + pairs["dit_scale"] * (b.float() @ a.float())).to(layer.weight.dtype))
    return UAEReconstructionPipeline.from_pipe(sd3, vlm=vlm, processor=AutoProcessor.from_pretrained(tiny_dir / "encoder"),
                                               projector=UAEProjector.from_pretrained(tiny_dir / "projector"))


def test_release_loads_and_matches_the_hand_merged_reference(release, tiny_dir):
    root, pairs = release
    pipe = UAEReconstructionPipeline.from_uae_release(root)
    reference = hand_merged_reference(tiny_dir, pairs)
    for p in (pipe, reference):
        p.set_progress_bar_config(disable=True)
    captions = ["a cat", "an astronaut in an orange suit next to a flag " * 3]
    ours = encode_generate_prompts(pipe.vlm, pipe.processor.tokenizer, pipe.projector, captions)
    theirs = encode_generate_prompts(reference.vlm, reference.processor.tokenizer, reference.projector, captions)
    assert torch.equal(ours.prompt_embeds, theirs.prompt_embeds)
    kwargs = dict(height=64, width=64, num_inference_steps=3, output_type="np")
    images = pipe.generate(captions, generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs).images
    expected = reference.generate(captions, generator=[torch.Generator().manual_seed(i) for i in range(2)],
                                  **kwargs).images
    assert (images == expected).all()
    # the adapters did something: the un-merged twins give other numbers
    plain = encode_generate_prompts(reference.vlm.__class__.from_pretrained(tiny_dir / "encoder"),
                                    pipe.processor.tokenizer, pipe.projector, captions)
    assert not torch.allclose(plain.prompt_embeds, ours.prompt_embeds, atol=1e-4)


def test_convert_release_writes_a_self_loading_folder(release, tmp_path):
    root, _ = release
    main(["convert-release", str(root), str(tmp_path / "converted")])
    assert (tmp_path / "converted" / "pipeline.py").exists()
    assert (tmp_path / "converted" / "projector" / "projector.py").exists()


def damaged(release, tmp_path, damage):
    root, _ = release
    copy = tmp_path / "damaged"
    shutil.copytree(root, copy)
    damage(copy)
    return copy


def _rewrite(path, change):
    tensors = load_file(path)
    save_file({k: v.contiguous() for k, v in change(tensors).items()}, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: shutil.rmtree(root / "llm_lora"), r"missing slot\(s\) llm_lora"),
        (lambda root: shutil.move(root / "SD3", root / "SD3_model"), None),  # an accepted alias: loads
        (lambda root: _rewrite(root / "llm_lora" / "model-00001-of-00003.safetensors",
                               lambda t: {k.replace("q_proj.lora_A", "q_projx.lora_A"): v for k, v in t.items()}),
         r"q_projx"),
        (lambda root: _rewrite(root / "llm_lora" / "model-00002-of-00003.safetensors",
                               lambda t: {k: (v[:16] if "lora_A" in k else v[:, :16] if "lora_B" in k else v)
                                          for k, v in t.items()}),
         r"rank 16 .* expected rank 32"),
        (lambda root: _rewrite(root / "llm" / "model.safetensors",
                               lambda t: t | {"projector.2.weight": t["projector.2.weight"][:48],
                                              "projector.2.bias": t["projector.2.bias"][:48]}),
         r"projector is 64→256→48 .* joint_attention_dim is 64"),
        (lambda root: _rewrite(root / "llm" / "model.safetensors",
                               lambda t: {k: v for k, v in t.items() if not k.startswith("projector.0")}),
         r"projector key\(s\) \['projector.0.weight'"),
        (lambda root: _rewrite(root / "dit_lora" / "adapter_model.safetensors",
                               lambda t: {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in t.items()}),
         r"dit_lora.*every lora_B is zero"),
        (lambda root: (root / "dit_lora" / "adapter_config.json").unlink(), r"adapter_config.json"),
        (lambda root: _rewrite(root / "llm_lora" / "model-00003-of-00003.safetensors",
                               lambda t: {k: v for k, v in t.items() if ".mlp." not in k}),
         r"LoRA pairs, expected 14"),
    ],
    ids=["missing-slot", "alias", "renamed-key", "wrong-rank", "projector-width", "projector-missing", "zero-lora",
         "no-adapter-config", "missing-lora-tensors"],
)
def test_damage_is_named(release, tmp_path, damage, message):
    folder = damaged(release, tmp_path, damage)
    if message is None:
        assert UAEReconstructionPipeline.from_uae_release(folder).config.conditioning_mode == "embeddings"
        return
    with pytest.raises(ReleaseFormatError, match=message):
        UAEReconstructionPipeline.from_uae_release(folder)
