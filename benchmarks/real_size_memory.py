"""Per-GPU memory of the weights and training state of each stage at real size (Qwen2.5-VL-3B encoder, SD3.5-Large
decoder, CLIP ViT-L/14 reward), for 1, 8 and 64 GPUs under DDP, ZeRO-2 and FSDP2 / ZeRO-3. COMPUTED, not measured:
parameter counts come from the published architectures built on the meta device (gpu_real_size.py's configs) with the
recipes' LoRAs attached; bytes follow the dtype rules (frozen weights bf16, 2 B; trained weights fp32 master + fp32
gradient + AdamW's two moments, 16 B; an EMA or old-policy copy fp32, 4 B, whole on every GPU). Activations, the
CUDA context and the allocator's slack are not included: add the measured peaks of docs/performance.md.

    python benchmarks/real_size_memory.py [--output memory.json]

What each engine shards is what it is handed: the stage's trained model (for stage 3 the whole DiT, frozen base
weights included; for stage 2 the whole encoder). Frozen models outside it (the decoder in stage 2, the encoder in
stage 3, VAE, text encoders, projector) are a copy per GPU under DDP and DeepSpeed; under FSDP2
`shard_frozen_models` (default) shards them for inference. The reward backbones stay a copy per GPU everywhere.
"""

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from gpu_real_size import CLIP_G, CLIP_L, CLIP_VIT_L14, QWEN25_VL_3B_TEXT, QWEN25_VL_3B_VISION, SD3_VAE, SD35
from peft import LoraConfig, get_peft_model
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import benchmark_cli  # a sibling module: benchmarks run as scripts

from uae_hf.decoders.sd3 import SD3_LORA_TARGETS  # noqa: E402

GPU_COUNTS = (1, 8, 64)
FROZEN, TRAINED, COPY = 2, 16, 4  # bytes per parameter
LLM_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def _count(module: torch.nn.Module, lora_only: bool = False) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if not lora_only or "lora_" in name)


def parameter_counts() -> dict[str, int]:
    """Parameters of every model and LoRA of the recipes (r=32, alpha=64), counted on the meta device."""
    with torch.device("meta"):
        vlm = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=QWEN25_VL_3B_TEXT,
                                                                  vision_config=QWEN25_VL_3B_VISION,
                                                                  tie_word_embeddings=True))
        dit = SD3Transformer2DModel(**SD35["large"])
        counts = {
            "encoder": _count(vlm), "dit": _count(dit), "vae": _count(AutoencoderKL(**SD3_VAE)),
            "clip_text_encoders": sum(_count(CLIPTextModelWithProjection(CLIPTextConfig(**c))) for c in (CLIP_L, CLIP_G)),
            "reward_backbone": _count(CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_L14))),
        }
        hidden, joint = QWEN25_VL_3B_TEXT["hidden_size"], SD35["large"]["joint_attention_dim"]
        counts["projector"] = hidden * 4 * hidden + 4 * hidden + 4 * hidden * joint + joint
        counts["encoder_lora"] = _count(get_peft_model(vlm, LoraConfig(r=32, lora_alpha=64, target_modules=LLM_LINEAR)),
                                        lora_only=True)
        dit.add_adapter(LoraConfig(r=32, lora_alpha=64, target_modules=list(SD3_LORA_TARGETS)))
        counts["dit_lora"] = _count(dit, lora_only=True)
    return counts


def stages(c: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per stage: the sharded model's frozen and trained parameters, the frozen ones outside it, and copies."""
    text_side = c["vae"] + c["clip_text_encoders"]  # frozen in every stage, sharded for inference under FSDP2
    backbone = c["reward_backbone"]  # whole on every GPU under every engine
    return {
        "understanding (GRPO, encoder LoRA)": dict(
            model_frozen=c["encoder"], trained=c["encoder_lora"], outside=c["dit"] + c["projector"] + text_side + backbone,
            copies=0, fsdp2_sharded_outside=c["dit"] + c["projector"] + text_side),
        "generation (Flow-GRPO, DiT LoRA, EMA)": dict(
            model_frozen=c["dit"], trained=c["dit_lora"], outside=c["encoder"] + c["projector"] + text_side + backbone,
            copies=c["dit_lora"], fsdp2_sharded_outside=c["encoder"] + c["projector"] + text_side),
        "generation_nft (DiffusionNFT, DiT LoRA, old policy + EMA)": dict(
            model_frozen=c["dit"], trained=c["dit_lora"], outside=c["encoder"] + c["projector"] + text_side + backbone,
            copies=2 * c["dit_lora"], fsdp2_sharded_outside=c["encoder"] + c["projector"] + text_side),
        "pretrain (projector + DiT LoRA)": dict(
            model_frozen=c["dit"], trained=c["projector"] + c["dit_lora"], outside=c["encoder"] + text_side + backbone,
            copies=0, fsdp2_sharded_outside=c["encoder"] + text_side),
        "pretrain, full DiT": dict(
            model_frozen=0, trained=c["projector"] + c["dit"], outside=c["encoder"] + text_side + backbone, copies=0,
            fsdp2_sharded_outside=c["encoder"] + text_side),
        "cold_start (projector + encoder LoRA + DiT LoRA)": dict(
            model_frozen=c["encoder"] + c["dit"], trained=c["projector"] + c["encoder_lora"] + c["dit_lora"],
            outside=text_side + backbone, copies=0, fsdp2_sharded_outside=text_side),
    }


def per_gpu_bytes(stage: dict[str, int], engine: str, gpus: int) -> float:
    frozen_model = stage["model_frozen"] * FROZEN
    outside = stage["outside"] * FROZEN
    if engine == "fsdp2":  # frozen models FSDP2 shards for inference
        outside -= stage["fsdp2_sharded_outside"] * FROZEN * (1 - 1 / gpus)
    params, rest = stage["trained"] * COPY, stage["trained"] * (TRAINED - COPY)  # master weights; grads + moments
    if engine == "ddp":
        sharded, replicated = 0.0, frozen_model + params + rest
    elif engine == "zero2":
        sharded, replicated = rest, frozen_model + params
    else:  # fsdp2, zero3
        sharded, replicated = frozen_model + params + rest, 0.0
    return sharded / gpus + replicated + outside + stage["copies"] * COPY


def measure() -> dict:
    counts = parameter_counts()
    table = {name: {engine: {gpus: per_gpu_bytes(stage, engine, gpus) / 1e9 for gpus in GPU_COUNTS}
                    for engine in ("ddp", "zero2", "zero3", "fsdp2")}
             for name, stage in stages(counts).items()}
    return {"parameters": counts, "per_gpu_gb": table}


def report(figures: dict) -> None:
    print("parameters:", ", ".join(f"{name} {count / 1e6:,.1f}M" for name, count in figures["parameters"].items()))
    print("computed per-GPU GB of weights + training state (no activations):")
    print(f"{'stage':<58}{'engine':<13}" + "".join(f"{f'{n} GPU':>9}" for n in GPU_COUNTS))
    for stage, engines in figures["per_gpu_gb"].items():
        for engine, row in engines.items():
            print(f"{stage:<58}{engine:<13}" + "".join(f"{row[n]:>9.1f}" for n in GPU_COUNTS))


if __name__ == "__main__":
    benchmark_cli.run(__doc__, measure, report, {})
