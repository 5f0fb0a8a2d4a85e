"""UnifiedGRPOTrainer: GRPO on the encoder, the decoder as reward ("Generation for Understanding")."""

import json
import statistics
from pathlib import Path

import datasets
import evaluate
import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from uae_hf import (
    ImageSimilarity,
    ReconstructionReward,
    UAEReconstructionPipeline,
    UnifiedGRPOTrainer,
    caption_images,
    encode_generate_prompts,
)
from uae_hf.sample_data import skimage_photos

LORA = dict(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")


def encoder_model(tiny_dir):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "encoder")


@pytest.fixture()
def config(make_config, backbone_checkpoints, tmp_path):
    def make(**overrides):
        own = dict(output_dir=str(tmp_path / "run"),
                   backbone_checkpoints={name: backbone_checkpoints[name] for name in ("clip", "dinov2")})
        return make_config("understanding", **own | overrides)

    return make


@pytest.fixture()
def processor(tiny_dir):
    return AutoProcessor.from_pretrained(tiny_dir / "encoder")


@pytest.fixture(scope="module")
def photos_dataset():
    return skimage_photos(64)


def test_reward_equals_unified_bench_on_the_same_pair(pipe, backbone_checkpoints, photos):
    similarity = ImageSimilarity(("clip",), {"clip": backbone_checkpoints["clip"]})
    reward = ReconstructionReward(pipe, similarity, height=64, width=64, num_inference_steps=3)
    caption = "an astronaut next to a flag"
    (value,) = reward(prompts=[None], completions=[[{"role": "assistant", "content": caption}]], image=[photos[0]])
    reconstruction = pipe.generate([caption], generator=reward.noise_generators(1, step=0), height=64, width=64,
                                   num_inference_steps=3).images[0]
    bench = evaluate.load("unified_bench", "clip", checkpoints={"clip": backbone_checkpoints["clip"]})
    assert value == pytest.approx(bench.compute(predictions=[reconstruction], references=[photos[0]])["clip"], abs=1e-6)


def test_reconstructions_per_caption_are_averaged_and_weights_normalised(pipe, backbone_checkpoints, photos):
    both = ImageSimilarity(("clip", "dinov2"), {k: backbone_checkpoints[k] for k in ("clip", "dinov2")})
    reward = ReconstructionReward(pipe, both, weights={"clip": 3, "dinov2": 1}, reconstructions_per_caption=2,
                                  height=64, width=64, num_inference_steps=2)
    logged = {}
    (value,) = reward(prompts=[None], completions=["a cup"], image=[photos[1]], log_metric=logged.__setitem__)
    decodes = reward.reconstruct(["a cup"])
    assert len(decodes) == 2 and decodes[0].tobytes() != decodes[1].tobytes()  # two noise draws
    scores = both.scores(decodes, [photos[1]] * 2)
    expected = float((0.75 * scores["clip"] + 0.25 * scores["dinov2"]).mean())
    assert value == pytest.approx(expected, abs=1e-6)
    assert logged["caption_words/mean"] == 2 and logged["reconstruction/nan_count"] == 0


class NaNOnFirstCaption(UAEReconstructionPipeline):
    """The real decoder, whose first reconstruction of every call comes out as NaN (a failed decode)."""

    def generate(self, captions, **kwargs):
        out = super().generate(captions, **kwargs)
        out.images[0] = float("nan")
        return out


def test_a_failed_reconstruction_gives_that_sample_no_reward(pipe, backbone_checkpoints, photos):
    flaky = NaNOnFirstCaption.from_pipe(pipe)
    similarity = ImageSimilarity(("clip",), {"clip": backbone_checkpoints["clip"]})
    reward = ReconstructionReward(flaky, similarity, height=64, width=64, num_inference_steps=2)
    logged = {}
    values = reward(prompts=[None] * 2, completions=["a", "b"], image=photos[:2], log_metric=logged.__setitem__)
    assert values[0] is None and isinstance(values[1], float)
    assert logged["reconstruction/nan_count"] == 1


@pytest.mark.slow
@pytest.mark.outcome
def test_grpo_raises_the_reconstruction_reward(tiny_dir, pipe, processor, config, photos_dataset):
    """A seeded run: the decoder's reward, not noise, drives the policy (fixed noise: reward = f(caption))."""
    args = config(max_steps=40, per_device_train_batch_size=8, num_generations=8, reward_fixed_noise=True,
                  decoder_guidance_scale=30.0, decoder_num_inference_steps=4, heldout_backbones=["dinov2"])
    trainer = UnifiedGRPOTrainer(model=encoder_model(tiny_dir), decoder=pipe, args=args,
                                 train_dataset=photos_dataset.select([0]), processing_class=processor)
    trainer.train()
    logs = [record for record in trainer.state.log_history if "reward" in record]
    rewards = [record["reward"] for record in logs]
    assert len(rewards) == 40
    noise = statistics.stdev(rewards[:10])
    gain = statistics.mean(rewards[-5:]) - statistics.mean(rewards[:5])
    assert gain > 5 * noise > 0, (gain, noise, rewards)
    assert logs[-1]["entropy"] < logs[0]["entropy"]
    assert "reconstruction/heldout_dinov2" in logs[-1] and "caption_tokens/max" in logs[-1]


def test_adapter_saves_reloads_and_reproduces_greedy_captions(tiny_dir, pipe, processor, config, photos_dataset,
                                                              photos, tmp_path):
    args = config(log_reconstructions_steps=1, heldout_backbones=["dinov2"])
    trainer = UnifiedGRPOTrainer(model=encoder_model(tiny_dir), decoder=pipe, args=args,
                                 train_dataset=photos_dataset.remove_columns("name"), processing_class=processor,
                                 peft_config=LoraConfig(**LORA))
    trainer.train()
    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    trainer.args.output_dir = str(out)
    trainer.create_model_card()
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert (out / "processor_config.json").exists() or (out / "preprocessor_config.json").exists()
    assert not any(path.name.startswith("diffusion_pytorch_model") for path in out.rglob("*"))  # decoder not saved
    # its base is named as a path from the adapter folder, never this machine's absolute path
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert not Path(base).is_absolute() and (out / base).resolve() == (tiny_dir / "encoder").resolve(), base
    card = (out / "README.md").read_text()
    assert "UnifiedGRPOTrainer" in card and "clip" in card and "peft" in card  # the card names its trainer
    assert list((tmp_path / "run" / "reconstructions").glob("step-*.png"))

    greedy = dict(do_sample=False, max_new_tokens=8, no_repeat_ngram_size=1)
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    expected = caption_images(trained, processor, photos, **greedy)
    reloaded = PeftModel.from_pretrained(encoder_model(tiny_dir), out).eval()
    assert caption_images(reloaded, AutoProcessor.from_pretrained(out), photos, **greedy) == expected
    assert caption_images(encoder_model(tiny_dir).eval(), processor, photos, **greedy) != expected


def test_shared_encoder_is_read_with_its_adapter_disabled(tiny_dir, pipe, processor, config, photos_dataset):
    model = encoder_model(tiny_dir)
    decoder = UAEReconstructionPipeline.from_pipe(pipe, vlm=model)  # one copy of the encoder in memory
    trainer = UnifiedGRPOTrainer(model=model, decoder=decoder, args=config(), train_dataset=photos_dataset,
                                 processing_class=processor, peft_config=LoraConfig(**LORA))
    trainer.train()
    frozen = encode_generate_prompts(encoder_model(tiny_dir), processor.tokenizer, pipe.projector, ["a cat"])
    with torch.no_grad():
        adapted = encode_generate_prompts(decoder.vlm, processor.tokenizer, pipe.projector, ["a cat"])
        with trainer._decoder_text_path():
            inside = encode_generate_prompts(decoder.vlm, processor.tokenizer, pipe.projector, ["a cat"])
    assert not torch.allclose(adapted.prompt_embeds, frozen.prompt_embeds, atol=1e-4)  # the adapter trained
    torch.testing.assert_close(inside.prompt_embeds, frozen.prompt_embeds, atol=1e-5, rtol=0)


def test_text_mode_with_a_plain_sd3_decoder_and_extra_rewards(tiny_dir, pipe, processor, config, photos_dataset):
    from diffusers import StableDiffusion3Pipeline

    def short_caption(completions, **kwargs):
        return [-len(str(completion)) / 100 for completion in completions]

    sd3 = StableDiffusion3Pipeline.from_pretrained(tiny_dir / "decoder")
    trainer = UnifiedGRPOTrainer(model=encoder_model(tiny_dir), decoder=sd3, args=config(),
                                 train_dataset=photos_dataset, processing_class=processor, reward_funcs=[short_caption])
    trainer.train()
    last = [record for record in trainer.state.log_history if "reward" in record][-1]
    assert "rewards/short_caption/mean" in last and "rewards/reconstruction/mean" in last
    assert "reconstruction/truncated_rate" in last
    assert 0.0 <= last["reward/groups_without_variation"] <= 1.0


def test_bad_input_fails_at_construction(tiny_dir, pipe, processor, config):
    no_images = datasets.Dataset.from_dict({"text": ["a", "b"]})
    with pytest.raises(ValueError, match="no 'image'"):
        UnifiedGRPOTrainer(model=encoder_model(tiny_dir), decoder=pipe, args=config(), train_dataset=no_images,
                           processing_class=processor)
    with pytest.raises(TypeError, match="StableDiffusion3Pipeline"):
        UnifiedGRPOTrainer(model=encoder_model(tiny_dir), decoder="not a pipeline", args=config(),
                           processing_class=processor)
    with pytest.raises(ValueError, match="at least 2"):
        config(num_generations=1, per_device_train_batch_size=1)
    with pytest.raises(TypeError, match="stage"):  # one config per trainer: UnifiedGRPOConfig trains stage 2 only
        config(stage="everything")
    with pytest.raises(ValueError, match=r"multiple of 4 \(num_iterations × steps_per_generation\)"):
        config(num_iterations=2, steps_per_generation=2, save_strategy="steps", save_steps=1)
    with pytest.raises(ValueError, match="must be that model"):
        UnifiedGRPOTrainer(model=encoder_model(tiny_dir), decoder=pipe, args=config(decoder_text_encoder="policy"),
                           train_dataset=skimage_photos(32), processing_class=processor)
