"""Stage "cold_start": the semantic reconstruction loss, back-propagated through a short sampler.

Teacher-forced LLM hidden states of the caption ("generate" role) → projector → an Euler sampler run with
gradients (each step recomputed in the backward pass when `cold_start_checkpointing`) → VAE decode → backbone
features → `1 - cos(E(x_hat), E(x))`, the reference features under `no_grad`. Which parts train is configurable:
the projector, an LLM LoRA, a DiT LoRA. Captions of different lengths share a batch (masked joint attention).
"""

from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..images import load_image
from ..pipelines.uae_reconstruction.pipeline_uae_reconstruction import caption_images
from ..sampling.flow_sde import schedule, velocity
from .loop_stage import TrainerLoopStage, dataset_captions
from .unified_grpo_config import UnifiedGRPOConfig
from .unified_grpo_trainer import build_reconstruction_reward


def pil_to_pixels(images, height: int, width: int) -> torch.Tensor:
    """`(N, 3, H, W)` float tensors in [0, 1], resized to `height`×`width`."""
    arrays = [np.asarray(image.resize((width, height)), dtype=np.float32) / 255.0 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


class ColdStartModel(nn.Module):
    """The differentiable round trip as `forward(originals, captions, generator) -> loss`."""

    def __init__(self, decoder, reward, args: UnifiedGRPOConfig):
        super().__init__()
        self.vlm, self.projector, self.transformer = decoder.vlm, decoder.projector, decoder.transformer
        self.helpers = {"decoder": decoder, "reward": reward}  # frozen, not submodules
        self.args = args

    def reconstruct(self, captions: list[str], generator: torch.Generator) -> torch.Tensor:
        """Captions → images in [0, 1], differentiable w.r.t. every trainable part."""
        decoder, args = self.helpers["decoder"], self.args
        conditioning = decoder.generate_conditioning(captions)
        pooled = decoder.uae_pooled_prompt_embeds().to(conditioning.prompt_embeds.device).expand(len(captions), -1)
        mask = conditioning.text_mask()
        shape = (len(captions), self.transformer.config.in_channels,
                 args.decoder_height // decoder.vae_scale_factor, args.decoder_width // decoder.vae_scale_factor)
        x = torch.randn(shape, generator=generator).to(conditioning.prompt_embeds.device)
        timesteps, sigmas = schedule(decoder, args.decoder_num_inference_steps, args.decoder_height,
                                     args.decoder_width, x.device)

        def euler_step(x, embeds, negative_embeds, index):
            features = dict(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, pooled_prompt_embeds=pooled,
                            negative_pooled_prompt_embeds=pooled,
                            joint_attention_kwargs=None if bool(mask.all()) else {"encoder_attention_mask": mask})
            v = velocity(self.transformer, x, timesteps[index], features, args.decoder_guidance_scale)
            return x + (sigmas[index + 1] - sigmas[index]) * v.float()

        for index in range(len(timesteps)):
            inputs = (x, conditioning.prompt_embeds, conditioning.negative_prompt_embeds, index)
            x = checkpoint(euler_step, *inputs, use_reentrant=False) if args.cold_start_checkpointing else euler_step(*inputs)
        vae = decoder.vae
        image = vae.decode((x / vae.config.scaling_factor + vae.config.shift_factor).to(vae.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def forward(self, originals: torch.Tensor, captions: list[str], generator: torch.Generator) -> torch.Tensor:
        reward = self.helpers["reward"]
        reconstructions = self.reconstruct(captions, generator)
        loss = torch.zeros((), device=reconstructions.device)
        for name, embedder in reward.similarity.embedders.items():
            with torch.no_grad():
                target = embedder.embed_pixels(originals.to(reconstructions.device))
            cosine = (embedder.embed_pixels(reconstructions) * target).sum(-1)
            loss = loss + reward.weights[name] * (1 - cosine).mean()
        return loss


class ColdStartTrainer(TrainerLoopStage):
    """`UnifiedGRPOTrainer` for `stage="cold_start"`. `model` is the encoder that captions images lacking a
    `caption_column` (default: the decoder's `vlm`); `peft_config` is the LLM LoRA when `llm_lora` trains (default:
    r=`llm_lora_r`, alpha=`llm_lora_alpha`, all linear layers of the language model). The loss backbones and
    weights are the reward's (`reward_backbones`, `reward_backbone_weights`)."""

    _tag_names = ["uae", "uae_hf", "cold-start"]
    _name = "UnifiedGRPO (cold start)"

    def __init__(self, model, decoder, args: UnifiedGRPOConfig, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_funcs=None, peft_config=None, callbacks=None, optimizers=(None, None)):
        self._setup_parts(model, decoder, args, train_dataset, processing_class, reward_funcs)
        decoder = self.decoder
        if decoder.projector is None or decoder.vlm is None:
            raise ValueError('stage "cold_start" trains the UAE-native path: the decoder needs `vlm`, `processor` '
                             "and `projector`")
        parts = set(args.cold_start_trainable)
        if "projector" in parts:
            decoder.projector.requires_grad_(True).train()
        if "llm_lora" in parts:
            with torch.random.fork_rng():
                torch.manual_seed(args.seed)
                decoder.vlm.add_adapter(peft_config or LoraConfig(
                    r=args.llm_lora_r, lora_alpha=args.llm_lora_alpha, init_lora_weights="gaussian",
                    target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                ))
        if "dit_lora" in parts:
            self.add_dit_lora(decoder.transformer, args)
        self.reconstruction_reward = build_reconstruction_reward(decoder, args)
        model = ColdStartModel(decoder, self.reconstruction_reward, args)
        self._init_trainer(model, args, train_dataset, eval_dataset, callbacks, optimizers,
                           images_per_device=args.per_device_train_batch_size)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        images = [load_image(row["image"], f"image[{index}]") for index, row in enumerate(inputs)]
        captions = dataset_captions(inputs, args.caption_column)
        missing = [index for index, caption in enumerate(captions) if caption is None]
        if missing:  # the encoder writes the missing captions, which are then teacher-forced
            written = caption_images(self.encoder, self.caption_processor, [images[index] for index in missing],
                                     max_new_tokens=args.max_completion_length, temperature=args.temperature)
            for index, caption in zip(missing, written):
                captions[index] = caption
        originals = pil_to_pixels(images, args.decoder_height, args.decoder_width).to(self.accelerator.device)
        loss = model(originals, captions, self._step_generator())
        self._record({"semantic_similarity": 1.0 - float(loss.detach())})
        return (loss, None) if return_outputs else loss

    def save_parts(self, output_dir: Path) -> None:
        """The trained parts, each in the layout its loader reads: `projector/`, the DiT LoRA (diffusers file),
        `encoder_adapter/` (a PEFT adapter folder for `pipe.load_encoder_adapter`)."""
        parts = set(self.args.cold_start_trainable)
        if "projector" in parts:
            self.decoder.projector.save_pretrained(output_dir / "projector")
        if "dit_lora" in parts:
            self.save_dit_lora(self.decoder.transformer, output_dir)
        if "llm_lora" in parts:
            self.decoder.vlm.save_pretrained(output_dir / "encoder_adapter")
            self.decoder.processor.save_pretrained(output_dir / "encoder_adapter")
