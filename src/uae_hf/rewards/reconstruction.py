"""The reconstruction reward: caption → decoder reconstruction → similarity to the original image.

A plain callable in TRL's reward-function form (it holds the decoder and backbones, it is not an `nn.Module`, so
TRL does not mistake it for a sequence-classification reward model).
"""

import math
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from ..decoders import decoder_family
from ..images import decoded_images, load_image
from ..seeding import seeded_generators, stream_seed
from .similarity import ImageSimilarity


@dataclass
class ReconstructionBatch:
    """One scored batch: the originals, their captions, one reconstruction each, the rewards (NaN where a decode
    failed) and the batch's metrics (mean similarity per backbone, held-out ones included, caption lengths)."""

    originals: list[PIL.Image.Image]
    captions: list[str]
    reconstructions: list[PIL.Image.Image | None]
    rewards: list[float]
    metrics: dict[str, float]


def completion_text(completion) -> str:
    """The caption text of a TRL completion (plain string, or conversational `[{"role", "content"}]`)."""
    if isinstance(completion, str):
        return completion.strip()
    content = completion[-1]["content"]
    if isinstance(content, str):
        return content.strip()
    return "".join(block.get("text") or "" for block in content).strip()


class ReconstructionReward:
    """Reward = weighted cosine similarity of the original image and the decoder's reconstruction from the caption.

    Args:
        decoder (`DiffusionPipeline`): the frozen decoder, a `UAEReconstructionPipeline` or a pipeline of any
            supported family (`uae_hf.decoders`); its family's `generate` draws the reconstructions.
        similarity (`ImageSimilarity`): the rewarded backbones (the Unified-Bench core: same numbers as the metric).
        weights (`dict[str, float]`, *optional*): per-backbone weights; equal by default.
        heldout (`ImageSimilarity`, *optional*): backbones that are logged but never rewarded (reward hacking shows
            as rewarded similarity rising while held-out similarity does not).
        reconstructions_per_caption (`int`, defaults to 1): M decodes per caption, averaged (lower-variance reward).
        batch_size (`int`, defaults to 8): captions per decoder call.
        seed (`int`, defaults to 0): noise seed. Within one step all captions share the noise of their m-th decode
            (common random numbers: a group's advantages compare captions, not noise draws).
        fixed_noise (`bool`, defaults to `False`): reuse the same noise at every step, which makes the reward a
            deterministic function of (caption, image); by default the noise changes from step to step.
        **generate_kwargs: decoder settings (`height`, `width`, `num_inference_steps`, `guidance_scale`,
            `conditioning_mode`).
    """

    __name__ = "reconstruction"

    def __init__(
        self,
        decoder,
        similarity: ImageSimilarity,
        weights: dict[str, float] | None = None,
        heldout: ImageSimilarity | None = None,
        reconstructions_per_caption: int = 1,
        batch_size: int = 8,
        seed: int = 0,
        fixed_noise: bool = False,
        **generate_kwargs,
    ):
        if reconstructions_per_caption < 1:
            raise ValueError(f"reconstructions_per_caption must be >= 1, got {reconstructions_per_caption}")
        weights = dict(weights or {name: 1.0 for name in similarity.embedders})
        if set(weights) != set(similarity.embedders):
            raise ValueError(f"weights are for {sorted(weights)} but the rewarded backbones are {sorted(similarity.embedders)}")
        total = sum(weights.values())
        if total <= 0:
            raise ValueError(f"backbone weights must sum to a positive number, got {weights}")
        self.decoder_family = decoder_family(decoder)
        self.decoder = self.decoder_family.pipe
        self.similarity = similarity
        self.weights = {name: weight / total for name, weight in weights.items()}
        self.heldout = heldout
        self.reconstructions_per_caption = reconstructions_per_caption
        self.batch_size = batch_size
        self.seed = seed
        self.fixed_noise = fixed_noise
        self.generate_kwargs = generate_kwargs

    def noise_generators(self, count: int, step: int) -> list[torch.Generator]:
        """Item-major generators: caption i's m-th decode uses the step's m-th noise."""
        m = self.reconstructions_per_caption
        step = 0 if self.fixed_noise else step
        return seeded_generators(stream_seed(self.seed, step, j % m) for j in range(count * m))

    @torch.no_grad()  # not inference_mode: under ZeRO-3 the decoder's LLM may be the policy's, whose weights are
    # gathered during its forward, and a weight gathered in inference mode can never train again
    def reconstruct(self, captions: list[str], step: int = 0) -> list[PIL.Image.Image | None]:
        """`len(captions) * M` reconstructions, item-major; `None` where the decoder produced non-finite pixels."""
        images = []
        for start in range(0, len(captions), self.batch_size):
            chunk = captions[start : start + self.batch_size]
            arrays = self.decoder_family.generate(
                chunk,
                num_images_per_prompt=self.reconstructions_per_caption,
                generator=self.noise_generators(len(chunk), step),
                output_type="np",
                **self.generate_kwargs,
            )
            images.extend(decoded_images(arrays))
        return images

    def similarities(self, reconstructions: list, references: list[PIL.Image.Image]) -> tuple[torch.Tensor, dict]:
        """Weighted cosine of each reconstruction to its reference (NaN where the reconstruction is `None`), and the
        batch means per rewarded and held-out backbone."""
        valid = [index for index, item in enumerate(reconstructions) if item is not None]
        rewards = torch.full((len(reconstructions),), float("nan"))
        metrics = {"reconstruction/nan_count": float(len(reconstructions) - len(valid))}
        if valid:
            predictions = [reconstructions[index] for index in valid]
            targets = [references[index] for index in valid]
            scores = self.similarity.scores(predictions, targets)
            rewards[valid] = sum(self.weights[name] * values for name, values in scores.items())
            metrics |= {f"reconstruction/{name}": float(values.mean()) for name, values in scores.items()}
            if self.heldout is not None:
                heldout = self.heldout.scores(predictions, targets)
                metrics |= {f"reconstruction/heldout_{name}": float(values.mean()) for name, values in heldout.items()}
        return rewards, metrics

    def score(self, originals: list[PIL.Image.Image], captions: list[str], step: int = 0,
              completion_ids=None) -> ReconstructionBatch:
        """Reconstruct each caption (with step `step`'s noise) and score it against its original."""
        m = self.reconstructions_per_caption
        reconstructions = self.reconstruct(captions, step)
        per_decode, metrics = self.similarities(reconstructions, [originals[i // m] for i in range(len(reconstructions))])
        # a caption with any failed decode gets NaN: TRL then gives it no advantage
        rewards = per_decode.view(len(captions), m).mean(dim=1)
        metrics["reconstruction/nan_count"] = float(torch.isnan(rewards).sum())
        metrics |= caption_metrics(captions, completion_ids)
        mode = self.generate_kwargs.get("conditioning_mode") or self.decoder_family.conditioning_mode
        if mode == "text":
            metrics["reconstruction/truncated_rate"] = float(np.mean(self.decoder_family.caption_truncation(captions)))
        return ReconstructionBatch(originals, captions, reconstructions[::m], [float(r) for r in rewards], metrics)

    def __call__(self, prompts, completions, completion_ids=None, image=None, images=None, trainer_state=None,
                 log_metric=None, on_batch=None, **kwargs) -> list[float | None]:
        """TRL's reward-function form. `on_batch`, when given, receives the scored [`ReconstructionBatch`] (a
        trainer's grids read it from there)."""
        originals = image if image is not None else [row[0] if isinstance(row, list) else row for row in images or []]
        if len(originals) != len(completions):
            raise ValueError(
                f"the reconstruction reward needs the original image of every completion: got {len(originals)} "
                f"images for {len(completions)} completions (is the dataset's 'image' column present?)"
            )
        originals = [load_image(item, f"image[{index}]") for index, item in enumerate(originals)]
        captions = [completion_text(completion) for completion in completions]
        step = trainer_state.global_step if trainer_state is not None else 0
        batch = self.score(originals, captions, step, completion_ids)
        if log_metric is not None:
            for name, value in batch.metrics.items():
                log_metric(name, value)
        if on_batch is not None:
            on_batch(batch)
        return [reward if not math.isnan(reward) else None for reward in batch.rewards]


def caption_metrics(captions: list[str], completion_ids=None) -> dict[str, float]:
    """Caption length in tokens (when ids are given) and words: mean, min, max (the "aha" curve)."""
    words = [len(caption.split()) for caption in captions]
    units = {"words": words}
    if completion_ids is not None:
        units["tokens"] = [len(ids) for ids in completion_ids]
    metrics = {}
    for unit, values in units.items():
        metrics |= {f"caption_{unit}/mean": float(np.mean(values)), f"caption_{unit}/min": float(min(values)),
                    f"caption_{unit}/max": float(max(values))}
    return metrics
