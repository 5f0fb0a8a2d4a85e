"""DecoderPretrainingTrainer (rectified flow on long captions) and ColdStartTrainer (semantic loss through the
sampler)."""

import json
import statistics
from pathlib import Path

import datasets
import pytest
import torch

from uae_hf import ColdStartTrainer, DecoderPretrainingTrainer, UAEProjector, load_uae_pipeline
from uae_hf.sample_data import skimage_photos

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@pytest.fixture()
def config(make_config):
    def make(stage, **overrides):
        return make_config(stage, **dict(learning_rate=1e-3, decoder_num_inference_steps=4) | overrides)

    return make


@pytest.fixture(scope="module")
def photos4():
    return skimage_photos(64).select(range(4))


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_cold_start_gradients_reach_every_trainable_part_and_nothing_else_changes(fresh_pipe, config, photos4):
    args = config("cold_start", cold_start_trainable=["projector", "llm_lora", "dit_lora"])
    vae, clip = snapshot(fresh_pipe.vae), None
    trainer = ColdStartTrainer(decoder=fresh_pipe, args=args, train_dataset=photos4)
    assert isinstance(trainer, ColdStartTrainer)
    clip = snapshot(trainer.reconstruction_reward.similarity.embedders["clip"].model)
    rows = [photos4[i] for i in range(2)]
    assert len(set(len(row["caption"]) for row in rows)) == 2  # captions of unequal length share the batch
    trainer.compute_loss(trainer.model, rows).backward()
    grads = {name: p.grad for name, p in trainer.model.named_parameters() if p.requires_grad}
    for part in ("projector.projector.", "vlm.", "transformer."):
        group = {name: grad for name, grad in grads.items() if name.startswith(part)}
        assert group and any(grad is not None and grad.abs().sum() > 0 for grad in group.values()), part
    assert all("lora" in name for name in grads if not name.startswith("projector"))
    trainer.model.zero_grad(set_to_none=True)

    bases = {"vlm": snapshot(fresh_pipe.vlm), "dit": snapshot(fresh_pipe.transformer)}
    trainer.train()
    for key, module in (("vlm", fresh_pipe.vlm), ("dit", fresh_pipe.transformer)):
        after = snapshot(module)
        assert all(torch.equal(after[name], value) for name, value in bases[key].items() if "lora" not in name)
        assert any(not torch.equal(after[name], value) for name, value in bases[key].items() if "lora_B" in name)
    assert all(torch.equal(p, vae[n]) for n, p in snapshot(fresh_pipe.vae).items())
    embedder = trainer.reconstruction_reward.similarity.embedders["clip"].model
    assert all(torch.equal(p, clip[n]) for n, p in snapshot(embedder).items())


@pytest.mark.slow
def test_cold_start_loss_falls_on_a_fixed_batch(fresh_pipe, config, photos4):
    args = config("cold_start", max_steps=30, reward_fixed_noise=True,
                  cold_start_trainable=["projector", "llm_lora", "dit_lora"])
    trainer = ColdStartTrainer(decoder=fresh_pipe, args=args, train_dataset=photos4)
    trainer.train()
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    assert statistics.mean(losses[-5:]) < 0.9 * statistics.mean(losses[:5]), losses


@pytest.mark.slow
def test_pretraining_loss_falls_over_a_few_hundred_steps(fresh_pipe, config, photos4):
    args = config("pretrain", max_steps=200, logging_steps=1)
    trainer = DecoderPretrainingTrainer(decoder=fresh_pipe, args=args, train_dataset=photos4)
    assert isinstance(trainer, DecoderPretrainingTrainer)
    trainer.train()
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    first, last = losses[:20], losses[-20:]
    assert statistics.mean(last) < statistics.mean(first) - 3 * statistics.stdev(first) / 20**0.5, (first, last)


def test_saved_parts_load_where_the_pipeline_expects_them(fresh_pipe, config, tiny_dir, photos4, tmp_path):
    trainer = DecoderPretrainingTrainer(decoder=fresh_pipe, train_dataset=photos4,
                                        args=config("pretrain", learning_rate=1e-2))
    trainer.train()
    out = tmp_path / "pretrained"
    trainer.save_model(str(out))
    trainer.args.output_dir = str(out)
    trainer.create_model_card()
    projector = UAEProjector.from_pretrained(out / "projector")
    assert torch.equal(projector.projector[0].weight, fresh_pipe.projector.projector[0].weight)
    card = (out / "README.md").read_text()
    assert "pretrain" in card and LORA_WEIGHT_NAME in card

    fresh = load_uae_pipeline(tiny_dir / "decoder", tiny_dir / "encoder", out / "projector")
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(out, weight_name=LORA_WEIGHT_NAME)
    kwargs = dict(height=64, width=64, num_inference_steps=3, output_type="np")
    expected = fresh_pipe.generate(["a cat on a mat"], generator=[torch.Generator().manual_seed(3)], **kwargs).images
    assert (fresh.generate(["a cat on a mat"], generator=[torch.Generator().manual_seed(3)], **kwargs).images
            == expected).all()


def test_cold_start_llm_adapter_saves_as_a_peft_folder(fresh_pipe, config, tiny_dir, photos4, tmp_path):
    args = config("cold_start", max_steps=1, cold_start_trainable=["llm_lora"])
    trainer = ColdStartTrainer(decoder=fresh_pipe, args=args, train_dataset=photos4)
    trainer.train()
    trainer.save_model(str(tmp_path / "cs"))
    config = json.loads((tmp_path / "cs" / "encoder_adapter" / "adapter_config.json").read_text())
    base = config["base_model_name_or_path"]  # from the adapter's folder, never this machine's absolute path
    assert not Path(base).is_absolute() and (tmp_path / "cs" / "encoder_adapter" / base).resolve() == \
        (tiny_dir / "encoder").resolve(), base
    assert not (tmp_path / "cs" / "projector").exists()
    other = load_uae_pipeline(tiny_dir / "decoder", tiny_dir / "encoder", tiny_dir / "projector")
    other.load_encoder_adapter(tmp_path / "cs" / "encoder_adapter")


def test_bad_configurations(fresh_pipe, config):
    no_captions = skimage_photos(32).remove_columns("caption")
    with pytest.raises(ValueError, match="'caption' column"):
        DecoderPretrainingTrainer(decoder=fresh_pipe, args=config("pretrain"), train_dataset=no_captions)
    with pytest.raises(ValueError, match="cold_start_trainable"):
        config("cold_start", cold_start_trainable=["vae"])
    with pytest.raises(ValueError, match="no 'image'"):
        ColdStartTrainer(decoder=fresh_pipe, args=config("cold_start"),
                         train_dataset=datasets.Dataset.from_dict({"caption": ["a"]}))


def test_a_fresh_projector_is_sized_from_encoder_and_dit(tiny_dir):
    from uae_hf.trainer.train_script import _assemble_decoder

    pipe = _assemble_decoder(str(tiny_dir / "decoder"), str(tiny_dir / "encoder"), "new")
    config = pipe.projector.config
    assert (config.in_features, config.hidden_features, config.out_features) == (64, 256, 64)
    assert pipe.config.conditioning_mode == "embeddings" and pipe.text_encoder_3 is None
