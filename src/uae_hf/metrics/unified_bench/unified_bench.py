"""Unified-Bench: how well a unified model's image → caption → image round trip preserves the image."""

import datasets
import evaluate
import torch

from uae_hf.images import load_images
from uae_hf.rewards.similarity import BACKBONES, OFFICIAL_BACKBONES, PAPER_BACKBONES, ImageSimilarity

_CITATION = """\
@article{uae2025,
  title   = {Can Understanding and Generation Truly Benefit Together -- or Just Coexist?},
  journal = {arXiv preprint arXiv:2509.09666},
  year    = {2025}
}
"""

_DESCRIPTION = """\
Unified-Bench scores a unified multimodal model as an auto-encoder: the model captions each reference image with its
own image-to-text half and redraws it from that caption with its own text-to-image half. Each (reconstruction,
reference) pair is scored by the cosine similarity of L2-normalised global image embeddings under four backbones
(CLIP ViT-L/14, DINOv2-L, DINOv3 ViT-L/16, LongCLIP-L). A backbone's score is its mean over images; `overall` is
the mean of the backbone scores and `unified_bench` is `overall` x 100, the number reported in the paper.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list`): reconstructions, as PIL images (any mode), file paths, image bytes or `{"bytes", "path"}`
        dicts, HxWxC numpy arrays (uint8, uint16 or float in [0, 1]) or CxHxW tensors (uint8 or float in [0, 1]). The
        default protocol composites transparency on white and maps 16-bit images by their range; the official one
        converts as Score_i2i.py does, with PIL's `convert("RGB")` (alpha dropped, values clipped to 0..255).
    references (`list`): the original images, in the same order and forms. NaN, out-of-range values, unreadable
        files and mismatched lengths are errors naming the item (e.g. `references[3]`).
    return_per_image (`bool`, defaults to `False`): also return `per_image`, one dict of backbone cosines per pair.

Load-time keyword arguments (`evaluate.load("unified_bench", config_name, **kwargs)`):
    config_name: `"default"` (the paper's four backbones; in Score_i2i.py's order clip, longclip, dinov2, dinov3 with
        the official protocol) or backbones joined by `+`, e.g. `"clip+dinov2"`; choices: clip, dinov2, dinov3,
        longclip, siglip.
    checkpoints (`dict[str, str]`): backbone -> Hub id or local folder, replacing the default checkpoint.
    device (`str`, defaults to `"cpu"`), dtype (`str` or `torch.dtype`, defaults to float32), batch_size (`int`).
    protocol (`str`, defaults to `"default"`): `"default"` embeds in batches and caches references; `"official"`
        reproduces Unified-Bench's own scorer (`Score_i2i.py`): one pair at a time, references embedded again for
        every pair, its image decoding, its per-backbone preprocessing, and its precision (float32; LongCLIP float16
        on CUDA, float32 with float16-rounded weights on CPU), so `dtype` must stay float32. Paper backbones only.
        Same checkpoints and features: on opaque 8-bit images the protocols differ by resampling and float rounding,
        more for LongCLIP where its crop offset rounds and transformers' floors and in fp16 on CUDA (measured:
        `docs/unified_bench_protocols.md`).

Returns:
    One mean cosine per backbone, `overall` (mean of those) and `unified_bench` (`overall` x 100); `per_image` on
    request.

Examples:
    >>> import uae_hf, evaluate
    >>> bench = evaluate.load("unified_bench", "clip", checkpoints={"clip": "tiny-models/backbones/clip"})
    >>> results = bench.compute(predictions=[image], references=[image])
    >>> round(results["clip"], 4), round(results["unified_bench"], 2)
    (1.0, 100.0)
    >>> official = evaluate.load("unified_bench", "clip", checkpoints={"clip": "tiny-models/backbones/clip"},
    ...                          protocol="official")  # as Unified-Bench's Score_i2i.py
    >>> round(official.compute(predictions=[image], references=[image])["clip"], 4)
    1.0
"""


def backbones_of(config_name: str, protocol: str = "default") -> tuple[str, ...]:
    """`"default"` → the paper's four backbones (in Score_i2i.py's order for the official protocol);
    `"clip+dinov2"` → ("clip", "dinov2")."""
    if config_name in (None, "default"):
        return OFFICIAL_BACKBONES if protocol == "official" else PAPER_BACKBONES
    names = tuple(config_name.split("+"))
    unknown = [name for name in names if name not in BACKBONES]
    if unknown:
        raise ValueError(
            f"unknown backbone(s) {unknown} in config_name {config_name!r}; choose from {sorted(BACKBONES)}, "
            "joined with '+', or 'default'"
        )
    return names


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class UnifiedBench(evaluate.Metric):
    def __init__(self, *args, checkpoints=None, device="cpu", dtype=torch.float32, batch_size=32, protocol="default",
                 **kwargs):
        self.checkpoints = dict(checkpoints or {})
        self.protocol = protocol
        self.device = device
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.batch_size = batch_size
        super().__init__(*args, **kwargs)
        self.backbones = backbones_of(self.config_name, protocol)

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
            reference_urls=["https://arxiv.org/abs/2509.09666"],
        )

    def _download_and_prepare(self, dl_manager):
        self.similarity = ImageSimilarity(
            self.backbones, self.checkpoints, device=self.device, dtype=self.dtype, batch_size=self.batch_size,
            protocol=self.protocol,
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add reconstruction/reference pairs (PIL images, paths, bytes, arrays or tensors), checked and made RGB as the
        protocol decodes images."""
        if (predictions is None) != (references is None):
            missing = "references" if references is None else "predictions"
            raise ValueError(f"`{missing}` is missing: pass `predictions=` and `references=` together, one pair each")
        if predictions is not None and hasattr(predictions, "__len__") and hasattr(references, "__len__") and len(
                predictions) != len(references):
            raise ValueError(
                f"got {len(predictions)} predictions and {len(references)} references; pass one reconstruction per "
                "reference, in the same order"
            )
        if predictions is not None:
            predictions = load_images(predictions, "predictions", self.similarity.rgb)
            references = load_images(references, "references", self.similarity.rgb)
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions, references, return_per_image=False):
        scores = self.similarity.scores(predictions, references)
        # in Python floats, one pair after another, as Score_i2i.py averages
        results = {name: sum(values.tolist()) / len(values) for name, values in scores.items()}
        results["overall"] = sum(results[name] for name in scores) / len(scores)
        results["unified_bench"] = 100.0 * results["overall"]
        if return_per_image:
            results["per_image"] = [
                {name: float(values[index]) for name, values in scores.items()} for index in range(len(predictions))
            ]
        return results
