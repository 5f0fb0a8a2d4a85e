"""Masked joint attention for SD3-family decoders: captions of different lengths in one batch, each exact."""

import contextlib

import torch
import torch.nn.functional as F


class MaskedJointAttnProcessor:
    """SD3 joint attention (as diffusers' `JointAttnProcessor2_0`) that can hide padded text tokens.

    `encoder_attention_mask` (`(batch, text_length)` bool, `True` = keep) removes each item's batch padding from the
    keys, so an item decoded in a batch attends to exactly the text tokens it has alone. A mask with fewer rows than
    the batch is tiled (classifier-free guidance stacks [negative; positive] items that share their lengths).
    Without a mask it computes exactly what `JointAttnProcessor2_0` computes.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, encoder_attention_mask=None):
        batch_size = hidden_states.shape[0]
        num_image_tokens = hidden_states.shape[1]

        def heads(x):
            return x.view(batch_size, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        mask = None
        if encoder_hidden_states is not None:
            text_query = heads(attn.add_q_proj(encoder_hidden_states))
            text_key = heads(attn.add_k_proj(encoder_hidden_states))
            text_value = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=2)
            key = torch.cat([key, text_key], dim=2)
            value = torch.cat([value, text_value], dim=2)
            if encoder_attention_mask is not None:
                text_mask = encoder_attention_mask.to(device=query.device, dtype=torch.bool)
                text_mask = text_mask.repeat(batch_size // text_mask.shape[0], 1)
                image_mask = text_mask.new_ones(batch_size, num_image_tokens)
                mask = torch.cat([image_mask, text_mask], dim=1)[:, None, None, :]

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * out.shape[-1]).to(query.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        out, text_out = out[:, :num_image_tokens], out[:, num_image_tokens:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return attn.to_out[1](attn.to_out[0](out)), text_out


@contextlib.contextmanager
def masked_attention(transformer: torch.nn.Module):
    """Run `transformer` (an SD3-family DiT) with [`MaskedJointAttnProcessor`] in every attention layer, then give it
    back its own processors (the same objects).

    Inside the block, `joint_attention_kwargs={"encoder_attention_mask": mask}` hides each item's batch padding; outside
    it, diffusers' default processor ignores that key (with a logged warning). Keep the block open through `backward`
    when the DiT uses gradient checkpointing: the recomputed forward must mask too. A no-op when every layer already
    has a `MaskedJointAttnProcessor`.

    Args:
        transformer (`torch.nn.Module`): the DiT, with or without PEFT layers; a `DistributedDataParallel` wrapper is
            unwrapped.
    """
    transformer = getattr(transformer, "module", transformer)
    processors = transformer.attn_processors
    if all(isinstance(processor, MaskedJointAttnProcessor) for processor in processors.values()):
        yield
        return
    transformer.set_attn_processor(MaskedJointAttnProcessor())
    try:
        yield
    finally:
        transformer.set_attn_processor(processors)
