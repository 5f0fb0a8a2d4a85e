"""Exact resume and atomic checkpoints, every stage: a run that crashes while saving step 4 resumes from its last
complete checkpoint (step 2) and ends with the same weights, bit for bit, as a run that was never interrupted."""

import pytest
import torch
from peft import LoraConfig
from transformers import Qwen2_5_VLForConditionalGeneration

from uae_hf import ColdStartTrainer, DiffusionNFTTrainer, FlowGRPOTrainer, UnifiedGRPOTrainer, load_uae_pipeline
from uae_hf.sample_data import skimage_photos

RESUME_STATE_NAME = "resume_state.safetensors"

STAGES = {
    "understanding": dict(learning_rate=1e-2),
    "generation": dict(learning_rate=1e-2, ema_decay=0.9, ema_update_interval=1, decoder_lora_r=4,
                       decoder_lora_alpha=8),
    "generation_nft": dict(learning_rate=1e-2, old_policy_decay_rate=0.3, decoder_lora_r=4, decoder_lora_alpha=8),
    "cold_start": dict(learning_rate=1e-3, cold_start_trainable=["projector", "llm_lora", "dit_lora"],
                       decoder_lora_r=4, decoder_lora_alpha=8, llm_lora_r=4, llm_lora_alpha=8),
}

TRAINER_CLASSES = {"generation": FlowGRPOTrainer, "generation_nft": DiffusionNFTTrainer, "cold_start": ColdStartTrainer}


@pytest.fixture()
def make_trainer(make_config, tiny_dir):
    def make(stage, output_dir):
        args = make_config(stage, output_dir=output_dir, max_steps=4, save_strategy="steps", save_steps=2,
                           lr_scheduler_type="linear", warmup_steps=1, **STAGES[stage])
        pipe = load_uae_pipeline(tiny_dir / "decoder", tiny_dir / "encoder", tiny_dir / "projector")
        if stage == "understanding":
            encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "encoder")
            return UnifiedGRPOTrainer(model=encoder, decoder=pipe, args=args, train_dataset=skimage_photos(32),
                                      processing_class=pipe.processor,
                                      peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        trainer_class = TRAINER_CLASSES[stage]
        return trainer_class(model=pipe.vlm, decoder=pipe, args=args, train_dataset=skimage_photos(32),
                             processing_class=pipe.processor)

    return make


def final_state(trainer) -> dict[str, torch.Tensor]:
    """Copies of the trained weights (and their EMA, old policy) as they are now."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    state = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    copies = trainer.weight_copies() if hasattr(trainer, "weight_copies") else {}
    return state | {f"{prefix}.{name}": value.clone() for prefix, copy in copies.items()
                    for name, value in copy.weights.items()}


def logged_after_step_2(trainer) -> list[dict]:
    return [{key: value for key, value in entry.items() if key == "loss" or key.startswith("reward")}
            for entry in trainer.state.log_history if entry.get("step", 0) > 2 and "loss" in entry]


def crash_while_saving_step(trainer, step: int) -> None:
    """Make the save of `step` fail after the weights and optimizer are written, before the RNG states."""
    save_rng_state = trainer._save_rng_state

    def crashing(output_dir):
        if trainer.state.global_step == step:
            raise RuntimeError("simulated crash while saving")
        save_rng_state(output_dir)

    trainer._save_rng_state = crashing


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_interrupted_run_resumes_bit_identically(stage, make_trainer, tmp_path):
    uninterrupted = make_trainer(stage, tmp_path / "uninterrupted")
    initial = final_state(uninterrupted)
    uninterrupted.train()
    expected = final_state(uninterrupted)

    crashed = make_trainer(stage, tmp_path / "crashed")
    crash_while_saving_step(crashed, 4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    run = tmp_path / "crashed"
    assert (run / "tmp-checkpoint-4").is_dir() and not (run / "checkpoint-4").exists()  # the partial save is aside
    assert (run / "checkpoint-2" / "trainer_state.json").is_file()  # the previous checkpoint is intact

    resumed = make_trainer(stage, run)
    resumed.train(resume_from_checkpoint=True)  # picks checkpoint-2, the last complete one
    assert resumed.state.global_step == 4
    assert (run / "checkpoint-4" / "rng_state.pth").is_file() and not (run / "tmp-checkpoint-4").exists()
    got = final_state(resumed)
    assert got.keys() == expected.keys() and len(got) > 0
    assert [name for name in expected if not torch.equal(got[name], expected[name])] == []
    assert any(not torch.equal(got[name], initial[name]) for name in got)  # trained: not two untouched models
    assert logged_after_step_2(resumed) == logged_after_step_2(uninterrupted)  # same rewards and losses too
    if stage != "understanding":
        assert (run / "checkpoint-2" / RESUME_STATE_NAME).is_file()


def test_resuming_from_a_folder_without_resume_state_says_what_is_missing(make_trainer, tmp_path):
    trainer = make_trainer("cold_start", tmp_path / "run")
    (tmp_path / "not-a-checkpoint").mkdir()
    (tmp_path / "not-a-checkpoint" / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match=f"has no {RESUME_STATE_NAME}"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "not-a-checkpoint"))


def test_rotation_keeps_the_newest_complete_checkpoints(make_trainer, tmp_path):
    trainer = make_trainer("cold_start", tmp_path / "run")
    trainer.args.save_steps, trainer.args.save_total_limit = 1, 2
    trainer.train()
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["checkpoint-3", "checkpoint-4"]
