"""UAE encoder parts: captioning and "generate"-role conditioning (DESIGN.md §2)."""

import pytest
import torch

from uae_hf import CAPTION_INSTRUCTION, NEGATIVE_PROMPT, caption_images, encode_generate_prompts
from uae_hf.pipelines.uae_reconstruction import clip_pooled_embeds
from uae_hf.pipelines.uae_reconstruction.pipeline_uae_reconstruction import caption_messages, generate_prompt_ids

GREEDY = dict(do_sample=False, max_new_tokens=12, no_repeat_ngram_size=1)


def test_caption_prompt_puts_instruction_before_image(encoder):
    _, processor = encoder
    prompt = processor.apply_chat_template(caption_messages(), add_generation_prompt=True, tokenize=False)
    assert prompt.index(CAPTION_INSTRUCTION) < prompt.index("<|vision_start|><|image_pad|><|vision_end|>")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")


def test_batched_captions_equal_single_captions(encoder, photos):
    vlm, processor = encoder
    batched = caption_images(vlm, processor, photos, **GREEDY)
    single = [caption_images(vlm, processor, [photo], **GREEDY)[0] for photo in photos]
    assert batched == single
    assert all(isinstance(caption, str) and caption for caption in batched)
    assert not any("<|" in caption or caption != caption.strip() for caption in batched)
    # the encoder actually looks at the image: not every photo gets the same caption
    assert len(set(batched)) > 1


# The released inference code's instruction, character for character (DESIGN.md §2): markdown bold, two spaces before
# each newline, a trailing space.
RELEASED_INSTRUCTION = (
    "You are an expert vision-language model.  \nYour task is: Given an input image, generate a **textual "
    "description** of the image. If there is text in the image, transcribe it inside double quotes \"\".  \n"
    "Now, carefully analyze the input image and output the full description. "
)


def test_caption_prompt_holds_the_released_instruction_token_for_token(encoder, photos):
    _, processor = encoder
    assert CAPTION_INSTRUCTION == RELEASED_INSTRUCTION and len(CAPTION_INSTRUCTION) == 272
    prompt = processor.apply_chat_template(caption_messages(), add_generation_prompt=True, tokenize=False)
    ids = processor(text=[prompt], images=[photos[0]], return_tensors="pt")["input_ids"][0].tolist()
    tokenizer = processor.tokenizer
    user_turn = tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    expected = tokenizer(RELEASED_INSTRUCTION, add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(ids)) if ids[i : i + len(user_turn)] == user_turn) + len(user_turn)
    assert ids[start : start + len(expected)] == expected  # the instruction first, then the image
    assert tokenizer.convert_ids_to_tokens(ids[start + len(expected)]) == "<|vision_start|>"


def test_sampled_captions_follow_the_generator_not_the_global_rng(encoder, photos):
    vlm, processor = encoder
    seeded = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    torch.manual_seed(1)
    first = caption_images(vlm, processor, photos[:2], max_new_tokens=12, generator=seeded)
    torch.manual_seed(2)
    again = caption_images(vlm, processor, photos[:2], max_new_tokens=12,
                           generator=[torch.Generator().manual_seed(7 + i) for i in range(2)])
    assert again == first
    # per image: the second photo's caption is the same alone, with its own generator
    alone = caption_images(vlm, processor, photos[1:2], max_new_tokens=12, generator=[torch.Generator().manual_seed(8)])
    assert alone == first[1:]
    # other seeds, other captions (sampling really happens)
    others = [caption_images(vlm, processor, photos[:2], max_new_tokens=12,
                             generator=[torch.Generator().manual_seed(100 * k + i) for i in range(2)]) for k in range(3)]
    assert any(captions != first for captions in others)
    # without generators the global RNG seeds them
    torch.manual_seed(3)
    unseeded = caption_images(vlm, processor, photos[:2], max_new_tokens=12)
    torch.manual_seed(3)
    assert caption_images(vlm, processor, photos[:2], max_new_tokens=12) == unseeded


def test_sampling_keeps_the_checkpoints_own_generation_config(encoder, photos):
    """The paper sets temperature and length only; the rest is the checkpoint's (here a tiny top_p: sampling keeps
    only the most likely token, so it equals greedy decoding). Forcing `top_p=None` would lose it."""
    vlm, processor = encoder
    greedy = caption_images(vlm, processor, photos, do_sample=False, max_new_tokens=12)
    saved = vlm.generation_config.top_p
    vlm.generation_config.top_p = 1e-6
    try:
        sampled = caption_images(vlm, processor, photos, max_new_tokens=12, temperature=0.7,
                                 generator=[torch.Generator().manual_seed(i) for i in range(len(photos))])
    finally:
        vlm.generation_config.top_p = saved
    assert sampled == greedy


def test_generate_role_message_format(encoder):
    _, processor = encoder
    (ids,) = generate_prompt_ids(processor.tokenizer, ["a red circle"])
    text = processor.tokenizer.decode(ids)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>generate\na red circle<|im_end|>\n<|im_start|>assistant\n"
    )


def test_conditioning_of_a_caption_does_not_depend_on_its_batch(encoder, projector):
    vlm, processor = encoder
    captions = ["a cat", "a long caption " * 20 + "about a dog running across a wide green field", "a bowl"]
    batch = encode_generate_prompts(vlm, processor.tokenizer, projector, captions)
    n_negative = len(generate_prompt_ids(processor.tokenizer, [NEGATIVE_PROMPT])[0])
    for index, caption in enumerate(captions):
        alone = encode_generate_prompts(vlm, processor.tokenizer, projector, [caption])
        n_caption = len(generate_prompt_ids(processor.tokenizer, [caption])[0])
        length = int(alone.lengths[0])
        assert length == max(n_negative, n_caption) == int(batch.lengths[index])
        assert alone.prompt_embeds.shape == (1, length, projector.config.out_features)
        torch.testing.assert_close(batch.prompt_embeds[index, :length], alone.prompt_embeds[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            batch.negative_prompt_embeds[index, :length], alone.negative_prompt_embeds[0], atol=1e-5, rtol=0
        )
    assert batch.text_mask().sum(1).tolist() == batch.lengths.tolist()


def test_pad_positions_of_the_pair_are_projected(encoder, projector):
    """Released behaviour: the shorter member of the [negative, positive] pair keeps its pad rows."""
    vlm, processor = encoder
    short = encode_generate_prompts(vlm, processor.tokenizer, projector, ["a"])
    n_caption = len(generate_prompt_ids(processor.tokenizer, ["a"])[0])
    assert short.lengths[0] > n_caption  # the negative prompt is longer
    pad_rows = short.prompt_embeds[0, n_caption:]
    assert torch.allclose(pad_rows, pad_rows[:1].expand_as(pad_rows), atol=1e-6)  # identical pad states
    assert not torch.allclose(pad_rows[0], short.prompt_embeds[0, n_caption - 1])


def test_conditioning_is_differentiable_for_training(encoder, projector):
    vlm, processor = encoder
    out = encode_generate_prompts(vlm, processor.tokenizer, projector, ["a cat"])
    out.prompt_embeds.sum().backward()
    assert projector.projector[0].weight.grad is not None
    projector.zero_grad(set_to_none=True)
    vlm.zero_grad(set_to_none=True)


def test_empty_caption_list_is_rejected(encoder, projector):
    vlm, processor = encoder
    with pytest.raises(ValueError, match="captions"):
        encode_generate_prompts(vlm, processor.tokenizer, projector, [])


def test_pooled_embedding_matches_sd3_empty_prompt(pipe):
    _, _, pooled, _ = pipe.encode_prompt(prompt="", prompt_2="", prompt_3="", do_classifier_free_guidance=False)
    ours = clip_pooled_embeds([pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2])
    assert ours.shape == (1, pipe.transformer.config.pooled_projection_dim)
    torch.testing.assert_close(ours, pooled, atol=1e-6, rtol=0)
    assert pipe.uae_pooled_prompt_embeds() is pipe.uae_pooled_prompt_embeds()  # computed once


def test_pooled_embeddings_for_a_batch(pipe):
    """`uae_pooled_prompt_embeds(batch_size, device, dtype)`: the one cached row, moved and expanded to a batch."""
    cached = pipe.uae_pooled_prompt_embeds()
    batch = pipe.uae_pooled_prompt_embeds(3, "cpu", torch.bfloat16)
    assert batch.shape == (3, cached.shape[1]) and batch.dtype == torch.bfloat16
    assert torch.equal(batch, cached.to(torch.bfloat16).expand(3, -1))
    assert torch.equal(pipe.uae_pooled_prompt_embeds(2), cached.expand(2, -1))
    assert pipe.uae_pooled_prompt_embeds(device="cpu") is cached  # nothing to move: the cache itself
    assert pipe.uae_pooled_prompt_embeds() is cached
