"""Loading the released UAE model's layout (a synthetic twin of it) and every kind of damage."""

import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from synthetic_release import build_synthetic_release, replace_base_weights

from uae_hf import ReleaseFormatError, UAEProjector, UAEReconstructionPipeline, encode_generate_prompts
from uae_hf.cli import main
from uae_hf.release import SLOTS


@pytest.fixture(scope="module")
def release(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    pairs = build_synthetic_release(tiny_dir, root)
    return root, pairs


def hand_merged_reference(tiny_dir, pairs, base=None):
    """The release's computation, by hand: `base` ({vlm weight: value} from `llm_lora`) replaces the twins' weights,
    then W + (alpha / r) · B @ A."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    sd3 = StableDiffusion3Pipeline.from_pretrained(tiny_dir / "decoder", text_encoder_3=None, tokenizer_3=None)
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "encoder").eval()
    llm_modules = dict(vlm.model.language_model.named_modules())
    dit_modules = dict(sd3.transformer.named_modules())
    with torch.no_grad():
        for name, value in (base or {}).items():
            vlm.get_parameter(name).copy_(value)
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


@pytest.fixture(scope="module")
def plain(release):
    """The synthetic release, loaded once: the reference for the renamed and report tests."""
    return UAEReconstructionPipeline.from_uae_release(release[0])


def same_weights(pipe, other):
    return all(torch.equal(value, getattr(other, component).state_dict()[name])
               for component in ("vlm", "projector") for name, value in getattr(pipe, component).state_dict().items())


def test_base_tensors_in_llm_lora_replace_llm_before_the_lora(release, tiny_dir, tmp_path, caplog):
    """As the release's non-strict load: shard base weights, norm, embeddings replace llm/'s, the LoRA merges on top."""
    root, pairs = release
    copy = tmp_path / "replaced"
    shutil.copytree(root, copy)
    base = replace_base_weights(copy)
    dropped = "model.base_model.model.rotary_emb.inv_freq"  # not in the release's model: strict=False drops it
    _rewrite(copy / "llm_lora" / "model-00001-of-00003.safetensors", lambda t: t | {dropped: torch.ones(4)})
    with caplog.at_level(logging.INFO, logger="uae_hf.release"):
        pipe = UAEReconstructionPipeline.from_uae_release(copy)

    reference = hand_merged_reference(tiny_dir, pairs, base)
    ours, theirs = pipe.vlm.state_dict(), reference.vlm.state_dict()
    assert ours.keys() == theirs.keys()
    assert [name for name in ours if not torch.equal(ours[name], theirs[name])] == []
    assert same_weights(pipe, reference)
    without_base = hand_merged_reference(tiny_dir, pairs).vlm.state_dict()  # what loading only the LoRA pairs gives
    assert all(not torch.equal(ours[name], without_base[name]) for name in base)

    report = pipe.release_load_report
    assert set(report.changed) == {f"vlm.{name}" for name in base} | {"vlm.lm_head.weight"}  # tied to embed_tokens
    assert set(report.changed) <= set(report.replaced)
    assert report.ignored == (dropped,)
    assert report.lora_pairs == 14 and report.lora_scale == 2
    assert report.families["base_layer"] == 20  # 14 weights + the q, k, v biases of 2 layers
    assert {"embed_tokens", "norm", "input_layernorm", "visual", "projector", "rotary_emb"} <= set(report.families)
    assert "6 differ from llm/'s" in str(report)
    assert "vlm.model.language_model.norm.weight" in caplog.text and dropped in caplog.text
    assert any(record.levelno == logging.WARNING and dropped in record.getMessage() for record in caplog.records)


def test_report_of_the_plain_release(release, plain, capsys):
    """Its shards hold the whole model (equal to llm/'s): every weight replaced, none changed, none dropped."""
    report = plain.release_load_report
    everything = {f"vlm.{name}" for name, _ in plain.vlm.named_parameters(remove_duplicate=False)}
    everything |= {f"projector.{name}" for name, _ in plain.projector.named_parameters()}
    assert set(report.replaced) == everything
    assert report.changed == report.ignored == ()
    assert report.slots == {slot: slot for slot in SLOTS}
    assert report.processor_max_pixels == 65536
    # the CLI prints it
    main(["convert-release", str(release[0]), str(release[0].parent / "converted-for-report")])
    assert str(report) in capsys.readouterr().out


def test_the_lora_wrapping_leaves_no_trace(plain):
    """PEFT wraps the language model only to load the shards: plain layers, nothing frozen, no adapter config left."""
    from peft.tuners.lora import LoraLayer

    assert not any(isinstance(module, LoraLayer) for module in plain.vlm.modules())
    assert all(parameter.requires_grad for parameter in plain.vlm.parameters())
    assert not hasattr(plain.vlm.model.language_model, "peft_config")
    assert type(plain.vlm.model.language_model.layers[0].self_attn.q_proj) is torch.nn.Linear


VARIANTS = {f"{slot}={alias}": {slot: alias} for slot, names in SLOTS.items() for alias in names[1:]}
VARIANTS["released code's Checkpoints/"] = {"SD3": "SD3_model", "llm_processor": "llm_model_preprocessor"}
VARIANTS["every alias"] = {slot: names[-1] for slot, names in SLOTS.items()}


@pytest.mark.parametrize("renames", list(VARIANTS.values()), ids=list(VARIANTS))
def test_every_slot_name_variant_loads(release, plain, tmp_path, renames):
    root, _ = release
    copy = tmp_path / "renamed"
    shutil.copytree(root, copy)
    for slot, alias in renames.items():
        if alias != slot:
            (copy / slot).rename(copy / alias)
    pipe = UAEReconstructionPipeline.from_uae_release(copy)
    assert pipe.release_load_report.slots == {slot: renames.get(slot, slot) for slot in SLOTS}
    assert same_weights(pipe, plain)
    assert pipe.processor.image_processor.size == plain.processor.image_processor.size


def _keep_only(folder, names):
    for path in folder.iterdir():
        if path.name not in names:
            path.unlink()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: shutil.rmtree(root / "llm_processor"),
         r"missing slot\(s\) llm_processor \(looked for llm_processor or llm_model_preprocessor\)"),
        (lambda root: _keep_only(root / "llm_processor", ()), r"slot 'llm_processor' .* does not hold a processor"),
        (lambda root: _keep_only(root / "llm_processor", ("tokenizer.json", "tokenizer_config.json")),
         r"slot 'llm_processor' .* does not hold a processor"),
    ],
    ids=["no-processor-slot", "empty-processor-slot", "tokenizer-only"],
)
def test_never_a_stock_processor(release, tmp_path, damage, message):
    with pytest.raises(ReleaseFormatError, match=message):
        UAEReconstructionPipeline.from_uae_release(damaged(release, tmp_path, damage))


def test_a_misshapen_base_tensor_is_named(release, tmp_path):
    """The release's load_state_dict would fail on it too (strict=False still checks shapes): named, not a torch error."""
    key = "model.base_model.model.norm.weight"

    def shrink(root):
        for file in (root / "llm_lora").glob("*.safetensors"):
            _rewrite(file, lambda t: t | {key: t[key][:-1]} if key in t else t)

    with pytest.raises(ReleaseFormatError, match=rf"slot 'llm_lora': '{key}' has shape \(63,\), .* is \(64,\)"):
        UAEReconstructionPipeline.from_uae_release(damaged(release, tmp_path, shrink))
