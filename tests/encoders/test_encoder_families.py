"""Chat VLMs beside Qwen2.5-VL as the encoder, through the one generic path (AutoModelForImageTextToText + the
processor's whole output): the Qwen3-VL twin (M-RoPE, DeepStack, `image_grid_thw`) and the Gemma 3 twin
(`token_type_ids`, pooled soft image tokens, a hidden size of its own, a chat template that refuses unknown roles),
in every stage: seeded captioning, stage-2 GRPO with its LoRA and the "ref" adapter, a UAE pipeline built around the
LLM (pre-training, cold start, round trip), bf16, the tiny recipes through `uae-hf train`, and bad input."""

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from trainer.tiny_trainer_configs import tiny_config
from transformers import AutoModelForImageTextToText

from uae_hf import (
    CAPTION_INSTRUCTION,
    ColdStartTrainer,
    DecoderPretrainingTrainer,
    UAEProjector,
    UAEReconstructionPipeline,
    UnifiedGRPOTrainer,
    caption_images,
    encode_generate_prompts,
    load_uae_pipeline,
)
from uae_hf.cli import CommandLineError, main
from uae_hf.pipelines.uae_reconstruction import caption_role, load_encoder
from uae_hf.pipelines.uae_reconstruction.conditioning import generate_prompt_ids
from uae_hf.sample_data import skimage_photos
from uae_hf.trainer.decoder_trainer import LORA_WEIGHT_NAME
from uae_hf.trainer.train_script import _assemble_decoder

FAMILIES = ["qwen3_vl", "gemma3"]
RECIPES = Path(__file__).parents[2] / "examples" / "recipes"
GREEDY = dict(do_sample=False, max_new_tokens=8, no_repeat_ngram_size=1)


def generators(seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def family_dir(tiny_dir, family):
    return tiny_dir / "encoders" / family


@pytest.fixture(scope="module")
def encoder(family_dir):
    """The family's twin and processor, frozen by the tests that share them."""
    return load_encoder(family_dir)


@pytest.fixture(scope="module")
def sized_photos(photos):
    """Photos of three sizes: Qwen3-VL gives them different numbers of image tokens (so a batch is padded)."""
    return [photo.resize(size) for photo, size in zip(photos, [(64, 96), (96, 64), (128, 128)])]


def test_seeded_captions_do_not_depend_on_the_batch(encoder, sized_photos):
    vlm, processor = encoder
    batch = caption_images(vlm, processor, sized_photos, max_new_tokens=12, generator=generators([3, 4, 5]))
    alone = [caption_images(vlm, processor, [photo], max_new_tokens=12, generator=generators([seed]))[0]
             for photo, seed in zip(sized_photos, [3, 4, 5])]
    assert batch == alone and len(set(batch)) == 3
    assert caption_images(vlm, processor, sized_photos, max_new_tokens=12, generator=generators([6, 7, 8])) != batch
    # the image reaches the model through the processor's own inputs (Gemma 3's token_type_ids, Qwen3-VL's grid)
    same_seed = caption_images(vlm, processor, sized_photos[:2], max_new_tokens=12, generator=generators([3, 3]))
    assert same_seed[0] != same_seed[1]


def test_greedy_captions_are_what_the_chat_template_path_gives(encoder, sized_photos):
    """`caption_images` feeds the model what transformers' own `apply_chat_template(tokenize=True)` gives it: one BOS
    for Gemma 3 (its template writes it), its token_type_ids, Qwen3-VL's grid."""
    vlm, processor = encoder
    messages = [{"role": "user", "content": [{"type": "text", "text": CAPTION_INSTRUCTION},
                                             {"type": "image", "image": sized_photos[0]}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    ids = vlm.generate(**inputs, do_sample=False, max_new_tokens=8, no_repeat_ngram_size=1)
    expected = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    assert caption_images(vlm, processor, sized_photos[:1], **GREEDY) == [expected]


@pytest.mark.parametrize("folder, role", [("encoder", "generate"), ("encoders/qwen3_vl", "user"),
                                          ("encoders/gemma3", "user")])
def test_captions_are_read_in_the_generate_role_where_the_template_has_it(tiny_dir, folder, role):
    """Qwen2.5-VL's template renders any role (the released model reads the "generate" role); Qwen3-VL's drops
    unknown roles and Gemma 3's refuses them: there the caption is a user turn, never left out."""
    _, processor = load_encoder(tiny_dir / folder)
    assert caption_role(processor.tokenizer) == role
    (ids,) = generate_prompt_ids(processor.tokenizer, ["a red ball"])
    assert "a red ball" in processor.tokenizer.decode(ids)


def test_grpo_trains_the_encoder_s_lora_which_peft_and_the_pipeline_load(family_dir, encoder, pipe, sized_photos,
                                                                        tiny_dir, tmp_path):
    """Stage 2 from a PEFT model that carries an adapter (as SFT or cold start leaves it): TRL keeps a frozen copy as
    the "ref" adapter (the KL reference); the trained adapter saves, reloads with PEFT and in a UAE pipeline, and
    changes the captions."""
    _, processor = encoder
    torch.manual_seed(0)
    policy = get_peft_model(AutoModelForImageTextToText.from_pretrained(family_dir),
                            LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian"))
    before = caption_images(policy.eval(), processor, sized_photos, **GREEDY)
    args = tiny_config("understanding", tiny_dir, tmp_path / "run", beta=0.04, learning_rate=5e-2, decoder_height=32,
                       decoder_width=32)
    trainer = UnifiedGRPOTrainer(model=policy, decoder=pipe, args=args, train_dataset=skimage_photos(64),
                                 processing_class=processor)
    reference = {name: p.detach().clone() for name, p in policy.named_parameters() if ".ref." in name}
    assert reference and set(policy.peft_config) == {"default", "ref"}
    trainer.train()
    assert all(torch.equal(p, reference[name]) for name, p in policy.named_parameters() if ".ref." in name)
    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    trained = caption_images(policy.eval(), processor, sized_photos, **GREEDY)
    assert trained != before

    reloaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(family_dir), out).eval()
    assert caption_images(reloaded, processor, sized_photos, **GREEDY) == trained
    round_trip = load_uae_pipeline(tiny_dir / "decoder", family_dir, _projector_for(reloaded, tmp_path))
    round_trip.load_encoder_adapter(str(out))
    assert round_trip.caption(sized_photos, **GREEDY) == trained


def _projector_for(vlm, folder: Path) -> Path:
    hidden = vlm.config.get_text_config().hidden_size
    torch.manual_seed(0)
    UAEProjector(hidden, 4 * hidden, 64).save_pretrained(folder / "projector")
    return folder / "projector"


def test_a_uae_pipeline_around_the_llm_pretrains_cold_starts_and_round_trips(family_dir, tiny_dir, photos, tmp_path):
    """`--projector new` sizes the projector from the encoder LLM's hidden size; pre-training (projector + DiT LoRA)
    and cold start (projector + LLM LoRA) read captions through that LLM's hidden states; the saved parts rebuild a
    pipeline that round-trips an image exactly as the trained one does."""
    pipe = _assemble_decoder(str(tiny_dir / "decoder"), str(family_dir), "new")
    pipe.set_progress_bar_config(disable=True)
    hidden = pipe.vlm.config.get_text_config().hidden_size
    assert pipe.projector.config.in_features == hidden and pipe.config.conditioning_mode == "embeddings"
    data = skimage_photos(64).select(range(4))
    settings = dict(max_steps=2, learning_rate=1e-2, decoder_num_inference_steps=2, decoder_height=32, decoder_width=32)
    pretraining = DecoderPretrainingTrainer(decoder=pipe, train_dataset=data,
                                            args=tiny_config("pretrain", tiny_dir, tmp_path / "pretrain", **settings))
    projector = pipe.projector.projector[0].weight.detach().clone()
    pretraining.train()
    pretraining.save_model(str(tmp_path / "pretrain"))
    assert not torch.equal(pipe.projector.projector[0].weight, projector)

    llm = {name: p.detach().clone() for name, p in pipe.vlm.named_parameters()}
    cold_start = ColdStartTrainer(decoder=pipe, train_dataset=data, args=tiny_config(
        "cold_start", tiny_dir, tmp_path / "cold_start", cold_start_trainable=["projector", "llm_lora"], **settings))
    cold_start.train()
    cold_start.save_model(str(tmp_path / "cold_start"))
    after = dict(pipe.vlm.named_parameters())
    base = {name.replace(".base_layer", ""): p for name, p in after.items() if "lora_" not in name}
    assert base.keys() == llm.keys() and all(torch.equal(base[name], value) for name, value in llm.items())  # frozen
    assert any(not torch.equal(p, torch.zeros_like(p)) for name, p in after.items() if "lora_B" in name)
    assert all(".language_model." in name for name in after if "lora_" in name)  # the LLM's layers, not the vision's

    rebuilt = load_uae_pipeline(tiny_dir / "decoder", family_dir, tmp_path / "cold_start" / "projector")
    rebuilt.set_progress_bar_config(disable=True)
    rebuilt.load_lora_weights(tmp_path / "pretrain", weight_name=LORA_WEIGHT_NAME)
    rebuilt.load_encoder_adapter(str(tmp_path / "cold_start" / "encoder_adapter"))
    kwargs = dict(height=32, width=32, num_inference_steps=2, max_new_tokens=8, output_type="np")
    expected = pipe(image=photos[:2], generator=generators([1, 2]), **kwargs)
    got = rebuilt(image=photos[:2], generator=generators([1, 2]), **kwargs)
    assert got.captions == expected.captions and got.images.shape == (2, 32, 32, 3)
    assert (got.images == expected.images).all()


def test_bfloat16_encoder_captions_and_conditions(family_dir, encoder, sized_photos):
    """Loaded in bf16 (as on a GPU), the encoder captions and its LLM's hidden states condition a bf16 projector close
    to what float32 gives."""
    vlm32, processor = encoder
    vlm, _ = load_encoder(family_dir, torch.bfloat16)
    assert {p.dtype for p in vlm.parameters()} == {torch.bfloat16}
    captions = caption_images(vlm, processor, sized_photos, max_new_tokens=6, generator=generators([0, 1, 2]))
    assert len(captions) == 3 and all(isinstance(caption, str) for caption in captions)
    hidden = vlm.config.get_text_config().hidden_size
    torch.manual_seed(0)
    projector = UAEProjector(hidden, 4 * hidden, 64)
    with torch.no_grad():
        full = encode_generate_prompts(vlm32, processor.tokenizer, projector, ["a cat", "a dog on the grass"])
        half = encode_generate_prompts(vlm, processor.tokenizer, projector.to(torch.bfloat16),
                                       ["a cat", "a dog on the grass"])
    assert half.prompt_embeds.dtype == torch.bfloat16 and torch.equal(half.lengths, full.lengths)
    error = (half.prompt_embeds.float() - full.prompt_embeds).norm() / full.prompt_embeds.norm()
    assert error < 0.05, float(error)  # 0.0087 (Qwen3-VL), 0.014 (Gemma 3) under AVX-512, AVX2 and default kernels


@pytest.mark.parametrize("recipe_family", FAMILIES)
def test_the_tiny_recipe_trains_through_uae_hf_train(recipe_family, tiny_dir, tmp_path):
    out = tmp_path / "out"
    main(["train", "--config", str(RECIPES / f"understanding_{recipe_family}_tiny.yaml"), "--tiny_models_dir",
          str(tiny_dir),
          "--output_dir", str(out)])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    rewards = [record["rewards/reconstruction/mean"] for record in state["log_history"]
               if "rewards/reconstruction/mean" in record]
    assert len(rewards) == 4 and all(0 < reward <= 1 for reward in rewards)
    base = AutoModelForImageTextToText.from_pretrained(tiny_dir / "encoders" / recipe_family)
    encoder = PeftModel.from_pretrained(base, out)
    assert any("lora_" in name for name, _ in encoder.named_parameters())


def test_what_cannot_caption_is_refused_in_one_line(tiny_dir, pipe, photos):
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    def refused(match, call, *args, **kwargs):
        with pytest.raises(ValueError, match=match) as info:
            call(*args, **kwargs)
        assert "\n" not in str(info.value) and "chat vision-language model" in str(info.value)

    text_only = tiny_dir / "decoders" / "flux2_klein" / "text_encoder"  # FLUX.2 [klein]'s Qwen3
    refused("AutoModelForImageTextToText does not load its model type 'qwen3' \\(a text-only model\\)",
            load_encoder, text_only)
    with pytest.raises(CommandLineError, match="cannot caption images: .*text-only model") as info:  # exit status 2
        main(["train", "--config", str(RECIPES / "understanding_qwen3_vl_tiny.yaml"), "--tiny_models_dir", str(tiny_dir),
              "--model_name_or_path", str(text_only)])
    assert "\n" not in str(info.value)
    vlm, processor = load_encoder(tiny_dir / "encoders" / "qwen3_vl")
    refused("Qwen3ForCausalLM is a text-only model", caption_images, Qwen3ForCausalLM.from_pretrained(text_only),
            processor, photos[:1])
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "encoders" / "qwen3_vl")
    refused("its processor \\(Qwen2Tokenizer\\) has no image processor", caption_images, vlm, tokenizer, photos[:1])
    processor.chat_template = None
    refused("has no chat template", caption_images, vlm, processor, photos[:1])
    refused("vlm \\(Qwen3VLForConditionalGeneration\\) cannot caption images: .* no chat template",
            UAEReconstructionPipeline.from_pipe, pipe, vlm=vlm, processor=processor)
    with pytest.raises(ValueError, match=r"projector input width \(64\) != the encoder LLM's hidden_size \(48\)"):
        load_uae_pipeline(tiny_dir / "decoder", tiny_dir / "encoders" / "gemma3", tiny_dir / "projector")
