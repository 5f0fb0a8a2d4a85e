"""Per-GPU memory of the weights and training state of each stage at real size (Qwen2.5-VL-3B encoder, SD3.5-Large
decoder, CLIP ViT-L/14 reward; and the other decoder families at their published sizes: FLUX.1-dev's 12B DiT with
T5-XXL and CLIP-L, Qwen-Image's 20B DiT with its Qwen2.5-VL-7B text encoder; FLUX.2 [klein]'s transformer config is
not published in a form this offline machine holds, so it is left out; and stage 2 on the other encoder families,
Qwen3-VL-4B-Instruct and Gemma 3 4B-it), for 1, 8 and 64 GPUs under DDP, ZeRO-2 and FSDP2 / ZeRO-3. COMPUTED, not
measured:
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
from diffusers import AutoencoderKL, AutoencoderKLQwenImage, FluxTransformer2DModel, QwenImageTransformer2DModel
from diffusers import SD3Transformer2DModel
from gpu_real_size import CLIP_G, CLIP_L, CLIP_VIT_L14, QWEN25_VL_3B_TEXT, QWEN25_VL_3B_VISION, SD3_VAE, SD35
from peft import LoraConfig, get_peft_model
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection
from transformers import CLIPTextModel, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, T5Config, T5EncoderModel
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration

import benchmark_cli  # a sibling module: benchmarks run as scripts

from uae_hf.decoders.flux import FLUX_LORA_TARGETS  # noqa: E402
from uae_hf.decoders.qwen_image import QWEN_IMAGE_LORA_TARGETS  # noqa: E402
from uae_hf.decoders.sd3 import SD3_LORA_TARGETS  # noqa: E402

# the published configs (diffusers' and transformers' defaults for these classes are these checkpoints')
FLUX1_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584)
QWEN25_VL_7B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
QWEN25_VL_7B_VISION = dict(QWEN25_VL_3B_VISION, out_hidden_size=3584)

# the other encoder families' published configs (Qwen/Qwen3-VL-4B-Instruct, google/gemma-3-4b-it)
QWEN3_VL_4B = dict(
    text_config=dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                      "mrope_interleaved": True}),
    vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                       spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2560, num_position_embeddings=2304,
                       deepstack_visual_indexes=[5, 11, 17]),
    tie_word_embeddings=True)
GEMMA3_4B = dict(
    text_config=dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                     sliding_window=1024),
    vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=896, patch_size=14, vision_use_head=False),
    mm_tokens_per_image=256)

GPU_COUNTS = (1, 8, 64)
ONE_GPU_GB = 80
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


def family_counts() -> dict[str, dict[str, int]]:
    """FLUX.1-dev's and Qwen-Image's DiT (with the family's LoRA, r=32), text encoders and VAE, on the meta device."""
    with torch.device("meta"):
        flux = FluxTransformer2DModel(**FLUX1_DEV)
        qwen = QwenImageTransformer2DModel(**QWEN_IMAGE)
        qwen_text = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=QWEN25_VL_7B_TEXT,
                                                                        vision_config=QWEN25_VL_7B_VISION))
        counts = {
            "FLUX.1-dev": {"dit": _count(flux), "vae": _count(AutoencoderKL(**SD3_VAE)),  # FLUX's VAE: SD3's layout
                           "text_encoders": _count(T5EncoderModel(T5Config(**T5_XXL)))
                           + _count(CLIPTextModel(CLIPTextConfig(**CLIP_L)))},
            "Qwen-Image": {"dit": _count(qwen), "vae": _count(AutoencoderKLQwenImage()),
                           "text_encoders": _count(qwen_text)},
        }
        flux.add_adapter(LoraConfig(r=32, lora_alpha=64, target_modules=list(FLUX_LORA_TARGETS)))
        qwen.add_adapter(LoraConfig(r=32, lora_alpha=64, target_modules=list(QWEN_IMAGE_LORA_TARGETS)))
        counts["FLUX.1-dev"]["dit_lora"] = _count(flux, lora_only=True)
        counts["Qwen-Image"]["dit_lora"] = _count(qwen, lora_only=True)
    return counts


def encoder_counts() -> dict[str, dict[str, int]]:
    """Qwen3-VL-4B's and Gemma 3 4B's parameters and their LLM LoRA (r=32, all linear layers of the language model),
    on the meta device."""
    counts = {}
    with torch.device("meta"):
        for name, model in (("Qwen3-VL-4B", Qwen3VLForConditionalGeneration(Qwen3VLConfig(**QWEN3_VL_4B))),
                            ("Gemma 3 4B", Gemma3ForConditionalGeneration(Gemma3Config(**GEMMA3_4B)))):
            counts[name] = {"encoder": _count(model)}
            lora = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=LLM_LINEAR))
            counts[name]["encoder_lora"] = _count(lora, lora_only=True)
    return counts


def encoder_stages(c: dict[str, int], encoders: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Stage 2 on each other encoder family, rewarded by the released UAE decoder (SD3.5-Large and its projector,
    reading captions with its own frozen Qwen2.5-VL-3B: a second LLM beside the trained one)."""
    text_side = c["vae"] + c["clip_text_encoders"]
    decoder = c["dit"] + c["projector"] + c["encoder"] + text_side
    return {f"understanding with a {name} encoder (encoder LoRA)": dict(
        model_frozen=e["encoder"], trained=e["encoder_lora"], outside=decoder + c["reward_backbone"], copies=0,
        fsdp2_sharded_outside=decoder) for name, e in encoders.items()}


def family_stages(c: dict[str, int], families: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Stage 3 (Flow-GRPO with an EMA) on each family's DiT, the Qwen2.5-VL-3B encoder frozen and captioning, and
    stage 2 with each family as the frozen reward decoder (text mode: no projector)."""
    rows = {}
    for name, f in families.items():
        decoder_side = f["vae"] + f["text_encoders"]
        rows[f"generation on {name} (Flow-GRPO, DiT LoRA, EMA)"] = dict(
            model_frozen=f["dit"], trained=f["dit_lora"], outside=c["encoder"] + decoder_side + c["reward_backbone"],
            copies=f["dit_lora"], fsdp2_sharded_outside=c["encoder"] + decoder_side)
        rows[f"understanding with {name} as reward (encoder LoRA)"] = dict(
            model_frozen=c["encoder"], trained=c["encoder_lora"],
            outside=f["dit"] + decoder_side + c["reward_backbone"], copies=0,
            fsdp2_sharded_outside=f["dit"] + decoder_side)
    return rows


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
    counts, families, encoders = parameter_counts(), family_counts(), encoder_counts()
    rows = stages(counts) | family_stages(counts, families) | encoder_stages(counts, encoders)
    table = {name: {engine: {gpus: per_gpu_bytes(stage, engine, gpus) / 1e9 for gpus in GPU_COUNTS}
                    for engine in ("ddp", "zero2", "zero3", "fsdp2")}
             for name, stage in rows.items()}
    # weights + state alone, before activations: what one 80 GB GPU cannot hold even so needs sharding
    one_gpu = {name: row["ddp"][1] <= ONE_GPU_GB for name, row in table.items()}
    return {"parameters": counts, "family_parameters": families | encoders, "per_gpu_gb": table,
            "fits_one_80gb_gpu": one_gpu}


def report(figures: dict) -> None:
    print("parameters:", ", ".join(f"{name} {count / 1e6:,.1f}M" for name, count in figures["parameters"].items()))
    print("computed per-GPU GB of weights + training state (no activations):")
    for family, counts in figures["family_parameters"].items():
        print(f"{family}:", ", ".join(f"{name} {count / 1e6:,.1f}M" for name, count in counts.items()))
    print(f"{'stage':<62}{'engine':<13}" + "".join(f"{f'{n} GPU':>9}" for n in GPU_COUNTS))
    for stage, engines in figures["per_gpu_gb"].items():
        for engine, row in engines.items():
            print(f"{stage:<62}{engine:<13}" + "".join(f"{row[n]:>9.1f}" for n in GPU_COUNTS))
    print(f"weights + training state on one {ONE_GPU_GB} GB GPU (activations come on top):")
    for stage, fits in figures["fits_one_80gb_gpu"].items():
        print(f"  {stage:<60}{'fits' if fits else 'needs sharding (FSDP2 / ZeRO-3 over several GPUs)'}")


if __name__ == "__main__":
    benchmark_cli.run(__doc__, measure, report, {})
