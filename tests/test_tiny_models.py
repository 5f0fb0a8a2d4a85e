import subprocess
import sys

from network_block import BLOCK_NETWORK

from uae_hf import build_tiny_models


def _files(root):
    return {path.relative_to(root): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_twins_are_byte_identical_across_builds(tiny_dir, tmp_path):
    again = _files(build_tiny_models(tmp_path / "again"))
    first = _files(tiny_dir)
    assert again.keys() == first.keys()
    weights = [name for name in first if name.suffix == ".safetensors"]
    # encoder, 5 decoder models (CLIP-L/G, T5, MMDiT, VAE), projector, 5 backbones; FLUX.1: CLIP-L, T5, DiT, VAE;
    # Qwen-Image: Qwen2.5-VL, DiT, VAE; FLUX.2 [klein]: Qwen3, DiT, VAE; Janus-Pro; Emu3 Chat and Gen; the Qwen3-VL and
    # Gemma 3 encoders
    assert len(weights) == 27
    assert [name for name in first if first[name] != again[name]] == []


def test_twins_are_small(tiny_dir):
    total = sum(len(data) for data in _files(tiny_dir).values())
    assert total < 13.5 * 2**20  # 12.5 MiB (2026-12-07, with the two Emu3 twins' 2.4 MiB)


RELOAD_SCRIPT = BLOCK_NETWORK + """
import sys
from pathlib import Path
import torch
from diffusers import StableDiffusion3Pipeline
from transformers import AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer, CLIPModel, DINOv3ViTModel
from transformers import Dinov2Model, Qwen2_5_VLForConditionalGeneration, SiglipModel

root = Path(sys.argv[1])
vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "encoder")
processor = AutoProcessor.from_pretrained(root / "encoder")
assert type(processor).__name__ == "Qwen2_5_VLProcessor", type(processor)
assert type(processor.video_processor).__name__ == "Qwen2VLVideoProcessor"
assert processor.image_processor.size == {"shortest_edge": 3136, "longest_edge": 65536}, processor.image_processor.size
tokenizer = AutoTokenizer.from_pretrained(root / "encoder")
specials = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|endoftext|>")
ids = [tokenizer(token, add_special_tokens=False).input_ids for token in specials]
assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(specials), ids
assert vlm.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")

pipe = StableDiffusion3Pipeline.from_pretrained(root / "decoder")
assert pipe.text_encoder_3 is not None and pipe.transformer.config.qk_norm == "rms_norm"
assert list(pipe.transformer.config.dual_attention_layers) == [0]
image = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np").images
assert image.shape == (1, 64, 64, 3)

from diffusers import ModelMixin
import json
assert json.loads((root / "projector" / "config.json").read_text())["_class_name"] == "UAEProjector"

expected = {"clip": CLIPModel, "longclip": CLIPModel, "dinov2": Dinov2Model, "dinov3": DINOv3ViTModel,
            "siglip": SiglipModel}
for name, cls in expected.items():
    model = AutoModel.from_pretrained(root / "backbones" / name)
    assert isinstance(model, cls), (name, type(model))
    AutoImageProcessor.from_pretrained(root / "backbones" / name)
assert CLIPModel.from_pretrained(root / "backbones" / "longclip").config.text_config.max_position_embeddings == 248
print("RELOADED")
"""


def test_every_twin_reloads_in_a_fresh_offline_process(tiny_dir):
    result = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(tiny_dir)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RELOADED" in result.stdout


def test_decoder_can_be_built_without_t5(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from uae_hf.tiny_models import build_tiny_decoder

    build_tiny_decoder(tmp_path / "decoder", with_t5=False)
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "decoder", text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None


def test_building_the_twins_prints_nothing_and_restores_logging(tmp_path, capfd):
    import diffusers
    import huggingface_hub
    import transformers

    def state():
        return (transformers.utils.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled(),
                diffusers.utils.logging.get_verbosity(), diffusers.utils.logging.is_progress_bar_enabled(),
                huggingface_hub.utils.are_progress_bars_disabled())

    transformers.utils.logging.warning_once.cache_clear()  # warnings shown earlier in the session count again
    before = state()
    capfd.readouterr()
    build_tiny_models(tmp_path / "quiet")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")  # no progress bar per saved model, no warnings about the tiny vocabularies
    assert state() == before
