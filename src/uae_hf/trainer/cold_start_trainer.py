"""[`ColdStartTrainer`]: the semantic reconstruction loss, back-propagated through a short sampler.

Teacher-forced LLM hidden states of the caption ("generate" role) → projector → the deterministic sampler of
`flow_sde` run with gradients (each step recomputed in the backward pass when `cold_start_checkpointing`) → VAE
decode → backbone features → `1 - cos(E(x_hat), E(x))`, the reference features under `no_grad`. Which parts train is
configurable: the projector, an LLM LoRA, a DiT LoRA. Captions of different lengths share a batch (masked joint
attention).
"""

import re
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig
from torch import nn

from ..decoders.sd3 import SD3Family
from ..hub import make_adapter_config_portable
from ..rewards.similarity import ImageSimilarity
from ..sampling.flow_sde import sample_trajectory
from ..seeding import stream_seed
from .cold_start_config import ColdStartConfig
from .decoder_trainer import (
    CAPTION_STREAM,
    DIT_LORA_FILE,
    PROJECTOR_FILE,
    DecoderTrainer,
    dataset_captions,
    row_images,
    save_diffusers_model,
    submodule_weights,
)
from .frozen_sharding import block_classes


def pil_to_pixels(images, height: int, width: int) -> torch.Tensor:
    """`(N, 3, H, W)` float tensors in [0, 1], resized to `height`×`width`."""
    arrays = [np.asarray(image.resize((width, height)), dtype=np.float32) / 255.0 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def language_model_linear_layers(vlm) -> str:
    """A PEFT `target_modules` regex for every linear layer of a VLM's language model (the paper's LLM LoRA), named as
    the model names them (Qwen2.5-VL, Qwen3-VL, Gemma 3: the attention and MLP projections under
    `model.language_model`); the vision tower and the output head are left out."""
    decoder = vlm.get_decoder()
    prefix = next(name for name, module in vlm.named_modules() if module is decoder)
    names = sorted({name.rpartition(".")[2] for name, module in decoder.named_modules() if isinstance(module, nn.Linear)})
    return rf"{re.escape(prefix)}\..*\.({'|'.join(names)})"


class ColdStartModel(nn.Module):
    """The differentiable round trip as `forward(originals, captions, generator) -> loss`.

    Args:
        decoder (`UAEReconstructionPipeline`): its `vlm`, `projector` and `transformer` are the (partly) trained
            modules; the VAE and the schedule are used frozen.
        similarity (`ImageSimilarity`): the backbones `E` of the loss.
        weights (`dict[str, float]`): one weight per backbone of `similarity`.
        args ([`ColdStartConfig`]): decoder size, steps, guidance and checkpointing.
    """

    def __init__(self, decoder, similarity: ImageSimilarity, weights: dict[str, float], args: ColdStartConfig):
        super().__init__()
        self.vlm, self.projector, self.transformer = decoder.vlm, decoder.projector, decoder.transformer
        # frozen, not submodules
        self.helpers = {"decoder": decoder, "family": SD3Family(decoder), "similarity": similarity}
        self.weights = weights
        self.args = args

    @property
    def _no_split_modules(self) -> list[str]:
        """The LLM's and the DiT's blocks: the layers FSDP shards one by one (accelerate's auto-wrap policy reads
        this)."""
        return sorted({*block_classes(self.vlm), *self.transformer._no_split_modules})

    def reconstruct(self, captions: list[str], generator: torch.Generator) -> torch.Tensor:
        """Captions → images in [0, 1], differentiable w.r.t. every trainable part."""
        decoder, family, args = self.helpers["decoder"], self.helpers["family"], self.args
        conditioning = decoder.encode_captions(captions, "embeddings")
        shape = (len(captions), self.transformer.config.in_channels,
                 args.decoder_height // decoder.vae_scale_factor, args.decoder_width // decoder.vae_scale_factor)
        device = conditioning["prompt_embeds"].device
        noise = torch.randn(shape, generator=generator).to(device)
        trajectory = sample_trajectory(
            family, conditioning, noise, args.decoder_num_inference_steps, args.decoder_guidance_scale,
            noise_level=0.0, transformer=self.transformer,
            checkpoint_steps=args.cold_start_checkpointing and torch.is_grad_enabled(),
        )
        return family.decode(trajectory.latents[:, -1], "pt").float()

    def forward(self, originals: torch.Tensor, captions: list[str], generator: torch.Generator) -> torch.Tensor:
        reconstructions = self.reconstruct(captions, generator)
        loss = torch.zeros((), device=reconstructions.device)
        for name, embedder in self.helpers["similarity"].embedders.items():
            with torch.no_grad():
                target = embedder.embed_pixels(originals.to(reconstructions.device))
            cosine = (embedder.embed_pixels(reconstructions) * target).sum(-1)
            loss = loss + self.weights[name] * (1 - cosine).mean()
        return loss


class ColdStartTrainer(DecoderTrainer):
    """Cold start: the parts in `cold_start_trainable` learn `1 - cos(E(x_hat), E(x))` through a short sampler.

    Args:
        model (`str`, `PreTrainedModel` or `None`): the encoder that captions images without a `caption_column`
            value (and for `evaluate()`); default: the decoder's `vlm`.
        decoder (`UAEReconstructionPipeline`): the decoder, with its `vlm`, `processor` and `projector`.
        args ([`ColdStartConfig`], *optional*): trained parts, decoder and backbone settings; the loss backbones and
            weights are `reward_backbones` and `reward_backbone_weights`.
        train_dataset, eval_dataset: datasets with an `image` column (and optionally `caption_column`).
        processing_class: the encoder's processor (default: the decoder's `processor`).
        peft_config (`peft.LoraConfig`, *optional*): the LLM LoRA when `llm_lora` trains (default: r=`llm_lora_r`,
            alpha=`llm_lora_alpha`, all linear layers of the language model, whichever VLM it is).
        callbacks, optimizers: as in `Trainer`.

    Example:

    ```python
    >>> from uae_hf import ColdStartConfig, ColdStartTrainer

    >>> args = ColdStartConfig(output_dir="uae-cold-start", cold_start_trainable=["projector", "dit_lora"])
    >>> trainer = ColdStartTrainer(decoder=decoder, args=args, train_dataset=images)
    >>> trainer.train()
    ```
    """

    config_class = ColdStartConfig
    _tag_names = ["uae", "uae_hf", "cold-start"]
    _stage_description = "semantic reconstruction loss through a short sampler"

    def build_trained_model(self, peft_config, train_dataset) -> torch.nn.Module:
        decoder, args = self.decoder, self.args
        if getattr(decoder, "projector", None) is None or getattr(decoder, "vlm", None) is None:
            raise ValueError("ColdStartTrainer trains the UAE-native path: the decoder needs `vlm`, `processor` and "
                             "`projector`")
        parts = set(args.cold_start_trainable)
        if "projector" in parts:
            decoder.projector.requires_grad_(True).train()
        if "llm_lora" in parts:
            with torch.random.fork_rng():
                torch.manual_seed(args.seed)
                decoder.vlm.add_adapter(peft_config or LoraConfig(
                    r=args.llm_lora_r, lora_alpha=args.llm_lora_alpha, init_lora_weights="gaussian",
                    target_modules=language_model_linear_layers(decoder.vlm),
                ))
        if "dit_lora" in parts:
            self.add_dit_lora(decoder.transformer)
        reward = self.reconstruction_reward
        return ColdStartModel(decoder, reward.similarity, reward.weights, args)

    def stage_loss(self, model, rows, generator):
        args = self.args
        images = row_images(rows)
        captions = dataset_captions(rows, args.caption_column)
        missing = [index for index, caption in enumerate(captions) if caption is None]
        if missing:  # the encoder writes the missing captions, which are then teacher-forced
            seed = stream_seed(generator.initial_seed(), CAPTION_STREAM)  # leaves the step's noise stream alone
            written = self.caption([images[index] for index in missing], seed)
            for index, caption in zip(missing, written):
                captions[index] = caption
        originals = pil_to_pixels(images, args.decoder_height, args.decoder_width).to(self.accelerator.device)
        loss = model(originals, captions, generator)
        return loss, {"semantic_similarity": 1.0 - float(loss.detach())}

    def save_parts(self, output_dir: Path, weights: dict[str, torch.Tensor]) -> None:
        """The trained parts, each in the layout its loader reads: `projector/`, the DiT LoRA (diffusers file),
        `encoder_adapter/` (a PEFT adapter folder for `pipe.load_encoder_adapter`)."""
        parts = set(self.args.cold_start_trainable)
        if "projector" in parts:
            save_diffusers_model(self.decoder.projector, output_dir / "projector",
                                 submodule_weights(weights, "projector"))
        if "dit_lora" in parts:
            self.save_dit_lora(self.decoder.transformer, output_dir, submodule_weights(weights, "transformer"))
        if "llm_lora" in parts:
            self.decoder.vlm.save_pretrained(output_dir / "encoder_adapter", state_dict=submodule_weights(weights, "vlm"))
            self.decoder.processor.save_pretrained(output_dir / "encoder_adapter")
            make_adapter_config_portable(output_dir / "encoder_adapter")

    def saved_files(self) -> list[tuple[str, str, str]]:
        parts = set(self.args.cold_start_trainable)
        rows = {
            "projector": PROJECTOR_FILE,
            "dit_lora": DIT_LORA_FILE,
            "llm_lora": ("encoder_adapter/", "LLM LoRA (PEFT adapter)", "`pipe.load_encoder_adapter(...)`"),
        }
        return [rows[part] for part in ("projector", "dit_lora", "llm_lora") if part in parts]
