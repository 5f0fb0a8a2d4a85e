"""The output of [`UAEReconstructionPipeline`]."""

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput


@dataclass
class UAEReconstructionPipelineOutput(BaseOutput):
    """Output of [`UAEReconstructionPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`): the reconstructions, item-major
            (`num_images_per_prompt` consecutive images per caption).
        captions (`list[str]`): the caption each reconstruction was drawn from (one per input).
        truncated (`list[bool]`, *optional*): text mode only, whether a decoder text encoder cut the caption.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    captions: list[str]
    truncated: list[bool] | None = None
