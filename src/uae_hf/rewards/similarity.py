"""The similarity core: image-embedding backbones, a reference-embedding cache, cosine similarity.

One piece of code serves the trainers' reconstruction reward and the Unified-Bench metric, so training curves and
benchmark numbers are comparable by construction. `ImageSimilarity(protocol="official")` scores as Unified-Bench's
own scorer (`Score_i2i.py`) does, with the same checkpoints (see `OfficialEmbedder`).
"""

import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
import torch.nn.functional as F
import transformers
from torchvision import transforms
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    CLIPImageProcessor,
    CLIPImageProcessorPil,
    CLIPVisionModelWithProjection,
    SiglipVisionModel,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from ..images import pil_rgb, to_rgb


@dataclass(frozen=True)
class Backbone:
    """An image-embedding backbone of the registry.

    Args:
        name (`str`): registry key, also the metric's result key.
        checkpoint (`str`): default Hub id.
        load (`Callable[[str, torch.dtype], torch.nn.Module]`): builds the model from a checkpoint.
        output (`str`): the model output holding the global embedding (`"image_embeds"`, `"pooler_output"`).
        paper (`bool`): one of Unified-Bench's four backbones.
    """

    name: str
    checkpoint: str
    load: Callable[[str, torch.dtype], torch.nn.Module]
    output: str
    paper: bool = False


@contextlib.contextmanager
def _quiet_transformers():
    """Loading a vision tower from a full CLIP/SigLIP checkpoint lists every unused text weight; hide that report."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


def _clip_vision(checkpoint: str, dtype: torch.dtype) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(checkpoint)
    if hasattr(config, "vision_config"):  # a full CLIPModel checkpoint: keep its projection width
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        config = vision
    with _quiet_transformers():
        return CLIPVisionModelWithProjection.from_pretrained(checkpoint, config=config, dtype=dtype)


def _siglip_vision(checkpoint: str, dtype: torch.dtype) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(checkpoint)
    with _quiet_transformers():
        return SiglipVisionModel.from_pretrained(checkpoint, config=getattr(config, "vision_config", config), dtype=dtype)


def _auto(checkpoint: str, dtype: torch.dtype) -> torch.nn.Module:
    return AutoModel.from_pretrained(checkpoint, dtype=dtype)


BACKBONES: dict[str, Backbone] = {}


def register_backbone(backbone: Backbone) -> None:
    """Add a backbone to the registry (the metric's config names and the reward's `backbones` can then use it)."""
    BACKBONES[backbone.name] = backbone


for _backbone in (
    Backbone("clip", "openai/clip-vit-large-patch14", _clip_vision, "image_embeds", paper=True),
    Backbone("dinov2", "facebook/dinov2-large", _auto, "pooler_output", paper=True),
    Backbone("dinov3", "facebook/dinov3-vitl16-pretrain-lvd1689m", _auto, "pooler_output", paper=True),
    Backbone("longclip", "zer0int/LongCLIP-L-Diffusers", _clip_vision, "image_embeds", paper=True),
    Backbone("siglip", "google/siglip-so400m-patch14-384", _siglip_vision, "pooler_output"),
):
    register_backbone(_backbone)

PAPER_BACKBONES = tuple(name for name, backbone in BACKBONES.items() if backbone.paper)
OFFICIAL_BACKBONES = ("clip", "longclip", "dinov2", "dinov3")  # Score_i2i.py's default `--models`, in its order


def _image_processor(checkpoint: str, clip_format: bool, backend: str | None = None):
    """The checkpoint's own image processor; CLIP's for a CLIP-format checkpoint saved without one (LongCLIP)."""
    try:
        return AutoImageProcessor.from_pretrained(checkpoint, backend=backend)
    except (OSError, ValueError):
        if not clip_format:
            raise
        return CLIPImageProcessorPil() if backend == "pil" else CLIPImageProcessor()


class BackboneUnavailableError(OSError):
    """A backbone's checkpoint cannot be loaded: offline and not in the cache, no such folder or repo, no access.

    Attributes:
        backbone (`str`): the registry name; checkpoint (`str`): the Hub id or folder tried; reason (`str`): why.
    """

    def __init__(self, backbone: str, checkpoint: str, error: Exception):
        self.backbone, self.checkpoint, self.reason = backbone, checkpoint, _unavailable_reason(checkpoint, error)
        super().__init__(f"cannot load the {backbone!r} backbone from {checkpoint!r}: {self.reason}. Point it at a "
                         f"local copy: checkpoints={{{backbone!r}: 'path/to/{backbone}'}}")


def _unavailable_reason(checkpoint: str, error: Exception) -> str:
    from huggingface_hub import constants

    if not Path(checkpoint).expanduser().exists():
        if checkpoint.startswith((".", "/", "~")) or checkpoint.count("/") > 1 or "\\" in checkpoint:
            return "no such folder"
        if constants.HF_HUB_OFFLINE:
            return "it is not in the local Hugging Face cache, and downloads are off (HF_HUB_OFFLINE=1)"
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _fail_fast_if_unreachable(backbone: str, checkpoint: str) -> None:
    """A Hub id that is not in the local cache, with the Hub out of reach: fail now, not after huggingface_hub's
    retries (about 25 s per backbone)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if Path(checkpoint).expanduser().exists() or constants.HF_HUB_OFFLINE:
        return  # a folder; or transformers fails fast itself
    from ..pipelines.uae_reconstruction.hub_access import hub_unreachable_reason

    unreachable = hub_unreachable_reason()
    if unreachable is None:
        return
    try:
        cached = isinstance(try_to_load_from_cache(checkpoint, "config.json"), str)
    except ValueError:  # not a repo id: transformers says what is wrong with it
        return
    if not cached:
        raise BackboneUnavailableError(backbone, checkpoint, ConnectionError(
            f"the Hub cannot be reached ({unreachable}) and it is not in the local Hugging Face cache"))


# PIL resampling filters → `F.interpolate` modes, as transformers' torchvision backend maps them
_INTERPOLATION = {
    PILImageResampling.NEAREST: "nearest-exact",
    PILImageResampling.BILINEAR: "bilinear",
    PILImageResampling.BICUBIC: "bicubic",
}


def _resized_size(size, height: int, width: int) -> tuple[int, int]:
    """An image processor's `(height, width)` after resizing: `shortest_edge` keeps the aspect ratio and floors the
    long side (as `transformers.image_transforms.get_resize_output_image_size`), else `height` and `width`."""
    if size.get("shortest_edge") and not size.get("longest_edge"):
        short, long = sorted((height, width))
        long = int(size["shortest_edge"] * long / short)
        return (size["shortest_edge"], long) if height <= width else (long, size["shortest_edge"])
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    raise ValueError(f"embed_pixels cannot resize to {size}: pass a backbone whose processor sets shortest_edge, or "
                     "height and width")


def _round_weights_to_half(model: torch.nn.Module) -> None:
    """Round the weights and biases of every linear and convolution layer to float16 in place, keeping their dtype, as
    the Long-CLIP package's loader does (`convert_weights`, then `model.float()` on the CPU); norms and embeddings are
    left alone."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            for parameter in (module.weight, module.bias):
                if parameter is not None:
                    parameter.data.copy_(parameter.data.half())


def _image_key(image: PIL.Image.Image) -> str:
    digest = hashlib.blake2b(image.tobytes(), digest_size=20)
    digest.update(f"{image.mode}{image.size}".encode())
    return digest.hexdigest()


class ImageEmbedder:
    """L2-normalised global embeddings of one backbone, batched, with a cache for reference images.

    Preprocessing is the checkpoint's own image processor (CLIP: resize 224 + center crop, bicubic; DINOv2: resize
    256 / crop 224, bicubic; ...); a CLIP-format checkpoint without one (LongCLIP conversions) gets CLIP's.

    Args:
        backbone (`str`): a registry name (see `BACKBONES`).
        checkpoint (`str`, *optional*): Hub id or folder; defaults to the backbone's real checkpoint.
        device (`str` or `torch.device`, defaults to `"cpu"`), dtype (`torch.dtype`, defaults to `torch.float32`):
            fp16/bf16 on GPU halve the cost; embeddings are returned in float32 either way.
        half_weights (`bool`, defaults to `False`): round the linear and convolution weights to float16 (computing in
            `dtype` still), as the Long-CLIP package loads LongCLIP.
    """

    def __init__(self, backbone: str, checkpoint: str | None = None, device="cpu", dtype: torch.dtype = torch.float32,
                 half_weights: bool = False):
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose from {sorted(BACKBONES)}")
        self.backbone = BACKBONES[backbone]
        self.checkpoint = str(checkpoint or self.backbone.checkpoint)
        if not self.checkpoint:
            raise ValueError(f"backbone {backbone!r} has no default checkpoint: pass its folder, e.g. "
                             f"checkpoints={{{backbone!r}: 'path/to/{backbone}'}}")
        self.device = torch.device(device)
        self.dtype = dtype
        _fail_fast_if_unreachable(backbone, self.checkpoint)
        try:
            model = self.backbone.load(self.checkpoint, dtype)
            self.processor = _image_processor(self.checkpoint, clip_format=self.backbone.load is _clip_vision)
        except OSError as error:  # transformers' own message names neither the backbone nor a way out
            raise BackboneUnavailableError(backbone, self.checkpoint, error) from error
        if half_weights:
            _round_weights_to_half(model)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self._reference_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def embed(self, images: list[PIL.Image.Image], batch_size: int = 32) -> torch.Tensor:
        """`(len(images), dim)` float32 embeddings on the CPU, L2-normalised."""
        chunks = []
        for start in range(0, len(images), batch_size):
            pixels = self.processor(images=images[start : start + batch_size], return_tensors="pt")["pixel_values"]
            output = self.model(pixel_values=pixels.to(self.device, self.dtype))
            chunks.append(F.normalize(getattr(output, self.backbone.output).float(), dim=-1).cpu())
        return torch.cat(chunks)

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Differentiable embedding of `(N, 3, H, W)` RGB tensors in [0, 1] (gradients flow to `pixels`).

        Agrees with `embed` on the same images as 8-bit PIL images up to 8-bit rounding (see `_pixel_values`).
        Returns L2-normalised float32 rows.
        """
        output = self.model(pixel_values=self._pixel_values(pixels).to(self.device, self.dtype))
        return F.normalize(getattr(output, self.backbone.output).float(), dim=-1)

    def _pixel_values(self, pixels: torch.Tensor) -> torch.Tensor:
        """The image processor's `pixel_values`, with differentiable tensor ops, from `(N, 3, H, W)` floats in [0, 1].

        As the processor: its output size (the long side floored, as transformers computes it), its interpolation
        (bicubic for CLIP, DINOv2, SigLIP; bilinear for DINOv3), antialiased; a floored center crop; normalisation.
        The processors resize 8-bit images one axis at a time (width, then height) and round and clamp each pass to
        8 bits; here each pass is clamped to [0, 1] too, which keeps bicubic's overshoot at sharp edges out of the
        second pass (up to 8 grey levels otherwise) and is a no-op for bilinear. What remains is the 8-bit rounding.
        """
        processor = self.processor
        x = pixels.float()
        if getattr(processor, "do_resize", True):
            height, width = _resized_size(processor.size, *x.shape[-2:])
            resample = getattr(processor, "resample", None)
            resample = PILImageResampling.BILINEAR if resample is None else PILImageResampling(resample)
            if resample not in _INTERPOLATION:
                raise ValueError(f"{self.backbone.name}: embed_pixels has no differentiable {resample.name} resize")
            mode = _INTERPOLATION[resample]
            smooth = {} if mode == "nearest-exact" else {"antialias": True, "align_corners": False}
            for size in ((x.shape[-2], width), (height, width)):
                x = F.interpolate(x, size=size, mode=mode, **smooth).clamp(0, 1)
        crop = getattr(processor, "crop_size", None)
        if getattr(processor, "do_center_crop", False) and crop:
            top, left = (x.shape[-2] - crop["height"]) // 2, (x.shape[-1] - crop["width"]) // 2
            x = x[..., top : top + crop["height"], left : left + crop["width"]]
        if getattr(processor, "do_normalize", True):
            mean = torch.tensor(processor.image_mean, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(processor.image_std, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x

    def embed_references(self, images: list[PIL.Image.Image], batch_size: int = 32) -> torch.Tensor:
        """Like `embed`, but each distinct image (by content) is embedded once per embedder, then served from cache."""
        keys = [_image_key(image) for image in images]
        missing = {key: image for key, image in zip(keys, images) if key not in self._reference_cache}
        if missing:
            for key, embedding in zip(missing, self.embed(list(missing.values()), batch_size)):
                self._reference_cache[key] = embedding
        return torch.stack([self._reference_cache[key] for key in keys])

    @property
    def cached_references(self) -> int:
        return len(self._reference_cache)


_EMBEDDERS: dict[tuple, ImageEmbedder] = {}


def get_embedder(backbone: str, checkpoint: str | None = None, device="cpu", dtype=torch.float32,
                 half_weights: bool = False) -> ImageEmbedder:
    """The process-wide embedder for this backbone, checkpoint, device, dtype and `half_weights` (loaded once, cache
    shared)."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose from {sorted(BACKBONES)}")
    key = (backbone, str(checkpoint or BACKBONES[backbone].checkpoint), str(torch.device(device)), dtype, half_weights)
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = ImageEmbedder(backbone, checkpoint, device, dtype, half_weights)
    return _EMBEDDERS[key]


# Score_i2i.py ran on transformers 4.5x, whose CLIPProcessor / AutoImageProcessor gave the PIL ("slow") processors
# for CLIP and DINOv2; DINOv3 only ever had the torchvision ("fast") one. transformers 5 defaults to torchvision for
# all, which is what the default protocol uses.
_OFFICIAL_PROCESSOR_BACKEND = {"clip": "pil", "dinov2": "pil", "dinov3": "torchvision"}


def official_dtype(backbone: str, device="cpu") -> torch.dtype:
    """The official scorer's precision: float32, except LongCLIP in float16 on CUDA (the Long-CLIP package's loader
    casts its weights to half there, and on the CPU casts them back to float32, rounded)."""
    return torch.float16 if backbone == "longclip" and torch.device(device).type == "cuda" else torch.float32


class OfficialEmbedder:
    """One paper backbone as Unified-Bench's official scorer (`Score_i2i.py`) runs it, around the same loaded model.

    The model comes from `get_embedder`, shared with the default protocol, except LongCLIP's. What differs: one image
    per forward pass and no reference cache; CLIP and DINOv2 go through transformers' PIL image processors and DINOv3
    through its torchvision one (see `_OFFICIAL_PROCESSOR_BACKEND`); LongCLIP goes through the original Long-CLIP
    package's transform (torchvision `Resize(size, bicubic)` of the PIL image, `CenterCrop(size)`, whose offset
    torchvision rounds where transformers floors it, CLIP normalisation), has its linear and convolution weights
    rounded to float16 as that package's loader does, and runs in `official_dtype`. The features are the default
    protocol's: CLIP's `image_embeds` is `get_image_features`, DINO's `pooler_output` is `last_hidden_state[:, 0]`;
    they are L2-normalised in float32.

    Args:
        backbone (`str`): one of `PAPER_BACKBONES`.
        checkpoint (`str`, *optional*): Hub id or folder; defaults to the backbone's real checkpoint.
        device (`str` or `torch.device`, defaults to `"cpu"`).
    """

    def __init__(self, backbone: str, checkpoint: str | None = None, device="cpu"):
        if backbone not in PAPER_BACKBONES:
            raise ValueError(f"the official Unified-Bench scorer has no backbone {backbone!r}; "
                             f"it has {PAPER_BACKBONES}")
        self.embedder = get_embedder(backbone, checkpoint, device, official_dtype(backbone, device),
                                     half_weights=backbone == "longclip")
        self.transform = self.processor = None
        if backbone == "longclip":
            size = self.embedder.model.config.image_size
            self.transform = transforms.Compose([
                transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(size),
                transforms.ToTensor(),
                transforms.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
            ])
        else:
            self.processor = _image_processor(
                self.embedder.checkpoint, backbone == "clip", backend=_OFFICIAL_PROCESSOR_BACKEND[backbone]
            )

    def preprocess(self, image: PIL.Image.Image) -> torch.Tensor:
        """`(1, 3, H, W)` float32 pixel values of one RGB image."""
        if self.transform is not None:
            return self.transform(image).unsqueeze(0)
        return self.processor(images=image, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def embed(self, images: list[PIL.Image.Image]) -> torch.Tensor:
        """`(len(images), dim)` float32 embeddings on the CPU, L2-normalised, one forward pass per image."""
        embedder = self.embedder
        features = [
            getattr(embedder.model(pixel_values=self.preprocess(image).to(embedder.device, embedder.dtype)),
                    embedder.backbone.output)
            for image in images
        ]
        return F.normalize(torch.cat(features).float(), dim=-1).cpu()


PROTOCOLS = ("default", "official")


class ImageSimilarity:
    """Cosine similarity of predictions to references under one or more backbones.

    Images may be in any PIL mode: the default protocol makes them RGB with `to_rgb` (transparency composited on white,
    16-bit and float images mapped by their range), the official one with PIL's `convert("RGB")` (`pil_rgb`), as
    Score_i2i.py decodes its files.

    Args:
        backbones (`tuple[str, ...]`, *optional*): registry names; defaults to the paper's four, in Score_i2i.py's
            order (`OFFICIAL_BACKBONES`) with `protocol="official"`.
        checkpoints (`dict[str, str]`, *optional*): backbone → Hub id or folder, overriding the defaults.
        device, dtype: where and how the backbones run.
        batch_size (`int`, defaults to 32): images per backbone forward pass.
        protocol (`str`, defaults to `"default"`): `"default"` batches and caches references; `"official"` scores as
            Unified-Bench's `Score_i2i.py` (one pair at a time, its preprocessing and precision; see
            `OfficialEmbedder`), paper backbones only, and fixes the precision itself (leave `dtype` at float32).
    """

    def __init__(
        self,
        backbones=None,
        checkpoints: dict[str, str] | None = None,
        device="cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        protocol: str = "default",
    ):
        if backbones is None:
            backbones = OFFICIAL_BACKBONES if protocol == "official" else PAPER_BACKBONES
        backbones = tuple(backbones)
        if not backbones:
            raise ValueError("pass at least one backbone")
        checkpoints = dict(checkpoints or {})
        unknown = sorted(set(backbones) - set(BACKBONES)) + sorted(set(checkpoints) - set(backbones))
        if unknown:
            raise ValueError(f"unknown or unused backbone(s) {unknown}; choose from {sorted(BACKBONES)}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")
        if protocol == "official" and dtype != torch.float32:
            raise ValueError("protocol='official' sets each backbone's precision as the official scorer does (float32; "
                             f"LongCLIP float16 on CUDA): leave dtype at float32, not {dtype}")
        self.batch_size = batch_size
        self.protocol = protocol
        self.rgb = pil_rgb if protocol == "official" else to_rgb
        if protocol == "official":
            self.embedders = {name: OfficialEmbedder(name, checkpoints.get(name), device) for name in backbones}
        else:
            self.embedders = {name: get_embedder(name, checkpoints.get(name), device, dtype) for name in backbones}

    def scores(self, predictions: list[PIL.Image.Image], references: list[PIL.Image.Image]) -> dict[str, torch.Tensor]:
        """Per-backbone `(N,)` cosines between `predictions[i]` and `references[i]` (PIL images, any mode);
        references go through the cache (default protocol) or are embedded again for every pair (official)."""
        if len(predictions) != len(references):
            raise ValueError(f"got {len(predictions)} predictions and {len(references)} references; pass one per pair")
        if len(predictions) == 0:
            raise ValueError("no images to score: pass at least one prediction/reference pair")
        predictions = [self.rgb(image, f"predictions[{index}]") for index, image in enumerate(predictions)]
        references = [self.rgb(image, f"references[{index}]") for index, image in enumerate(references)]
        result = {}
        for name, embedder in self.embedders.items():
            if self.protocol == "official":  # each image alone, so pair by pair as Score_i2i.py does
                predicted, reference = embedder.embed(predictions), embedder.embed(references)
            else:
                predicted = embedder.embed(predictions, self.batch_size)
                reference = embedder.embed_references(references, self.batch_size)
            result[name] = (predicted * reference).sum(-1)
        return result
