"""What the trainer does with bad data, rewards and settings: a clear error naming what and where, or a handled case
that is logged and warned about, never a silent wrong number."""

import logging

import pytest
import torch
from peft import LoraConfig
from tiny_trainer_configs import TRAINER_OF

from uae_hf.sample_data import skimage_photos


@pytest.fixture()
def config(make_config):
    def make(stage, **overrides):
        own = dict(max_steps=1, max_completion_length=6, lr_scheduler_type="linear")
        if stage != "understanding":  # the DiT LoRA of the decoder stages
            own |= dict(decoder_lora_r=4, decoder_lora_alpha=8)
        return make_config(stage, **own | overrides)

    return make


def trainer_for(pipe, args, dataset=None, **kwargs):
    """The trainer of the config's stage."""
    return TRAINER_OF[type(args)](model=pipe.vlm, decoder=pipe, args=args, processing_class=pipe.processor,
                                  train_dataset=dataset if dataset is not None else skimage_photos(32), **kwargs)


def test_a_reward_function_returning_the_wrong_length_is_named(fresh_pipe, config):
    def one_reward_too_few(completions, **kwargs):
        return [0.0] * (len(completions) - 1)

    trainer = trainer_for(fresh_pipe, config("understanding"), reward_funcs=[one_reward_too_few],
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with pytest.raises(ValueError, match="'one_reward_too_few' returned 3 rewards, but 4 were expected"):
        trainer.train()


def test_a_decoder_that_returns_nan_gives_no_reward_and_moves_no_weight(fresh_pipe, config, caplog):
    with torch.no_grad():  # the VAE decodes NaN: every reconstruction is non-finite
        fresh_pipe.vae.decoder.conv_out.bias.fill_(float("nan"))
    # no weight decay: AdamW's decoupled decay (Flow-GRPO's 1e-4 by default) shrinks weights whatever the gradient
    trainer = trainer_for(fresh_pipe, config("generation", weight_decay=0.0))
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    with caplog.at_level(logging.WARNING):
        trainer.train()
    logged = trainer.state.log_history[0]
    assert logged["reconstruction/nan_count"] == 4 and logged["advantages/abs_mean"] == 0.0
    assert "non_finite_rewards" in trainer.health.warned
    assert any("4 of 4 reconstruction rewards are NaN" in record.getMessage() for record in caplog.records)
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(after[name], value) for name, value in before.items())  # finite and untouched


def test_cold_start_captions_only_the_rows_without_a_caption(fresh_pipe, config, monkeypatch):
    dataset = skimage_photos(32).select(range(4))
    captions = ["a photograph", "", "   ", None]
    dataset = dataset.remove_columns("caption").add_column("caption", captions)
    trainer = trainer_for(fresh_pipe, config("cold_start"), dataset)
    seen = []
    reconstruct = trainer.model.reconstruct
    monkeypatch.setattr(trainer.model, "reconstruct", lambda batch, generator: seen.append(batch) or
                        reconstruct(batch, generator))
    trainer.train()
    assert seen[0][0] == "a photograph" and all(isinstance(caption, str) for caption in seen[0])
    assert len(seen[0]) == 4


def test_pretraining_names_rows_without_a_caption(fresh_pipe, config):
    dataset = skimage_photos(32).select(range(4))
    dataset = dataset.remove_columns("caption").add_column("caption", ["a photograph", None, "", "a cat"])
    trainer = trainer_for(fresh_pipe, config("pretrain", caption_dropout=0.0), dataset)
    with pytest.raises(ValueError, match="'caption' is empty or missing in 2 of 4 rows"):
        trainer.train()


def test_non_string_captions_are_an_error(fresh_pipe, config):
    dataset = skimage_photos(32).select(range(4)).remove_columns("caption").add_column("caption", [["a", "list"]] * 4)
    trainer = trainer_for(fresh_pipe, config("pretrain"), dataset)
    with pytest.raises(TypeError, match="'caption' holds a list"):
        trainer.train()


def test_checkpoints_hold_no_hub_token(fresh_pipe, config, tmp_path):
    args = config("cold_start", save_strategy="steps", save_steps=1, hub_token="hf_SECRETTOKEN123")
    trainer = trainer_for(fresh_pipe, args)
    trainer.train()
    trainer.save_model()
    written = [path for path in (tmp_path / "cold_start").rglob("*") if path.is_file()]
    assert any(path.name == "training_args.bin" for path in written)
    assert not [path for path in written if b"SECRETTOKEN" in path.read_bytes()]
    assert trainer.args.hub_token == "hf_SECRETTOKEN123"  # the run itself can still push
