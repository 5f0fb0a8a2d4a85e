"""Stage "understanding" overheads on the tiny twins, measured side by side in one process (CPU).

    python benchmarks/grpo_overhead.py [--steps 10] [--captions 32]

1. Reward path ÷ pure decoder sampling: `ReconstructionReward` on N captions (decode + backbone scoring + logging)
   vs `pipe.generate` on the same captions with the trainer's default decoder settings (10 steps, CFG 5; 64 px
   for the twins). The backbone's share and the remaining bookkeeping are printed too.    target <= 1.15
2. `UnifiedGRPOTrainer` ÷ stock `trl.GRPOTrainer` given the same reward as a plain function, same data, same
   settings: median step time over interleaved rounds.                         target <= 1.05
"""

import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration, TrainerCallback  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

import benchmark_cli  # noqa: E402  (a sibling module: benchmarks run as scripts)
from uae_hf import ImageSimilarity, ReconstructionReward, UnifiedGRPOConfig, UnifiedGRPOTrainer  # noqa: E402
from uae_hf import build_tiny_models, load_uae_pipeline  # noqa: E402
from uae_hf.pipelines.uae_reconstruction.pipeline_uae_reconstruction import caption_messages  # noqa: E402
from uae_hf.sample_data import skimage_photos  # noqa: E402

_DEFAULTS = UnifiedGRPOConfig.__dataclass_fields__
DECODE = dict(height=64, width=64, num_inference_steps=_DEFAULTS["decoder_num_inference_steps"].default,
              guidance_scale=_DEFAULTS["decoder_guidance_scale"].default)


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def reward_vs_decoding(pipe, similarity, photos, captions, repeats=3) -> dict:
    reward = ReconstructionReward(pipe, similarity, batch_size=len(captions), **DECODE)
    images = [photos[i % len(photos)] for i in range(len(captions))]
    reward(prompts=captions, completions=captions, image=images)  # warm-up, fills the reference cache
    reconstructions = reward.reconstruct(captions)
    decode_s, reward_s, scoring_s = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            pipe.generate(captions, generator=reward.noise_generators(len(captions), 0), output_type="np", **DECODE)
        decode_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        reward(prompts=captions, completions=captions, image=images, log_metric=lambda name, value: None)
        reward_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        similarity.scores(reconstructions, images)
        scoring_s.append(time.perf_counter() - start)
    decode, total, scoring = min(decode_s), min(reward_s), min(scoring_s)
    return {"decode_s": decode, "reward_s": total, "scoring_s": scoring, "bookkeeping_s": total - decode - scoring,
            "ratio": total / decode}


def trainer_vs_stock(twins, pipe, similarity, steps: int, output_dir: str, rounds: int = 3) -> dict:
    processor = AutoProcessor.from_pretrained(twins / "encoder")
    dataset = skimage_photos(64)
    common = dict(max_steps=steps + 2, per_device_train_batch_size=8, num_generations=4, max_completion_length=16,
                  learning_rate=1e-4, logging_steps=1000, report_to=[], use_cpu=True, seed=0, save_strategy="no")
    times = {}
    for name in ("stock", "unified") * rounds:
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(twins / "encoder")
        timer = StepTimer()
        args = UnifiedGRPOConfig(output_dir=f"{output_dir}/{name}-{len(times.get(name, []))}", log_reconstructions_steps=0,
                                 decoder_height=DECODE["height"], decoder_width=DECODE["width"],
                                 decoder_num_inference_steps=DECODE["num_inference_steps"],
                                 decoder_guidance_scale=DECODE["guidance_scale"],
                                 backbone_checkpoints={"clip": str(twins / "backbones" / "clip")}, **common)
        if name.startswith("stock"):
            reward = ReconstructionReward(pipe, similarity, batch_size=8, **DECODE)
            data = dataset.add_column("prompt", [caption_messages()] * len(dataset))
            trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=data,
                                  processing_class=processor, callbacks=[timer])
        else:
            trainer = UnifiedGRPOTrainer(model=model, decoder=pipe, args=args, train_dataset=dataset,
                                         processing_class=processor, callbacks=[timer])
        trainer.train()
        times.setdefault(name, []).extend(timer.times[2:])  # skip warm-up steps
    # medians over interleaved rounds: this 2-core machine's timing noise is larger than the difference we measure
    stock, unified = statistics.median(times["stock"]), statistics.median(times["unified"])
    return {"stock_step_s": stock, "unified_step_s": unified, "ratio": unified / stock}


def measure(steps: int = 12, captions: int = 32) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        twins = build_tiny_models(f"{folder}/twins")
        pipe = load_uae_pipeline(twins / "decoder", twins / "encoder", twins / "projector")
        pipe.set_progress_bar_config(disable=True)
        similarity = ImageSimilarity(("clip",), {"clip": str(twins / "backbones" / "clip")})
        photos = list(skimage_photos(64)["image"])
        texts = [f"a photo number {i} of something {'very ' * (i % 5)}detailed" for i in range(captions)]
        reward = reward_vs_decoding(pipe, similarity, photos, texts)
        trainer = trainer_vs_stock(twins, pipe, similarity, steps, f"{folder}/runs")
    return {"reward_vs_decoding": reward, "trainer_vs_stock": trainer, "captions": captions, "steps": steps,
            "threads": torch.get_num_threads()}


def report(figures: dict) -> None:
    reward, trainer = figures["reward_vs_decoding"], figures["trainer_vs_stock"]
    print(f"{'measure':<44}{'ours':>10}{'baseline':>10}{'ratio':>8}{'target':>8}")
    print(f"{'reward path vs decoder sampling (s)':<44}{reward['reward_s']:>10.3f}{reward['decode_s']:>10.3f}"
          f"{reward['ratio']:>8.3f}{'1.15':>8}")
    print(f"{'  of which backbone scoring / bookkeeping (s)':<44}{reward['scoring_s']:>10.3f}"
          f"{reward['bookkeeping_s']:>10.3f}")
    print(f"{'UnifiedGRPOTrainer vs GRPOTrainer (s/step)':<44}{trainer['unified_step_s']:>10.3f}"
          f"{trainer['stock_step_s']:>10.3f}{trainer['ratio']:>8.3f}{'1.05':>8}")


if __name__ == "__main__":
    benchmark_cli.run(__doc__, measure, report, dict(steps=12, captions=32))
