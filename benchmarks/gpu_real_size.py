"""Real-size throughput, memory and where the time goes on one GPU: Qwen2.5-VL-3B encoder + SD3.5 (Medium or Large)
decoder + the UAE projector, built from their published architectures with random weights (no download).

    python benchmarks/gpu_real_size.py --decoder large --output gpu.json            # on a GPU
    python benchmarks/gpu_real_size.py --decoder large --compile --output gpu.json  # + torch.compile'd figures
    python benchmarks/gpu_real_size.py --reduced                                    # the same code paths, tiny, on CPU

Prints (and writes with --output, as JSON):
- every component's dtype(s) and parameter count; the run stops if any is not in --dtype (default bfloat16);
- captions/s, reconstructions/s at 512 px / 10 steps / CFG 5, next to diffusers' stock `StableDiffusion3Pipeline`
  run on the same components, embeddings, noise and settings (with `--compile`: both again, torch.compile'd);
- where one round trip's time goes: caption generation, LLM conditioning, the denoising loop (DiT forwards), VAE
  decode, backbone scoring; and the denoising loop's TFLOP/s and MFU (model FLOPs / time / --peak-tflops, the
  card's dense peak: 989 for H100/H200 SXM in bf16);
- a full stage-2 step (GRPO on the encoder, LoRA r=32) and a full stage-3 step (Flow-GRPO on the DiT, LoRA r=32),
  each split into rollout, reward and update (backward and optimizer step within it);
- peak GPU memory per phase.
"""

import argparse
import contextlib
import functools
import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel  # noqa: E402
from diffusers import StableDiffusion3Pipeline  # noqa: E402
from diffusers.models.attention_processor import JointAttnProcessor2_0  # noqa: E402
from transformers import AutoProcessor, CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, TrainerCallback  # noqa: E402

from uae_hf import (  # noqa: E402
    FlowGRPOConfig,
    FlowGRPOTrainer,
    UAEProjector,
    UAEReconstructionPipeline,
    UnifiedGRPOConfig,
    UnifiedGRPOTrainer,
)
from uae_hf import build_tiny_models, caption_images  # noqa: E402
from uae_hf.rewards.similarity import ImageSimilarity  # noqa: E402

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
CLIP_VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")  # the reward backbone
REDUCE = dict(num_hidden_layers=2, num_layers=2, depth=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, num_heads=4, out_hidden_size=64, fullatt_block_indexes=[1],
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
              attention_head_dim=16, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64,
              projection_dim=32, block_out_channels=(8, 16, 16, 16), norm_num_groups=4, dual_attention_layers=(0,),
              layers_per_block=1)
GUIDANCE = 5.0  # the paper's CFG, given to both pipelines (diffusers' own default is 7.0)

# Phases of one round trip and of a training step, in report order. The inner ones (caption generation ... optimizer
# step) are also timed inside the training steps, where they overlap the outer ones (rollout, reward, update).
ROUND_TRIP_PHASES = ("caption_generation", "llm_conditioning", "denoising", "vae_decode", "backbone_scoring")
STEP_PHASES = ("rollout", "reward", "update", *ROUND_TRIP_PHASES, "dit_forward_with_grad", "backward", "optimizer_step")


def _sized(config: dict, reduced: bool) -> dict:
    return {key: (REDUCE[key] if reduced and key in REDUCE else value) for key, value in config.items()}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(decoder: str, reduced: bool, twins, device, dtype) -> UAEReconstructionPipeline:
    """The UAE pipeline at real (or reduced) size; tokenizers and processors are the twins' (same formats)."""
    tiny_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(twins / "encoder").config
    with torch.device(device):
        text = _sized(QWEN25_VL_3B_TEXT, reduced) | {"bos_token_id": tiny_encoder.text_config.bos_token_id,
                                                     "eos_token_id": tiny_encoder.text_config.eos_token_id}
        if reduced:  # the twin tokenizer's vocabulary: logits over Qwen's 151,936 were most of a reduced run on CPU
            text["vocab_size"] = tiny_encoder.text_config.vocab_size
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
    # the way users build it; every component must keep `dtype` (the dtype check in `main` guards that)
    pipe = UAEReconstructionPipeline.from_pipe(sd3, vlm=vlm, processor=AutoProcessor.from_pretrained(twins / "encoder"),
                                               projector=projector)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_backbone(folder, twins, reduced: bool, device, dtype) -> str:
    """A CLIP ViT-L/14 vision tower with random weights (the reward's backbone), saved where the reward loads it."""
    with torch.device(device):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**_sized(CLIP_VIT_L14, reduced))).to(dtype)
    model.save_pretrained(folder)
    shutil.copy(twins / "backbones" / "clip" / "processor_config.json", folder)  # CLIP's preprocessing, 224 px
    return str(folder)


def stock_pipeline(pipe: UAEReconstructionPipeline) -> StableDiffusion3Pipeline:
    """diffusers' own SD3 pipeline on the same DiT, VAE and CLIP encoders (a scheduler of its own, same config)."""
    stock = StableDiffusion3Pipeline(
        transformer=pipe.transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config),
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, text_encoder_2=pipe.text_encoder_2,
        tokenizer_2=pipe.tokenizer_2, text_encoder_3=None, tokenizer_3=None)
    stock.set_progress_bar_config(disable=True)
    return stock


@contextlib.contextmanager
def stock_attention(transformer):
    """diffusers' default `JointAttnProcessor2_0` on every attention layer of the DiT for a while, then its own back
    (the UAE pipeline installs its masked joint-attention processor on the DiT it shares with the stock pipeline)."""
    own = [(module, module.processor) for module in transformer.modules() if hasattr(module, "set_processor")]
    transformer.set_attn_processor(JointAttnProcessor2_0())
    try:
        yield
    finally:
        for module, processor in own:
            module.set_processor(processor)


def compile_decoder(pipe) -> Callable[[], None]:
    """torch.compile each DiT block (regional compilation: one graph serves all the identical blocks, so compiling
    takes seconds, not minutes) and the VAE decoder, in place; returns the function that puts the eager ones back."""
    blocks, decoder = pipe.transformer.transformer_blocks, pipe.vae.decoder
    eager = list(blocks)
    for index, block in enumerate(eager):
        blocks[index] = torch.compile(block)
    pipe.vae.decoder = torch.compile(decoder)

    def undo():
        for index, block in enumerate(eager):
            blocks[index] = block
        pipe.vae.decoder = decoder

    return undo


def components(pipe, similarity: ImageSimilarity) -> dict:
    """Dtype(s) and parameter count of every model: the pipeline's components and the reward's backbones."""
    modules = {name: module for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    modules |= {f"backbone_{name}": embedder.model for name, embedder in similarity.embedders.items()}
    return {name: {"dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters()}),
                   "parameters": sum(p.numel() for p in module.parameters())} for name, module in modules.items()}


class PhaseTimer:
    """Seconds and peak GPU memory per named phase, summed over every call of the instrumented methods and modules.

    It instruments instances only (a method is shadowed by an instance attribute, a module gets forward hooks, so
    wrappers that others put on `forward`, like accelerate's autocast, keep working) and `restore()` undoes it all.
    On CUDA it synchronises before and after each call, so a phase's time is the GPU's. Phases may nest (the denoising
    inside the reward): each counts its own calls in full. Each phase restarts CUDA's peak-memory counter, so
    `max_gib` keeps the peak seen over all of them for whoever measures around them.
    """

    def __init__(self, device):
        self.device = device
        self.seconds, self.peak_gib, self.max_gib = defaultdict(float), defaultdict(float), 0.0
        self._active, self._undo = [], []

    def reset(self):
        self.seconds.clear()
        self.peak_gib.clear()

    def _record_peak(self):
        peak = torch.cuda.max_memory_allocated() / 2**30
        self.max_gib = max(self.max_gib, peak)
        for name in self._active:
            self.peak_gib[name] = max(self.peak_gib[name], peak)

    @contextlib.contextmanager
    def phase(self, name: str):
        if name in self._active:  # a re-entrant call is already being timed
            yield
            return
        cuda = self.device.type == "cuda"
        _sync(self.device)
        if cuda:  # the enclosing phases keep their peak so far; this one starts counting from here
            self._record_peak()
            torch.cuda.reset_peak_memory_stats()
        self._active.append(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.seconds[name] += time.perf_counter() - start
            if cuda:
                self._record_peak()
            self._active.pop()

    def wrap(self, owner, method: str, name: str):
        """Time every call of `owner.<method>()` as phase `name`."""
        original, own = getattr(owner, method), method in vars(owner)

        @functools.wraps(original)  # keeps the marks others put on it (torch's LR scheduler marks optimizer.step)
        def timed(*args, **kwargs):
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(owner, method, timed)
        self._undo.append(lambda: setattr(owner, method, original) if own else delattr(owner, method))

    def wrap_forward(self, module: torch.nn.Module, name):
        """Time every forward of `module` as phase `name` (a string, or a function of no arguments that names it)."""
        open_phases = []

        def before(*_):
            open_phases.append(self.phase(name() if callable(name) else name))
            open_phases[-1].__enter__()

        def after(*_):
            open_phases.pop().__exit__(None, None, None)

        handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        self._undo.append(lambda: [handle.remove() for handle in handles])

    def restore(self):
        while self._undo:
            self._undo.pop()()

    def report(self, names, total: float) -> dict:
        """`{phase: {seconds, share of total, peak_gib}}` for the phases named (0 s for one that never ran)."""
        peak = self.device.type == "cuda"
        return {name: {"seconds": self.seconds.get(name, 0.0), "share": self.seconds.get(name, 0.0) / total,
                       "peak_gib": self.peak_gib.get(name) if peak else None} for name in names}


def dit_phase() -> str:
    """Sampling forwards of the DiT are the denoising loop; forwards with gradients belong to a training update."""
    return "dit_forward_with_grad" if torch.is_grad_enabled() else "denoising"


def instrument_pipeline(phases: PhaseTimer, pipe, similarity: ImageSimilarity):
    phases.wrap(pipe.vlm, "generate", "caption_generation")
    phases.wrap(pipe, "generate_conditioning", "llm_conditioning")
    phases.wrap_forward(pipe.transformer, dit_phase)
    phases.wrap(pipe.vae, "decode", "vae_decode")
    phases.wrap(similarity, "scores", "backbone_scoring")


def instrument_trainer(phases: PhaseTimer, trainer, stage: str):
    """Rollout, reward and update of a step. Stage "understanding" (TRL's GRPO) generates the captions, then scores
    them with the reconstruction reward (decode + backbones); stage "generation" (Flow-GRPO) samples captions and
    reconstructions of the step's micro-batches in `_rollout_window` and scores them inside it. Everything else in the step is the update."""
    instrument_pipeline(phases, trainer.decoder, trainer.reconstruction_reward.similarity)
    if stage == "understanding":
        phases.wrap(trainer, "_generate", "rollout")
        phases.wrap(trainer, "_calculate_rewards", "reward")
    else:
        phases.wrap(trainer, "_rollout_window", "rollout")  # includes the reward: subtracted in `step_breakdown`
        phases.wrap(trainer.reconstruction_reward, "similarities", "reward")
    phases.wrap(trainer.accelerator, "backward", "backward")


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step and the phases of the last one; also times the optimizer's step (the Trainer
    creates the optimizer in `train`)."""

    def __init__(self, phases: PhaseTimer):
        self.phases, self.times, self.last, self._start = phases, [], {}, 0.0

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.phases.wrap(optimizer, "step", "optimizer_step")

    def on_step_begin(self, args, state, control, **kwargs):
        _sync(self.phases.device)
        self.phases.reset()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _sync(self.phases.device)
        self.times.append(time.perf_counter() - self._start)
        self.last = {"seconds": dict(self.phases.seconds), "peak_gib": dict(self.phases.peak_gib)}


def step_breakdown(timer: StepTimer, stage: str) -> dict:
    """The last step split into rollout, reward and update (= the rest of the step), with the inner phases."""
    step = timer.times[-1]
    phases = PhaseTimer(timer.phases.device)
    phases.seconds.update(timer.last["seconds"])
    phases.peak_gib.update(timer.last["peak_gib"])
    if stage == "generation":
        phases.seconds["rollout"] -= phases.seconds["reward"]
    phases.seconds["update"] = step - phases.seconds["rollout"] - phases.seconds["reward"]
    phases.peak_gib["update"] = max(phases.peak_gib.get(name, 0.0) for name in ("backward", "optimizer_step"))
    return phases.report(STEP_PHASES if stage == "generation" else
                         [name for name in STEP_PHASES if name != "dit_forward_with_grad"], step)


def _timed(device, function):
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


def reconstruction_figures(device, pipe, stock, captions, conditioning, args, suffix: str = "") -> dict:
    """Reconstructions/s of the UAE pipeline on captions (LLM conditioning included), of its denoising + decoding
    alone, and of diffusers' stock pipeline on the same embeddings, noise and settings; each warmed up once."""
    settings = dict(height=args.resolution, width=args.resolution, num_inference_steps=args.steps,
                    guidance_scale=GUIDANCE, output_type="np")
    embeds = {key: conditioning[key] for key in ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                                                 "negative_pooled_prompt_embeds")}

    def noise():  # the same seeds for every call
        return [torch.Generator().manual_seed(i) for i in range(args.batch)]

    runs = (  # (figure, its peak-memory figure, the call)
        ("reconstructions_per_s", "reconstruction_peak_gib",
         lambda: pipe.generate(captions, generator=noise(), **settings)),
        ("denoise_decode_per_s", "denoise_decode_peak_gib",
         lambda: StableDiffusion3Pipeline.__call__(pipe, generator=noise(), **conditioning, **settings)),
        ("stock_reconstructions_per_s", "stock_reconstruction_peak_gib",
         lambda: stock(generator=noise(), **embeds, **settings)),
    )
    figures = {}
    for rate, peak_key, run in runs:
        with stock_attention(pipe.transformer) if rate.startswith("stock") else contextlib.nullcontext():
            warmup, _, _ = _timed(device, run)
            seconds, peak, _ = _timed(device, run)
        figures[rate + suffix], figures[peak_key + suffix] = args.batch / seconds, peak
        if suffix:  # the first call of a compiled model compiles it
            figures[rate.replace("_per_s", "_first_call_s") + suffix] = warmup
    stock_rate = figures["stock_reconstructions_per_s" + suffix]
    figures["uae_vs_stock" + suffix] = figures["reconstructions_per_s" + suffix] / stock_rate
    figures["uae_vs_stock_denoise_decode" + suffix] = figures["denoise_decode_per_s" + suffix] / stock_rate
    return figures


def denoising_figures(device, pipe, captions, text_tokens, args, suffix: str = "") -> dict:
    """TFLOP/s and MFU of the denoising loop of one (instrumented) `pipe.generate` call."""
    phases = PhaseTimer(device)
    phases.wrap_forward(pipe.transformer, dit_phase)
    try:
        pipe.generate(captions, height=args.resolution, width=args.resolution, num_inference_steps=args.steps,
                      guidance_scale=GUIDANCE, output_type="np",
                      generator=[torch.Generator().manual_seed(i) for i in range(args.batch)])
    finally:
        phases.restore()
    flops = dit_flops(pipe.transformer, args.batch, args.resolution, args.resolution, text_tokens, args.steps, True)
    tflops = flops / phases.seconds["denoising"] / 1e12
    return {"denoising_s" + suffix: phases.seconds["denoising"], "denoising_tflops_per_s" + suffix: tflops,
            "denoising_mfu" + suffix: tflops / args.peak_tflops if device.type == "cuda" else None}


def print_report(figures: dict):
    print(f"\n{'component':<18}{'dtype(s)':<22}{'parameters':>16}")
    for name, row in figures["components"].items():
        print(f"{name:<18}{', '.join(row['dtypes']):<22}{row['parameters']:>16,}")
    sections = {"round_trip_phases": "round trip", "understanding_phases": "stage 2 step (understanding)",
                "generation_phases": "stage 3 step (generation)"}
    for section, title in sections.items():
        print(f"\n{'phase, ' + title:<40}{'seconds':>10}{'share':>8}{'peak GiB':>10}")
        for name, row in figures[section].items():
            peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
            print(f"{name:<40}{row['seconds']:>10.4f}{row['share']:>8.1%}{peak:>10}")
    print()
    for key, value in figures.items():
        if not isinstance(value, dict):
            print(f"{key:<44}{value:.4g}" if isinstance(value, float) else f"{key:<44}{value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoder", choices=sorted(SD35), default="large")
    parser.add_argument("--reduced", action="store_true", help="tiny sizes, CPU: checks the script, not a figure")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                        help="every model is built in it (also on CPU); the run stops if one is not")
    parser.add_argument("--compile", action="store_true", help="also measure with the DiT blocks and VAE decoder "
                        "torch.compile'd")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--caption-tokens", type=int, default=256)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense peak in --dtype, for MFU")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = torch.device("cpu" if args.reduced or not torch.cuda.is_available() else "cuda")
    dtype = getattr(torch, args.dtype)
    if args.reduced:
        args.batch, args.resolution, args.steps, args.caption_tokens = 2, 64, 2, 8
    figures = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "decoder": args.decoder,
               "reduced": args.reduced, "dtype": args.dtype, "batch": args.batch, "resolution": args.resolution,
               "steps": args.steps, "guidance_scale": GUIDANCE, "caption_tokens": args.caption_tokens}
    with tempfile.TemporaryDirectory() as folder:
        twins = build_tiny_models(f"{folder}/twins")
        backbone = build_backbone(f"{folder}/clip", twins, args.reduced, device, dtype)
        pipe = build(args.decoder, args.reduced, twins, device, dtype).to(device)
        similarity = ImageSimilarity(("clip",), {"clip": backbone}, device=device, dtype=dtype)
        figures["components"] = components(pipe, similarity)
        wrong = {name: row["dtypes"] for name, row in figures["components"].items() if row["dtypes"] != [args.dtype]}
        if wrong:
            print_report(figures | {"round_trip_phases": {}, "understanding_phases": {}, "generation_phases": {}})
            raise SystemExit(f"not in {args.dtype} after building and .to({device}): {wrong}")

        rng = np.random.default_rng(0)
        images = [PIL.Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(args.batch)]

        def caption():
            return caption_images(pipe.vlm, pipe.processor, images, max_new_tokens=args.caption_tokens,
                                  min_new_tokens=args.caption_tokens)

        seconds, peak, captions = _timed(device, caption)
        figures["captions_per_s"], figures["caption_peak_gib"] = args.batch / seconds, peak
        with torch.no_grad():
            conditioning = pipe.encode_captions(captions)
        text_tokens = conditioning["prompt_embeds"].shape[1]
        figures["text_tokens"] = text_tokens
        stock = stock_pipeline(pipe)
        figures |= reconstruction_figures(device, pipe, stock, captions, conditioning, args)
        figures |= denoising_figures(device, pipe, captions, text_tokens, args)

        # one instrumented round trip: caption → conditioning → denoising → decode → backbone scoring
        phases = PhaseTimer(device)
        instrument_pipeline(phases, pipe, similarity)
        try:
            def round_trip():
                reconstructions = pipe.generate(caption(), height=args.resolution, width=args.resolution,
                                                num_inference_steps=args.steps, guidance_scale=GUIDANCE,
                                                generator=[torch.Generator().manual_seed(i) for i in range(args.batch)])
                return similarity.scores(reconstructions.images, images)

            seconds, _, _ = _timed(device, round_trip)
        finally:
            phases.restore()
        figures["round_trip_s"] = seconds
        figures["round_trip_phases"] = phases.report(ROUND_TRIP_PHASES, seconds)
        other = seconds - sum(row["seconds"] for row in figures["round_trip_phases"].values())  # image processing...
        figures["round_trip_phases"]["other"] = {"seconds": other, "share": other / seconds, "peak_gib": None}

        if args.compile:
            undo = None
            try:
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                undo = compile_decoder(pipe)
                figures |= reconstruction_figures(device, pipe, stock, captions, conditioning, args, "_compiled")
                figures |= denoising_figures(device, pipe, captions, text_tokens, args, "_compiled")
                figures["compiled_vs_eager"] = (figures["reconstructions_per_s_compiled"]
                                                / figures["reconstructions_per_s"])
            except Exception as error:  # e.g. no C compiler for inductor's CPU code: say so, measure the rest
                figures["compile_error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                print(f"torch.compile failed (on CPU, inductor needs a working C++ compiler); compiled figures "
                      f"skipped: {figures['compile_error']}")
            finally:
                if undo is not None:
                    undo()

        data = datasets.Dataset.from_dict({"image": images}).cast_column("image", datasets.Image())
        for stage in ("understanding", "generation"):
            phases = PhaseTimer(device)
            timer = StepTimer(phases)
            config_class, trainer_class = ((UnifiedGRPOConfig, UnifiedGRPOTrainer) if stage == "understanding"
                                           else (FlowGRPOConfig, FlowGRPOTrainer))
            lora = dict(decoder_lora_r=32, decoder_lora_alpha=64) if stage == "generation" else {}
            config = config_class(
                output_dir=f"{folder}/{stage}", max_steps=2, per_device_train_batch_size=args.batch,
                num_generations=args.batch, max_completion_length=args.caption_tokens, report_to=[],
                use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16,
                fp16=dtype == torch.float16 and device.type == "cuda", save_strategy="no", logging_steps=1,
                decoder_height=args.resolution, decoder_width=args.resolution, decoder_num_inference_steps=args.steps,
                decoder_guidance_scale=GUIDANCE, log_reconstructions_steps=0, reward_batch_size=args.batch,
                backbone_checkpoints={"clip": backbone}, backbone_dtype=args.dtype, **lora,
            )
            peft = None
            if stage == "understanding":
                from peft import LoraConfig

                peft = LoraConfig(r=32, lora_alpha=64, target_modules="all-linear", task_type="CAUSAL_LM")
            trainer = trainer_class(model=pipe.vlm, decoder=pipe, args=config, train_dataset=data,
                                    processing_class=pipe.processor, peft_config=peft, callbacks=[timer])
            instrument_trainer(phases, trainer, stage)
            try:
                seconds, peak, _ = _timed(device, trainer.train)
            finally:
                phases.restore()
            figures[f"{stage}_step_s"] = timer.times[-1]
            figures[f"{stage}_images_per_s"] = args.batch / timer.times[-1]
            figures[f"{stage}_peak_gib"] = None if peak is None else max(peak, phases.max_gib)
            figures[f"{stage}_phases"] = step_breakdown(timer, stage)
            if stage == "understanding":
                pipe.vlm = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
    print_report(figures)
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
