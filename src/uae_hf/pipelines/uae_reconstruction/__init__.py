from .attention_processor import MaskedJointAttnProcessor, masked_attention
from .captioning import CAPTION_INSTRUCTION, NotAnEncoderError, caption_images, check_encoder
from .conditioning import (
    NEGATIVE_PROMPT,
    GenerateConditioning,
    caption_role,
    clip_pooled_embeds,
    encode_generate_prompts,
)
from .loading import load_encoder, load_saved_pipeline, load_uae_pipeline
from .pipeline_output import UAEReconstructionPipelineOutput
from .pipeline_uae_reconstruction import UAEReconstructionPipeline


def _from_uae_release(cls, *args, **kwargs) -> UAEReconstructionPipeline:
    """The released UAE model as a pipeline: `load_uae_release(*args, **kwargs)` (see `uae_hf.release`)."""
    from ...release import load_uae_release

    return load_uae_release(*args, **kwargs)


# Attached here, not in the self-contained pipeline file a saved folder ships: loading the release needs uae_hf's
# projector and checks. Every import of the pipeline module through uae_hf runs this package first.
UAEReconstructionPipeline.from_uae_release = classmethod(_from_uae_release)
