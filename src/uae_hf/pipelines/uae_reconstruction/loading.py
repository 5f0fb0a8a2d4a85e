"""Assemble a [`UAEReconstructionPipeline`] from separately stored parts (encoder, decoder, projector)."""

import torch
from diffusers import StableDiffusion3Pipeline
from transformers import AutoModelForImageTextToText, AutoProcessor

from ...models.projector import UAEProjector
from .pipeline_uae_reconstruction import UAEReconstructionPipeline


def load_uae_pipeline(
    decoder: str,
    encoder: str,
    projector: str | None = None,
    conditioning_mode: str = "embeddings",
    torch_dtype: torch.dtype | None = None,
    load_t5: bool | None = None,
) -> UAEReconstructionPipeline:
    """Load an SD3-family decoder, a chat VLM encoder and (for embeddings mode) a projector into one pipeline.

    Args:
        decoder (`str`): an SD3/SD3.5 pipeline folder or Hub id (e.g. `"stabilityai/stable-diffusion-3.5-large"`).
        encoder (`str`): a chat VLM folder or Hub id (e.g. `"Qwen/Qwen2.5-VL-3B-Instruct"`).
        projector (`str`, *optional*): a [`UAEProjector`] folder; required when `conditioning_mode="embeddings"`.
        conditioning_mode (`str`, defaults to `"embeddings"`): `"embeddings"` or `"text"`.
        torch_dtype (`torch.dtype`, *optional*): dtype of every model (e.g. `torch.bfloat16` on GPU).
        load_t5 (`bool`, *optional*): load the decoder's T5 encoder; by default only in text mode (embeddings mode
            never uses it, and SD3.5's T5-XXL alone has 4.7B parameters).
    """
    if load_t5 is None:
        load_t5 = conditioning_mode == "text"
    skip_t5 = {} if load_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    sd3 = StableDiffusion3Pipeline.from_pretrained(decoder, torch_dtype=torch_dtype, **skip_t5)
    vlm = AutoModelForImageTextToText.from_pretrained(encoder, dtype=torch_dtype).eval()
    processor = AutoProcessor.from_pretrained(encoder)
    projector_model = UAEProjector.from_pretrained(projector, torch_dtype=torch_dtype) if projector else None
    return UAEReconstructionPipeline.from_pipe(
        sd3, vlm=vlm, processor=processor, projector=projector_model, conditioning_mode=conditioning_mode
    )
