"""What the decoder-family tests share: the frozen encoder their stage-3 runs caption with."""

import pytest
from transformers import AutoModelForImageTextToText, AutoProcessor


@pytest.fixture(scope="module")
def frozen_encoder(tiny_dir):
    """The encoder twin a module's stage-3 runs caption with (frozen by them: the module's own copy), and its
    processor."""
    return (AutoModelForImageTextToText.from_pretrained(tiny_dir / "encoder"),
            AutoProcessor.from_pretrained(tiny_dir / "encoder"))

