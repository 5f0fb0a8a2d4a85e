from .loading import load_saved_pipeline, load_uae_pipeline
from .pipeline_uae_reconstruction import (
    CAPTION_INSTRUCTION,
    NEGATIVE_PROMPT,
    GenerateConditioning,
    MaskedJointAttnProcessor,
    UAEReconstructionPipeline,
    UAEReconstructionPipelineOutput,
    caption_images,
    clip_pooled_embeds,
    encode_generate_prompts,
)
