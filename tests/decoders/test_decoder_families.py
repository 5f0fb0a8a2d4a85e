"""The decoder protocol's choice of family: by the pipeline's class, one line for any other pipeline; every family's
tiny stage-3 recipes through `uae-hf train`."""

from pathlib import Path

import pytest
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, StableDiffusion3Pipeline, UNet2DModel

from uae_hf.cli import main
from uae_hf.decoders import SD3Family, decoder_family

RECIPES = Path(__file__).parents[2] / "examples" / "recipes"


def test_a_pipeline_of_an_unsupported_family_gets_one_line_naming_the_supported_ones():
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    with pytest.raises(TypeError) as error:
        decoder_family(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()))
    message = str(error.value)
    assert "\n" not in message and message.startswith("decoder DDPMPipeline is not of a supported family")
    assert "StableDiffusion3Pipeline (SD3)" in message


def test_a_plain_sd3_pipeline_is_read_in_text_mode_sharing_its_components(tiny_dir):
    plain = StableDiffusion3Pipeline.from_pretrained(tiny_dir / "decoder")
    family = decoder_family(plain)
    assert isinstance(family, SD3Family) and family.conditioning_mode == "text"
    assert family.transformer is plain.transformer and family.pipe.vae is plain.vae
    assert decoder_family(family) is family
    assert family.caption_encoder() is None  # CLIP and T5 read captions: never the encoder being trained


def test_a_paired_round_trip_with_a_plain_sd3_decoder_is_the_uae_pipeline_s_text_mode(tiny_dir, photos):
    """`PairedRoundTrip` (any chat VLM + any supported decoder) seeds captions and noise as the UAE pipeline does: with
    SD3 and the same encoder, its round trip is the text-mode UAE pipeline's, caption for caption, pixel for pixel."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from uae_hf import PairedRoundTrip, load_uae_pipeline
    from uae_hf.seeding import seeded_generators

    settings = dict(height=32, width=32, num_inference_steps=2, max_new_tokens=12)
    uae = load_uae_pipeline(tiny_dir / "decoder", tiny_dir / "encoder", conditioning_mode="text")
    expected = uae(image=photos[:2], generator=seeded_generators([3, 4]), output_type="np", **settings)
    vlm = AutoModelForImageTextToText.from_pretrained(tiny_dir / "encoder")
    pair = PairedRoundTrip(vlm, AutoProcessor.from_pretrained(tiny_dir / "encoder"),
                           StableDiffusion3Pipeline.from_pretrained(tiny_dir / "decoder"))
    out = pair(image=photos[:2], generator=seeded_generators([3, 4]), output_type="np", **settings)
    assert out.captions == expected.captions and all(out.captions)
    assert (out.images == expected.images).all() and out.truncated == expected.truncated


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["generation", "generation_nft"])
@pytest.mark.parametrize("family, pipeline_class", [("flux1", "FluxPipeline"), ("qwen_image", "QwenImagePipeline"),
                                                    ("flux2_klein", "Flux2KleinPipeline")])
def test_each_family_s_tiny_stage_3_recipes_train_through_the_cli(family, pipeline_class, stage, tiny_dir, tmp_path):
    """`uae-hf train --config examples/recipes/<stage>_<family>_tiny.yaml` (Flow-GRPO and DiffusionNFT) trains that
    family's twin and saves a LoRA that its stock pipeline loads, with a card naming that pipeline."""
    out = tmp_path / "out"
    main(["train", "--config", str(RECIPES / f"{stage}_{family}_tiny.yaml"), "--tiny_models_dir", str(tiny_dir),
          "--max_steps", "1", "--output_dir", str(out)])
    assert pipeline_class in (out / "README.md").read_text()
    stock = DiffusionPipeline.from_pretrained(tiny_dir / "decoders" / family)
    assert type(stock).__name__ == pipeline_class
    stock.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    assert stock.get_active_adapters() == ["default_0"]
