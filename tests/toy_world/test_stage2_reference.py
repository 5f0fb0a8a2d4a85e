"""Stage 2 of the demo: GRPO on the SFT adapter with a KL to the encoder as SFT left it, not to the untrained base."""

import PIL.Image
import pytest
import torch
from peft import PeftModel
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
from trl.trainer.utils import use_adapter

from uae_hf import UAEReconstructionPipeline, UnifiedGRPOConfig, UnifiedGRPOTrainer
from uae_hf.pipelines.uae_reconstruction.pipeline_uae_reconstruction import caption_messages
from uae_hf.sample_data import skimage_photos
from uae_hf.toy_world.demo import REFERENCE_ADAPTER, sft_lora_config


def _encoder(tiny_dir):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "encoder").eval()


@pytest.fixture()
def sft_adapter(tiny_dir, tmp_path):
    """The demo's SFT adapter, its LoRA and its embedding/head/norm copies moved off their starting values."""
    vlm = _encoder(tiny_dir)
    vlm.add_adapter(sft_lora_config())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in vlm.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    vlm.save_pretrained(tmp_path / "sft")
    return tmp_path / "sft"


def _logits(model, processor) -> torch.Tensor:
    prompt = processor.apply_chat_template(caption_messages(), add_generation_prompt=True, tokenize=False)
    image = PIL.Image.new("RGB", (64, 64), (200, 30, 30))
    inputs = processor(text=[prompt + "a red square"], images=[image], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


def test_stage2_kl_reference_is_the_sft_encoder_and_the_saved_adapter_is_the_policy(
    tiny_dir, pipe, sft_adapter, backbone_checkpoints, tmp_path
):
    processor = AutoProcessor.from_pretrained(tiny_dir / "encoder")
    sft = _logits(PeftModel.from_pretrained(_encoder(tiny_dir), sft_adapter).eval(), processor)
    untrained = _logits(_encoder(tiny_dir), processor)
    assert not torch.allclose(sft, untrained, atol=1e-3)  # the adapter-disabled model is not the SFT'd encoder

    base = _encoder(tiny_dir)
    policy = PeftModel.from_pretrained(base, sft_adapter, is_trainable=True)  # as the demo's stage 2 does
    decoder = UAEReconstructionPipeline.from_pipe(pipe, vlm=base)  # the decoder reads captions with the base LLM
    decoder.register_to_config(conditioning_with_encoder_adapters=False)
    args = UnifiedGRPOConfig(
        output_dir=str(tmp_path / "understanding"), use_cpu=True, bf16=False, report_to=[], seed=0,
        save_strategy="no", logging_steps=1, max_steps=2, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=6, learning_rate=5e-2, lr_scheduler_type="constant", beta=0.04, temperature=1.0,
        decoder_height=64, decoder_width=64, decoder_num_inference_steps=2, decoder_text_encoder="frozen",
        backbone_checkpoints={"clip": backbone_checkpoints["clip"]}, reward_backbones=["clip"],
        log_reconstructions_steps=0,
    )
    trainer = UnifiedGRPOTrainer(policy, decoder, args=args, train_dataset=skimage_photos(8).select_columns(["image"]),
                                 processing_class=processor)
    assert REFERENCE_ADAPTER in policy.peft_config
    with use_adapter(policy, REFERENCE_ADAPTER):  # what TRL's GRPO computes the reference log-probs with
        torch.testing.assert_close(_logits(policy, processor), sft, atol=1e-5, rtol=0)

    trainer.train()
    assert [record["kl"] for record in trainer.state.log_history if "kl" in record]  # the KL is computed and logged
    trained = _logits(policy.eval(), processor)
    assert not torch.allclose(trained, sft, atol=1e-3)  # the policy moved ...
    with use_adapter(policy, REFERENCE_ADAPTER):  # ... its reference did not
        torch.testing.assert_close(_logits(policy, processor), sft, atol=1e-5, rtol=0)

    # the demo drops the reference copy before saving: the saved adapter is the policy's, on the untouched base
    policy.delete_adapter(REFERENCE_ADAPTER)
    trainer.save_model(str(tmp_path / "stage2"))
    assert not (tmp_path / "stage2" / REFERENCE_ADAPTER).exists()
    reloaded = PeftModel.from_pretrained(_encoder(tiny_dir), tmp_path / "stage2").eval()
    torch.testing.assert_close(_logits(reloaded, processor), trained, atol=1e-5, rtol=0)
    final = UAEReconstructionPipeline.from_pipe(pipe, vlm=_encoder(tiny_dir))
    final.load_encoder_adapter(str(tmp_path / "stage2"))  # as the demo's load_understanding: the policy's captions
    torch.testing.assert_close(_logits(final.vlm, processor), trained, atol=1e-5, rtol=0)
