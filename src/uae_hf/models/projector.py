"""The UAE projector: LLM hidden states → SD3 `prompt_embeds`.

This file imports only torch and diffusers on purpose: `UAEReconstructionPipeline.save_pretrained` copies it into
the saved `projector/` folder, so a saved pipeline (or a Hub repo) loads without `uae_hf` installed.
"""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class UAEProjector(ModelMixin, ConfigMixin):
    """Two-layer MLP mapping every LLM token state to the decoder's `joint_attention_dim`.

    The released UAE model uses `Linear(2048 → 8192) → GELU → Linear(8192 → 4096)`; its state dict keys are
    `projector.0.*` and `projector.2.*`, which this module keeps.

    Args:
        in_features (`int`, defaults to 2048): hidden size of the LLM (Qwen2.5-VL-3B: 2048).
        hidden_features (`int`, defaults to 8192): width of the intermediate layer.
        out_features (`int`, defaults to 4096): the decoder transformer's `joint_attention_dim`.
    """

    @register_to_config
    def __init__(self, in_features: int = 2048, hidden_features: int = 8192, out_features: int = 4096):
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(in_features, hidden_features), nn.GELU(), nn.Linear(hidden_features, out_features)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.projector(hidden_states)
