"""The toy world's models: the same twin architectures as the tests' (Qwen2.5-VL encoder, SD3 decoder, UAE
projector), sized for 32-pixel scenes, with a tokenizer that knows the world's words and a VAE trained on it."""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from ..pipelines.uae_reconstruction.pipeline_uae_reconstruction import CAPTION_INSTRUCTION, NEGATIVE_PROMPT
from ..tiny_models import build_tiny_decoder, build_tiny_encoder, build_tiny_projector
from .world import ATTRIBUTES, DETAIL_LEVELS, IMAGE_SIZE, scene_at

ENCODER_TEXT = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
)
# 4-pixel patches merged 2×2: a 32-pixel scene is 16 image tokens in one attention window.
ENCODER_VISION = dict(
    depth=3, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=4, window_size=32,
    fullatt_block_indexes=[0, 1, 2],
)
JOINT_ATTENTION_DIM = 64
DECODER_TRANSFORMER = dict(
    sample_size=IMAGE_SIZE // 2,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=3,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=JOINT_ATTENTION_DIM,
    caption_projection_dim=64,
    pos_embed_max_size=IMAGE_SIZE // 4,
    dual_attention_layers=(),
)


def world_corpus(num_scenes: int = 400, seed: int = 0) -> list[str]:
    """The prompts plus captions at every detail level: the encoder's BPE learns one token per world word."""
    scenes = [scene_at(seed + 11, i) for i in range(num_scenes)]
    return [CAPTION_INSTRUCTION, NEGATIVE_PROMPT, "You are a helpful assistant."] + [
        scene.caption(level) for scene in scenes for level in DETAIL_LEVELS
    ]


def train_toy_vae(steps: int = 400, batch_size: int = 32, learning_rate: float = 2e-3, seed: int = 0) -> AutoencoderKL:
    """An SD3-style `AutoencoderKL` (4 latent channels, 2× downsampling) trained to reconstruct world scenes; its
    `scaling_factor`/`shift_factor` standardise the latents, as SD3's do."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)

    def pixels(start: int) -> torch.Tensor:
        images = [scene_at(seed + 13, start + i).render() for i in range(batch_size)]
        array = torch.stack([torch.from_numpy(np.array(image)) for image in images])
        return array.permute(0, 3, 1, 2).float() / 127.5 - 1

    vae.train()
    for step in tqdm(range(steps), desc="toy VAE", unit="step"):
        x = pixels(step * batch_size)
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels(10_000_000 + i * batch_size)).latent_dist.mode() for i in range(8)])
    vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1 / latents.std()))
    return vae


def pretrain_toy_vision(
    vlm, processor, steps: int = 600, batch_size: int = 64, learning_rate: float = 2e-3, seed: int = 0
) -> dict[str, float]:
    """Pre-train the encoder's vision tower to read every attribute: the stand-in for the pretrained vision encoder
    every real VLM starts from. Linear heads (dropped afterwards) read every attribute from the image's merged tokens
    side by side, and the position once more from their mean.

    The mean carries no token order, so that head makes the tower write where the shape is into the tokens' content.
    Without it the position is only in which token holds the shape, and the LLM would have to read it from M-RoPE,
    whose height and width sections get this LLM's lowest rotary frequencies (one row turns a phase by at most 0.1
    radian, one column by at most 0.003): after SFT such an encoder picked the right position for 17% of held-out
    scenes (chance 11%), and stage 2 then rewarded guessed positions. Returns the heads' accuracy on the last batch
    (`position` is the mean-pooled head's)."""
    visual, vision = vlm.model.visual, vlm.config.vision_config
    torch.manual_seed(seed)
    tokens_per_image = (IMAGE_SIZE // (vision.patch_size * vision.spatial_merge_size)) ** 2
    width = vision.out_hidden_size
    probe = torch.nn.ModuleDict({name: torch.nn.Linear(tokens_per_image * width, len(values))
                                 for name, values in ATTRIBUTES.items()})
    pooled_position = torch.nn.Linear(width, len(ATTRIBUTES["position"]))
    optimizer = torch.optim.AdamW([*visual.parameters(), *probe.parameters(), *pooled_position.parameters()],
                                  lr=learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps)
    accuracy: dict[str, float] = {}
    visual.train()
    for step in tqdm(range(steps), desc="toy vision tower", unit="step"):
        scenes = [scene_at(seed + 17, step * batch_size + i) for i in range(batch_size)]
        inputs = processor.image_processor(images=[scene.render() for scene in scenes], return_tensors="pt")
        tokens = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
        tokens = tokens.reshape(batch_size, tokens_per_image, width)
        labels = {name: torch.tensor([scene.labels()[name] for scene in scenes]) for name in ATTRIBUTES}
        logits = {name: head(tokens.flatten(1)) for name, head in probe.items()}
        pooled = pooled_position(tokens.mean(1))
        loss = sum(F.cross_entropy(logits[name], labels[name]) for name in ATTRIBUTES)
        loss = loss + F.cross_entropy(pooled, labels["position"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        accuracy = {name: float((logits[name].argmax(-1) == labels[name]).float().mean()) for name in ATTRIBUTES}
        accuracy["position"] = float((pooled.argmax(-1) == labels["position"]).float().mean())
    visual.eval()
    return accuracy


def build_toy_encoder(path, seed: int = 0) -> None:
    """Write the toy world's encoder (untrained) and its processor to `path`."""
    build_tiny_encoder(
        path,
        corpus=world_corpus(seed=seed),
        num_merges=400,
        text_config=ENCODER_TEXT,
        vision_config=ENCODER_VISION,
        pixel_bounds=(IMAGE_SIZE * IMAGE_SIZE, 4 * IMAGE_SIZE * IMAGE_SIZE),
    )


def build_toy_world_models(out_dir, vae_steps: int = 400, vision_steps: int = 600, seed: int = 0) -> Path:
    """Write `encoder/` (vision tower pre-trained), `decoder/` (with the trained VAE) and `projector/` for the toy
    world under `out_dir`."""
    out_dir = Path(out_dir)
    build_toy_encoder(out_dir / "encoder", seed=seed)
    vlm = AutoModelForImageTextToText.from_pretrained(out_dir / "encoder")
    pretrain_toy_vision(vlm, AutoProcessor.from_pretrained(out_dir / "encoder"), steps=vision_steps, seed=seed)
    vlm.save_pretrained(out_dir / "encoder")
    build_tiny_decoder(
        out_dir / "decoder", with_t5=False, transformer_config=DECODER_TRANSFORMER, vae=train_toy_vae(vae_steps, seed=seed)
    )
    build_tiny_projector(out_dir / "projector", ENCODER_TEXT["hidden_size"], JOINT_ATTENTION_DIM)
    return out_dir
