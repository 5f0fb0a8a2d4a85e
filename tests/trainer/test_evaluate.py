"""`evaluate()` of every trainer on an `eval_dataset`: held-out round trips (the encoder captions each image, the
decoder reconstructs it, the reward's backbones score the pair), plus the stage's own loss where it has one."""

import math

import pytest
from transformers import Qwen2_5_VLForConditionalGeneration
from trl import GRPOTrainer

from uae_hf import ColdStartTrainer, DecoderPretrainingTrainer, FlowGRPOTrainer, UnifiedGRPOTrainer
from uae_hf.sample_data import skimage_photos

DECODER_STAGES = {  # stage → its trainer, and whether it has a held-out loss
    "generation": (FlowGRPOTrainer, False),  # a policy-gradient surrogate means nothing on held-out images
    "pretrain": (DecoderPretrainingTrainer, True),
    "cold_start": (ColdStartTrainer, True),
}


@pytest.fixture(scope="module")
def photos():
    """Four photos to train on and four held-out ones."""
    photos = skimage_photos(64)
    return photos.select(range(4)), photos.select(range(4, 8))


def metrics(results: dict, prefix: str = "eval") -> dict:
    """The evaluated numbers of `results` (a returned or logged record), without the prefix and the runtime."""
    return {key.removeprefix(f"{prefix}_"): value for key, value in results.items()
            if key.startswith(f"{prefix}_") and key != f"{prefix}_runtime"}


@pytest.mark.parametrize("stage", list(DECODER_STAGES))
def test_decoder_trainers_evaluate_the_held_out_round_trip(stage, make_config, fresh_pipe, photos):
    trainer_class, has_loss = DECODER_STAGES[stage]
    train, held_out = photos
    args = make_config(stage, max_steps=1, eval_strategy="steps", eval_steps=1)
    trainer = trainer_class(decoder=fresh_pipe, args=args, train_dataset=train, eval_dataset=held_out)
    before = metrics(trainer.evaluate())
    trainer.train()
    # the evaluation training logged (the one before training is logged at step 0)
    during = [metrics(record) for record in trainer.state.log_history if "eval_reward" in record and record["step"]]
    after = metrics(trainer.evaluate())

    assert 0 < after["reconstruction/clip"] <= 1 and after["samples"] == 4
    assert after["reward"] == pytest.approx(after["reconstruction/clip"], abs=1e-6)  # the reward is CLIP alone here
    assert ("loss" in after) == has_loss and (not has_loss or math.isfinite(after["loss"]))
    # eval_strategy="steps": training evaluated at its one step, on the very weights evaluate() sees afterwards
    assert during == [after]
    # noise and captions are seeded: the same weights evaluate to the same numbers, whatever the prefix
    assert metrics(trainer.evaluate(metric_key_prefix="test"), "test") == after
    # one step moved the trained weights, and with them the held-out numbers
    assert after["reconstruction/clip"] != before["reconstruction/clip"]
    assert not has_loss or after["loss"] != before["loss"]


def test_evaluate_without_an_eval_dataset_says_so(make_config, fresh_pipe, photos):
    trainer = DecoderPretrainingTrainer(decoder=fresh_pipe, args=make_config("pretrain"), train_dataset=photos[0])
    with pytest.raises(ValueError, match="needs an eval_dataset"):
        trainer.evaluate()


def test_unified_grpo_evaluates_with_trl(make_config, pipe, tiny_dir, photos):
    train, held_out = photos
    trainer = UnifiedGRPOTrainer(
        model=Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "encoder"), decoder=pipe,
        args=make_config("understanding", max_steps=1, eval_strategy="steps", eval_steps=1), train_dataset=train,
        eval_dataset=held_out, processing_class=pipe.processor,
    )
    assert isinstance(trainer, GRPOTrainer) and trainer.num_generations == 4  # GRPOTrainer.__init__ ran
    trainer.train()
    assert len([record for record in trainer.state.log_history if "eval_reward" in record]) == 1
    results = trainer.evaluate()
    assert 0 < results["eval_reconstruction/clip"] <= 1
    assert math.isfinite(results["eval_reward"]) and "eval_rewards/reconstruction/mean" in results
