"""UAE-native conditioning: captions read by the encoder LLM in the "generate" role, projected for the decoder."""

import contextlib
from dataclasses import dataclass

import torch

NEGATIVE_PROMPT = "Generate a random, low quality, ugly, blur, bad and anime, cartoon image."
GENERATE_ROLE = "generate"


@dataclass
class GenerateConditioning:
    """UAE-native conditioning for a batch of captions.

    Attributes:
        prompt_embeds (`torch.Tensor` of shape `(batch, max_length, joint_attention_dim)`)
        negative_prompt_embeds (`torch.Tensor` of the same shape)
        lengths (`torch.LongTensor` of shape `(batch,)`): item i's own length (its [negative, positive] pair padded
            together); positions at or beyond it are batch padding and must be masked out of the decoder's attention.
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    lengths: torch.LongTensor

    def text_mask(self) -> torch.BoolTensor:
        """`(batch, max_length)` mask, `True` where a text token belongs to its item."""
        positions = torch.arange(self.prompt_embeds.shape[1], device=self.lengths.device)
        return positions[None, :] < self.lengths[:, None]


def _render(tokenizer, role: str, caption: str) -> str:
    return tokenizer.apply_chat_template([{"role": role, "content": [{"type": "text", "text": caption}]}],
                                         add_generation_prompt=True, tokenize=False)


def caption_role(tokenizer) -> str:
    """The chat role captions are read in: UAE's `"generate"` where the chat template renders a message of that role
    (Qwen2.5-VL's renders any role, as the released model reads them), else `"user"` (templates that refuse unknown
    roles, as Gemma 3's, or drop them, as Qwen3-VL's, which would leave the caption out)."""
    probe = "uae caption role probe"
    try:
        return GENERATE_ROLE if probe in _render(tokenizer, GENERATE_ROLE, probe) else "user"
    except Exception:  # the template refused the role (jinja's TemplateError: "roles must alternate", ...)
        return "user"


def generate_prompt_ids(tokenizer, captions: list[str]) -> list[list[int]]:
    """Token ids of each caption wrapped as a chat message in [`caption_role`] (`"generate"` for Qwen2.5-VL) with the
    assistant header appended."""
    role = caption_role(tokenizer)
    texts = [_render(tokenizer, role, caption) for caption in captions]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run `model` on its base weights: every PEFT adapter layer (LoRA, modules_to_save copies) is switched off,
    then put back as it was. A no-op for a model without adapters."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "disable_adapters", None), bool)]
    was_disabled = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, disabled in zip(layers, was_disabled):
            layer.enable_adapters(not disabled)


def encode_generate_prompts(
    vlm,
    tokenizer,
    projector,
    captions: list[str],
    negative_prompt: str = NEGATIVE_PROMPT,
    with_adapters: bool = True,
) -> GenerateConditioning:
    """Captions → LLM last hidden state of every token → projector: the decoder's `prompt_embeds` (UAE-native). The
    captions are read in the `"generate"` role, or the user role where the chat template has no such role
    ([`caption_role`]).

    As in the released model, each caption is right-padded together with the negative prompt to their common length
    (pad token `<|endoftext|>`), the LLM sees an attention mask and mask-derived position ids, and every position
    (pads of the pair included) is projected. One forward pass serves the whole batch: extra padding up to the
    batch's longest item cannot change earlier positions (causal attention), so item i's first `lengths[i]` rows
    equal what it gets alone. Gradients flow if enabled (cold start trains through this). `with_adapters=False`
    reads the captions with the LLM's base weights (any encoder adapter then only changes the captions written).
    """
    if len(captions) == 0:
        raise ValueError("`captions` is empty: pass at least one caption")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    negative_ids, *caption_ids = generate_prompt_ids(tokenizer, [negative_prompt, *captions])
    limit = getattr(vlm.config.get_text_config(), "max_position_embeddings", None)
    for index, ids in enumerate(caption_ids):
        if limit is not None and len(ids) > limit:
            raise ValueError(
                f"captions[{index}] is {len(ids)} tokens long in its chat template ({len(captions[index])} "
                f"characters); the encoder LLM reads at most {limit} (max_position_embeddings): shorten it"
            )
    lengths = torch.tensor([max(len(negative_ids), len(ids)) for ids in caption_ids])
    sequences = [negative_ids, *caption_ids]
    max_length = int(lengths.max())
    input_ids = torch.full((len(sequences), max_length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)

    device = vlm.device
    # The top-level forward (not the inner decoder) so offload hooks and PEFT wrappers apply; logits of one position.
    with contextlib.nullcontext() if with_adapters else adapters_disabled(vlm):
        hidden_states = vlm(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            output_hidden_states=True,
            logits_to_keep=1,
            use_cache=False,
        ).hidden_states[-1]
    projector_dtype = next(projector.parameters()).dtype
    embeds = projector(hidden_states.to(projector.device, projector_dtype))
    negative = embeds[:1].expand(len(captions), -1, -1)
    return GenerateConditioning(embeds[1:], negative, lengths.to(embeds.device))


@torch.no_grad()
def clip_pooled_embeds(text_encoders, tokenizers, prompt: str = "") -> torch.Tensor:
    """SD3's pooled text embedding of `prompt` from its CLIP-L and CLIP-G encoders (concatenated), shape `(1, P)`."""
    pooled = []
    for text_encoder, tokenizer in zip(text_encoders, tokenizers):
        ids = tokenizer(
            [prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        pooled.append(text_encoder(ids.to(text_encoder.device)).text_embeds)
    return torch.cat(pooled, dim=-1)
