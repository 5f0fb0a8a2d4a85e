"""Masked joint attention: exact batching of captions of different lengths, without touching a shared transformer."""

import numpy as np
import pytest
import torch

from uae_hf import UAEReconstructionPipeline
from uae_hf.pipelines.uae_reconstruction import MaskedJointAttnProcessor, masked_attention

FAST = dict(num_inference_steps=3, output_type="np")
CAPTIONS = ["a cat", "an astronaut in an orange suit stands next to an American flag, a shuttle model behind her", "a cup"]


def generators(n, offset=0):
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


@pytest.fixture()
def users_sd3(tiny_dir):
    """A user's own SD3 pipeline, with diffusers' default attention processors."""
    from diffusers import StableDiffusion3Pipeline

    sd3 = StableDiffusion3Pipeline.from_pretrained(tiny_dir / "decoder")
    sd3.set_progress_bar_config(disable=True)
    return sd3


def _dit_inputs(transformer, batch, text_length, seed=0):
    config = transformer.config
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, config.in_channels, 8, 8, generator=g),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=torch.randn(batch, text_length, config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, config.pooled_projection_dim, generator=g),
        return_dict=False,
    )


def test_without_a_mask_the_processor_computes_what_diffusers_default_computes(users_sd3):
    transformer = users_sd3.transformer
    inputs = _dit_inputs(transformer, 2, 7)
    with torch.no_grad():
        default = transformer(**inputs)[0]
        with masked_attention(transformer):
            assert all(isinstance(p, MaskedJointAttnProcessor) for p in transformer.attn_processors.values())
            masked = transformer(**inputs)[0]
            keep_all = transformer(**inputs, joint_attention_kwargs={
                "encoder_attention_mask": torch.ones(2, 7, dtype=torch.bool)})[0]
    assert torch.equal(masked, default)
    torch.testing.assert_close(keep_all, default, atol=1e-5, rtol=0)


def test_from_pipe_leaves_the_users_pipeline_as_it_was(users_sd3, pipe):
    """diffusers users expect `from_pipe` to share modules, not to change them: the SD3 pipeline keeps its own
    processors (the same objects) and its outputs, through `from_pipe`, a UAE run, and a UAE run that fails."""
    processors = users_sd3.transformer.attn_processors
    assert not any(isinstance(p, MaskedJointAttnProcessor) for p in processors.values())
    sd3_kwargs = dict(prompt="a red circle", num_inference_steps=2, output_type="np")
    before = users_sd3(generator=torch.Generator().manual_seed(0), **sd3_kwargs).images

    uae = UAEReconstructionPipeline.from_pipe(users_sd3, vlm=pipe.vlm, processor=pipe.processor, projector=pipe.projector)
    also = UAEReconstructionPipeline(**users_sd3.components, vlm=pipe.vlm, processor=pipe.processor,
                                     projector=pipe.projector)
    assert uae.transformer is users_sd3.transformer and also.transformer is users_sd3.transformer
    assert users_sd3.transformer.attn_processors == processors  # same keys, same objects

    out = uae.generate(CAPTIONS, generator=generators(3), **FAST).images
    assert users_sd3.transformer.attn_processors == processors
    with pytest.raises(ValueError, match="divisible"):
        uae.generate(CAPTIONS[:1], height=65, **FAST)  # fails inside the masked block
    assert users_sd3.transformer.attn_processors == processors

    # the UAE run did mask: each item of the batch is what it is alone
    for index, caption in enumerate(CAPTIONS):
        single = uae.generate([caption], generator=generators(1, index), **FAST).images
        np.testing.assert_allclose(out[index], single[0], atol=1e-4, rtol=0)
    after = users_sd3(generator=torch.Generator().manual_seed(0), **sd3_kwargs).images
    np.testing.assert_array_equal(after, before)


def test_masked_attention_masks_direct_transformer_calls_and_restores(users_sd3, pipe):
    """What samplers and trainers do: call the DiT themselves with `encode_captions`' mask, inside the block."""
    uae = UAEReconstructionPipeline.from_pipe(users_sd3, vlm=pipe.vlm, processor=pipe.processor, projector=pipe.projector)
    processors = uae.transformer.attn_processors
    batch = uae.encode_captions(CAPTIONS[:2])
    alone = uae.encode_captions(CAPTIONS[:1])
    assert batch["joint_attention_kwargs"] is not None and alone["joint_attention_kwargs"] is None
    inputs = _dit_inputs(uae.transformer, 2, 1)

    def first_item(conditioning, rows):
        return uae.transformer(
            hidden_states=inputs["hidden_states"][:rows], timestep=inputs["timestep"][:rows],
            encoder_hidden_states=conditioning["prompt_embeds"], pooled_projections=conditioning["pooled_prompt_embeds"],
            joint_attention_kwargs=conditioning["joint_attention_kwargs"], return_dict=False,
        )[0][0]

    with torch.no_grad():
        expected = first_item(alone, 1)
        with uae.masked_attention():
            with uae.masked_attention():  # nested (e.g. `generate` inside a training step): still masked
                pass
            assert all(isinstance(p, MaskedJointAttnProcessor) for p in uae.transformer.attn_processors.values())
            masked = first_item(batch, 2)
        unmasked = first_item(batch, 2)  # diffusers' default processor ignores the mask
    torch.testing.assert_close(masked, expected, atol=1e-5, rtol=0)
    assert (unmasked - expected).abs().max() > 1e-3
    assert uae.transformer.attn_processors == processors


def test_a_pipeline_loaded_by_uae_hf_masks_for_good(pipe):
    """`load_uae_pipeline` (and `load_saved_pipeline`) created the transformer: it keeps the masked processor, so a
    direct DiT call masks without the block, and the block leaves the same processor objects in place."""
    processors = pipe.transformer.attn_processors
    assert all(isinstance(p, MaskedJointAttnProcessor) for p in processors.values())
    with pipe.masked_attention():
        assert pipe.transformer.attn_processors == processors
    assert pipe.transformer.attn_processors == processors
