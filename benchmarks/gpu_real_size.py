"""Real-size throughput and memory on one GPU: Qwen2.5-VL-3B encoder + SD3.5 (Medium or Large) decoder + the UAE
projector, built from their published architectures with random weights (no download), bf16.

    python benchmarks/gpu_real_size.py --decoder large --output gpu.json     # on a GPU
    python benchmarks/gpu_real_size.py --reduced                            # the same code paths, tiny, on CPU

Measures: captions/s of stage-2 rollouts, reconstructions/s at 512 px / 10 steps, a full stage-2 step and a full
stage-3 step (LoRA r=32), images/GPU/s, peak GPU memory per phase, and the DiT sampling MFU (model FLOPs / time /
the card's peak dense bf16 FLOP/s, given with --peak-tflops; 989 for H100/H200 SXM).
"""

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel  # noqa: E402
from diffusers import StableDiffusion3Pipeline  # noqa: E402
from transformers import AutoProcessor, CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, TrainerCallback  # noqa: E402

from uae_hf import UAEProjector, UAEReconstructionPipeline, UnifiedGRPOConfig, UnifiedGRPOTrainer  # noqa: E402
from uae_hf import build_tiny_models, caption_images  # noqa: E402

# Published architectures (config.json of each model), random weights.
QWEN25_VL_3B_TEXT = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                         rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
QWEN25_VL_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
SD35 = {
    "large": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm"),
    "medium": dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=tuple(range(13))),
}
SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, vocab_size=49408, max_position_embeddings=77, hidden_act="gelu")
REDUCE = dict(num_hidden_layers=2, num_layers=2, depth=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, num_heads=4, out_hidden_size=64, fullatt_block_indexes=[1],
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
              attention_head_dim=16, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64,
              projection_dim=32, block_out_channels=(8, 16, 16, 16), norm_num_groups=4, dual_attention_layers=(0,),
              layers_per_block=1)


def _sized(config: dict, reduced: bool) -> dict:
    return {key: (REDUCE[key] if reduced and key in REDUCE else value) for key, value in config.items()}


def build(decoder: str, reduced: bool, twins, device, dtype) -> UAEReconstructionPipeline:
    """The UAE pipeline at real (or reduced) size; tokenizers and processors are the twins' (same formats)."""
    tiny_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(twins / "encoder").config
    with torch.device(device):
        text = _sized(QWEN25_VL_3B_TEXT, reduced) | {"bos_token_id": tiny_encoder.text_config.bos_token_id,
                                                     "eos_token_id": tiny_encoder.text_config.eos_token_id}
        vlm = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=text, vision_config=_sized(QWEN25_VL_3B_VISION, reduced),
            image_token_id=tiny_encoder.image_token_id, video_token_id=tiny_encoder.video_token_id,
            vision_start_token_id=tiny_encoder.vision_start_token_id,
            vision_end_token_id=tiny_encoder.vision_end_token_id, tie_word_embeddings=True)).to(dtype).eval()
        transformer = SD3Transformer2DModel(**_sized(SD35[decoder], reduced)).to(dtype)
        vae = AutoencoderKL(**_sized(SD3_VAE, reduced)).to(dtype)
        encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**_sized(clip, reduced))).to(dtype).eval()
                    for clip in (CLIP_L, CLIP_G)]
        hidden = vlm.config.get_text_config().hidden_size
        projector = UAEProjector(hidden, 4 * hidden, transformer.config.joint_attention_dim).to(dtype)
    if transformer.config.pooled_projection_dim != sum(e.config.projection_dim for e in encoders):
        raise ValueError("pooled_projection_dim must equal CLIP-L + CLIP-G projection widths")
    tokenizer = CLIPTokenizer.from_pretrained(twins / "decoder" / "tokenizer")
    sd3 = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                   text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
                                   tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    pipe = UAEReconstructionPipeline.from_pipe(sd3, vlm=vlm, processor=AutoProcessor.from_pretrained(twins / "encoder"),
                                               projector=projector)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._start = [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _phase(device, function):
    """(seconds, peak GPU GiB or None, result) of one call."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    result = function()
    _sync(device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return time.perf_counter() - start, peak, result


def dit_flops(transformer, batch: int, height: int, width: int, text_tokens: int, steps: int, cfg: bool) -> float:
    """Model FLOPs of sampling: 2·params·tokens for the matmuls plus 4·tokens²·width per joint-attention layer."""
    config = transformer.config
    tokens = (height // 8 // config.patch_size) * (width // 8 // config.patch_size) + text_tokens
    width_ = config.num_attention_heads * config.attention_head_dim
    params = sum(p.numel() for p in transformer.parameters())
    per_forward = 2 * params * tokens + 4 * tokens**2 * width_ * config.num_layers
    return per_forward * batch * steps * (2 if cfg else 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoder", choices=sorted(SD35), default="large")
    parser.add_argument("--reduced", action="store_true", help="tiny sizes, CPU: checks the script, not a figure")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--caption-tokens", type=int, default=256)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense bf16 peak, for MFU")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = torch.device("cpu" if args.reduced or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.reduced:
        args.batch, args.resolution, args.steps, args.caption_tokens = 2, 64, 2, 8
    figures = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "decoder": args.decoder,
               "reduced": args.reduced, "batch": args.batch, "resolution": args.resolution, "steps": args.steps}
    with tempfile.TemporaryDirectory() as folder:
        twins = build_tiny_models(f"{folder}/twins")
        pipe = build(args.decoder, args.reduced, twins, device, dtype).to(device)
        figures["parameters_b"] = {name: sum(p.numel() for p in module.parameters()) / 1e9
                                   for name, module in (("vlm", pipe.vlm), ("dit", pipe.transformer))}
        rng = np.random.default_rng(0)
        images = [PIL.Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(args.batch)]
        seconds, peak, captions = _phase(device, lambda: caption_images(
            pipe.vlm, pipe.processor, images, max_new_tokens=args.caption_tokens, min_new_tokens=args.caption_tokens))
        figures["captions_per_s"], figures["caption_peak_gib"] = args.batch / seconds, peak
        generators = [torch.Generator().manual_seed(i) for i in range(args.batch)]
        kwargs = dict(height=args.resolution, width=args.resolution, num_inference_steps=args.steps, output_type="np")
        pipe.generate(captions, generator=generators, **kwargs)  # warm-up
        seconds, peak, _ = _phase(device, lambda: pipe.generate(captions, generator=generators, **kwargs))
        figures["reconstructions_per_s"], figures["reconstruction_peak_gib"] = args.batch / seconds, peak
        text_tokens = pipe.encode_captions(captions)["prompt_embeds"].shape[1]
        flops = dit_flops(pipe.transformer, args.batch, args.resolution, args.resolution, text_tokens, args.steps, True)
        figures["dit_sampling_mfu"] = None if device.type == "cpu" else flops / seconds / (args.peak_tflops * 1e12)

        data = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
        for stage in ("understanding", "generation"):
            timer = StepTimer()
            config = UnifiedGRPOConfig(
                stage=stage, output_dir=f"{folder}/{stage}", max_steps=2, per_device_train_batch_size=args.batch,
                num_generations=args.batch, max_completion_length=args.caption_tokens, report_to=[],
                use_cpu=device.type == "cpu", bf16=device.type == "cuda", save_strategy="no", logging_steps=1,
                decoder_height=args.resolution, decoder_width=args.resolution, decoder_num_inference_steps=args.steps,
                decoder_lora_r=32, decoder_lora_alpha=64, log_reconstructions_steps=0, reward_batch_size=args.batch,
                backbone_checkpoints={"clip": str(twins / "backbones" / "clip")},
            )
            peft = None
            if stage == "understanding":
                from peft import LoraConfig

                peft = LoraConfig(r=32, lora_alpha=64, target_modules="all-linear", task_type="CAUSAL_LM")
            trainer = UnifiedGRPOTrainer(model=pipe.vlm, decoder=pipe, args=config, train_dataset=data,
                                         processing_class=pipe.processor, peft_config=peft, callbacks=[timer])
            seconds, peak, _ = _phase(device, trainer.train)
            figures[f"{stage}_step_s"] = timer.times[-1]
            figures[f"{stage}_images_per_s"] = args.batch / timer.times[-1]
            figures[f"{stage}_peak_gib"] = peak
            if stage == "understanding":
                pipe.vlm = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
    for key, value in figures.items():
        print(f"{key:<28}{value}")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
