"""Build a twin of the released UAE model's layout from the tiny twins (test helper).

Same folder names, file names and key formats as `zhiyuanyan1/UAE`: `llm/` in transformers 4.50's key layout with
the projector inside, `llm_lora/` as three shards of the whole model with its language model PEFT-wrapped (LoRA pairs,
`base_layer` weights, embeddings, norms, vision tower, projector; the non-LoRA ones equal to `llm/`'s unless
`replace_base_weights` changes some), `dit_lora/` as a PEFT adapter folder; every LoRA non-zero. Returns the LoRA
pairs for hand merging too. Keys are written by string rules here, not by PEFT, so the loader is checked against them.
"""

import json
import shutil
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration

from uae_hf import UAEProjector

LLM_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
DIT_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out")


def _old_layout(key: str) -> str:
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return "visual." + key[len("model.visual."):]
    return key


def wrapped_key(key: str) -> str:
    """A key of `llm/` (transformers 4.50's layout) → its key in the release's PEFT-wrapped model."""
    return "model.base_model.model." + key[len("model."):] if key.startswith("model.") else key


def build_synthetic_release(tiny_dir: Path, root: Path, llm_rank: int = 32, dit_rank: int = 4, dit_alpha: int = 8,
                            seed: int = 0) -> dict:
    """Write the release layout under `root`; return {"llm": {module: (A, B)}, "dit": {...}} for hand merging."""
    generator = torch.Generator().manual_seed(seed)
    shutil.copytree(tiny_dir / "decoder", root / "SD3")
    transformer = SD3Transformer2DModel.from_pretrained(tiny_dir / "decoder" / "transformer")
    transformer.save_pretrained(root / "dit")

    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir / "encoder")
    projector = UAEProjector.from_pretrained(tiny_dir / "projector")
    state = {_old_layout(k): v.contiguous() for k, v in vlm.state_dict().items() if k != "lm_head.weight"}
    state |= {k: v.contiguous() for k, v in projector.state_dict().items()}
    (root / "llm").mkdir()
    save_file(state, root / "llm" / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        shutil.copy(tiny_dir / "encoder" / name, root / "llm" / name)
    shutil.copytree(tiny_dir / "encoder", root / "llm_processor",
                    ignore=shutil.ignore_patterns("model.safetensors", "config.json", "generation_config.json"))

    llm_pairs, shard_states = {}, [{}, {}, {}]
    modules = dict(vlm.model.language_model.named_modules())
    for index, (name, module) in enumerate(sorted((n, m) for n, m in modules.items() if n.endswith(LLM_TARGETS))):
        lora_a = torch.randn(llm_rank, module.in_features, generator=generator) * 0.05
        lora_b = torch.randn(module.out_features, llm_rank, generator=generator) * 0.05
        llm_pairs[name] = (lora_a, lora_b)
        shard = shard_states[index % 3]  # a layer's LoRA pair and base weights share a shard
        prefix = f"model.base_model.model.{name}"
        shard[f"{prefix}.lora_A.default.weight"] = lora_a
        shard[f"{prefix}.lora_B.default.weight"] = lora_b
        for kind, value in module.named_parameters():
            shard[f"{prefix}.base_layer.{kind}"] = value.detach().clone()
    others = sorted(key for key in state if not key.startswith(tuple(f"model.{name}." for name in llm_pairs)))
    for index, key in enumerate(others):  # embeddings, norms, vision tower, projector: the rest of the whole model
        shard_states[index % 3][wrapped_key(key)] = state[key].clone()
    (root / "llm_lora").mkdir()
    for number, shard in enumerate(shard_states, start=1):
        save_file(shard, root / "llm_lora" / f"model-{number:05d}-of-00003.safetensors", metadata={"format": "pt"})

    dit_pairs, dit_state = {}, {}
    for name, module in transformer.named_modules():
        if name.endswith(DIT_TARGETS) and isinstance(module, torch.nn.Linear):
            lora_a = torch.randn(dit_rank, module.in_features, generator=generator) * 0.1
            lora_b = torch.randn(module.out_features, dit_rank, generator=generator) * 0.1
            dit_pairs[name] = (lora_a, lora_b)
            dit_state[f"base_model.model.{name}.lora_A.weight"] = lora_a
            dit_state[f"base_model.model.{name}.lora_B.weight"] = lora_b
    (root / "dit_lora").mkdir()
    save_file(dit_state, root / "dit_lora" / "adapter_model.safetensors", metadata={"format": "pt"})
    (root / "dit_lora" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": dit_rank, "lora_alpha": dit_alpha, "target_modules": list(DIT_TARGETS)}))
    return {"llm": llm_pairs, "dit": dit_pairs, "dit_scale": dit_alpha / dit_rank}


def replace_base_weights(root: Path, seed: int = 1) -> dict[str, torch.Tensor]:
    """Change some non-LoRA tensors of `root/llm_lora`'s shards so they differ from `llm/`'s, as a release may.

    Two linear layers' `base_layer` weights, a `base_layer` bias, the final norm and the (lm_head-tied) embeddings.
    Returns {name in `Qwen2_5_VLForConditionalGeneration` (current layout): the new value}, for the hand computation.
    """
    generator = torch.Generator().manual_seed(seed)
    changes = {
        "layers.0.self_attn.q_proj.base_layer.weight": "layers.0.self_attn.q_proj.weight",
        "layers.0.self_attn.q_proj.base_layer.bias": "layers.0.self_attn.q_proj.bias",
        "layers.1.mlp.down_proj.base_layer.weight": "layers.1.mlp.down_proj.weight",
        "norm.weight": "norm.weight",
        "embed_tokens.weight": "embed_tokens.weight",
    }
    new_values = {}
    for file in sorted((root / "llm_lora").glob("*.safetensors")):
        shard = load_file(file)
        for key, name in changes.items():
            key = f"model.base_model.model.{key}"
            if key in shard:
                shard[key] = shard[key] + 0.1 * torch.randn(shard[key].shape, generator=generator)
                new_values[f"model.language_model.{name}"] = shard[key]
        save_file(shard, file, metadata={"format": "pt"})
    assert len(new_values) == len(changes), "the synthetic release lost a key replace_base_weights changes"
    return new_values
