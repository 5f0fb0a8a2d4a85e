"""The toy world's "CLIP": a small CNN trained to read every attribute, whose penultimate features embed images.

Saved and loaded as a transformers model (`save_pretrained` / `from_pretrained`, with a `ViTImageProcessor`), and
registered with the similarity core as backbone `"toyworld"`, so the reconstruction reward and `unified_bench` use
it like any other backbone. `attribute_accuracy` is the interpretable held-out measure: the attributes it reads
from a reconstruction, checked against the original's ground truth.
"""

from dataclasses import dataclass

import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel, ViTImageProcessor
from transformers.utils import ModelOutput

from ..rewards.similarity import Backbone, register_backbone
from .world import ATTRIBUTES, IMAGE_SIZE, scene_at


class ToyWorldVisionConfig(PretrainedConfig):
    model_type = "uae_toy_world_vision"

    def __init__(self, channels=(16, 32, 64, 64), embedding_dim=64, image_size=IMAGE_SIZE, attributes=None, **kwargs):
        self.channels = list(channels)
        self.embedding_dim = embedding_dim
        self.image_size = image_size
        self.attributes = dict(attributes or {name: list(values) for name, values in ATTRIBUTES.items()})
        super().__init__(**kwargs)


@dataclass
class ToyWorldVisionOutput(ModelOutput):
    """`pooler_output`: centred penultimate features (the embedding); `logits`: one tensor per attribute."""

    pooler_output: torch.FloatTensor | None = None
    logits: dict[str, torch.FloatTensor] | None = None


class ToyWorldVisionModel(PreTrainedModel):
    """Conv stack (stride-2 downsampling) → 64-d features → one linear head per attribute.

    The embedding subtracts the training images' mean feature (a buffer saved with the weights): without it every
    pair of toy images looks alike (cosine ≈ 0.65), with it unrelated images score ≈ 0.
    """

    config_class = ToyWorldVisionConfig
    main_input_name = "pixel_values"

    def __init__(self, config: ToyWorldVisionConfig):
        super().__init__(config)
        layers, previous = [], 3
        for index, width in enumerate(config.channels):
            layers += [nn.Conv2d(previous, width, 3, stride=1 if index == 0 else 2, padding=1), nn.GELU()]
            previous = width
        self.convs = nn.Sequential(*layers)
        side = config.image_size // 2 ** (len(config.channels) - 1)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(previous * side * side, config.embedding_dim), nn.GELU())
        self.heads = nn.ModuleDict(
            {name: nn.Linear(config.embedding_dim, len(values)) for name, values in config.attributes.items()}
        )
        self.register_buffer("feature_mean", torch.zeros(config.embedding_dim))
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> ToyWorldVisionOutput:
        if pixel_values.shape[-2:] != (self.config.image_size,) * 2:
            pixel_values = F.interpolate(pixel_values, size=(self.config.image_size,) * 2, mode="bilinear", antialias=True)
        features = self.features(self.convs(pixel_values))
        logits = {name: head(features) for name, head in self.heads.items()}
        return ToyWorldVisionOutput(pooler_output=features - self.feature_mean, logits=logits)


AutoConfig.register(ToyWorldVisionConfig.model_type, ToyWorldVisionConfig)
AutoModel.register(ToyWorldVisionConfig, ToyWorldVisionModel)


def toy_image_processor(image_size: int = IMAGE_SIZE) -> ViTImageProcessor:
    return ViTImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3
    )


def _load(checkpoint: str, dtype: torch.dtype) -> ToyWorldVisionModel:
    return ToyWorldVisionModel.from_pretrained(checkpoint, dtype=dtype)


register_backbone(Backbone("toyworld", "", _load, "pooler_output"))


def _degrade(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur half of the batch and add a little noise: reconstructions are softer than the rendered originals."""
    blurred = F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = torch.rand(pixels.shape[0], 1, 1, 1, generator=generator) < 0.5
    noise = 0.04 * torch.randn(pixels.shape, generator=generator)
    return torch.where(pick, blurred, pixels) + noise


def train_toy_backbone(
    output_dir,
    steps: int = 1000,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    seed: int = 0,
    image_size: int = IMAGE_SIZE,
) -> ToyWorldVisionModel:
    """Train the attribute reader on freshly drawn training scenes and save it (model + image processor)."""
    torch.manual_seed(seed)
    config = ToyWorldVisionConfig(image_size=image_size)
    model = ToyWorldVisionModel(config)
    processor = toy_image_processor(image_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)

    def batch(start: int):
        scenes = [scene_at(seed + 7, start + i) for i in range(batch_size)]
        pixels = processor(images=[s.render(image_size) for s in scenes], return_tensors="pt")["pixel_values"]
        labels = {name: torch.tensor([s.labels()[name] for s in scenes]) for name in ATTRIBUTES}
        return pixels, labels

    model.train()
    for step in tqdm(range(steps), desc="toy backbone", unit="step"):
        pixels, labels = batch(step * batch_size)
        logits = model(_degrade(pixels, generator)).logits
        loss = sum(F.cross_entropy(logits[name], labels[name]) for name in ATTRIBUTES)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        features = [model.features(model.convs(batch(10_000_000 + i * batch_size)[0])) for i in range(8)]
        model.feature_mean.copy_(torch.cat(features).mean(0))
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return model


@torch.no_grad()
def predict_attributes(model: ToyWorldVisionModel, processor, images: list[PIL.Image.Image]) -> dict[str, list[str]]:
    """Attribute → predicted value name, per image."""
    pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(model.device, model.dtype)
    logits = model(pixels).logits
    return {name: [model.config.attributes[name][i] for i in logits[name].argmax(-1).tolist()] for name in logits}


def attribute_accuracy(predicted: dict[str, list[str]], truth: dict[str, list[str]]) -> dict[str, float]:
    """Per-attribute accuracy, their mean (`mean`) and the share of images with every attribute right (`all`)."""
    names = list(truth)
    hits = {name: [p == t for p, t in zip(predicted[name], truth[name])] for name in names}
    result = {name: sum(values) / len(values) for name, values in hits.items()}
    result["mean"] = sum(result[name] for name in names) / len(names)
    result["all"] = sum(all(row) for row in zip(*hits.values())) / len(hits[names[0]])
    return result
