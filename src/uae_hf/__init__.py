"""uae_hf: train and evaluate unified multimodal models as auto-encoders (UAE) with the Hugging Face stack.

The public names below load on first use (PEP 562), so `import uae_hf` and the `uae-hf` command line start without
torch, diffusers, TRL or evaluate. Two side effects of the package stay in force from `import uae_hf` on, each set up
here without importing the library it touches: `evaluate.load("unified_bench")` finds the module shipped in
`uae_hf.metrics`, and the toy world's `"toyworld"` backbone is in the similarity registry whenever the registry is.
"""

import importlib
import importlib.abc
import sys
from collections.abc import Callable
from types import ModuleType

from .metrics import install_evaluate_hook, metric_path

__version__ = "0.1.0.dev0"

# Public name → the submodule that defines it, imported when the name is first read.
_SUBMODULE_OF = {
    "BACKBONES": "rewards.similarity",
    "PAPER_BACKBONES": "rewards.similarity",
    "OFFICIAL_BACKBONES": "rewards.similarity",
    "ImageEmbedder": "rewards.similarity",
    "ImageSimilarity": "rewards.similarity",
    "register_backbone": "rewards.similarity",
    "CAPTION_INSTRUCTION": "pipelines.uae_reconstruction",
    "NEGATIVE_PROMPT": "pipelines.uae_reconstruction",
    "UAEReconstructionPipeline": "pipelines.uae_reconstruction",
    "UAEReconstructionPipelineOutput": "pipelines.uae_reconstruction",
    "caption_images": "pipelines.uae_reconstruction",
    "encode_generate_prompts": "pipelines.uae_reconstruction",
    "load_saved_pipeline": "pipelines.uae_reconstruction",
    "load_uae_pipeline": "pipelines.uae_reconstruction",
    "load_encoder": "pipelines.uae_reconstruction",
    "NotAnEncoderError": "pipelines.uae_reconstruction",
    "ReconstructionReward": "rewards.reconstruction",
    "PairedRoundTrip": "paired_round_trip",
    "JanusRoundTrip": "janus_round_trip",
    "Emu3RoundTrip": "emu3_round_trip",
    "DecoderFamily": "decoders",
    "decoder_family": "decoders",
    "ReleaseFormatError": "release",
    "ReleaseLoadReport": "release",
    "load_uae_release": "release",
    "UnifiedGRPOConfig": "trainer",
    "UnifiedGRPOTrainer": "trainer",
    "FlowGRPOConfig": "trainer",
    "FlowGRPOTrainer": "trainer",
    "DiffusionNFTConfig": "trainer",
    "DiffusionNFTTrainer": "trainer",
    "DecoderRLConfig": "trainer",
    "DecoderRLTrainer": "trainer",
    "DecoderPretrainingConfig": "trainer",
    "DecoderPretrainingTrainer": "trainer",
    "ColdStartConfig": "trainer",
    "ColdStartTrainer": "trainer",
    "DecoderTrainer": "trainer",
    "DecoderTrainingConfig": "trainer",
    "ReconstructionArguments": "trainer",
    "ReconstructionBatch": "rewards.reconstruction",
    "UAEProjector": "models.projector",
    "build_tiny_models": "tiny_models",
    "ToyWorldVisionModel": "toy_world",
    "toy_world_dataset": "toy_world",
    "pipeline_model_card": "hub",
}

__all__ = [
    "BACKBONES",
    "PAPER_BACKBONES",
    "OFFICIAL_BACKBONES",
    "ImageEmbedder",
    "ImageSimilarity",
    "metric_path",
    "register_backbone",
    "CAPTION_INSTRUCTION",
    "NEGATIVE_PROMPT",
    "ReconstructionReward",
    "PairedRoundTrip",
    "JanusRoundTrip",
    "Emu3RoundTrip",
    "DecoderFamily",
    "decoder_family",
    "ReleaseFormatError",
    "ReleaseLoadReport",
    "load_uae_release",
    "UnifiedGRPOConfig",
    "UnifiedGRPOTrainer",
    "FlowGRPOConfig",
    "FlowGRPOTrainer",
    "DiffusionNFTConfig",
    "DiffusionNFTTrainer",
    "DecoderRLConfig",
    "DecoderRLTrainer",
    "DecoderPretrainingConfig",
    "DecoderPretrainingTrainer",
    "ColdStartConfig",
    "ColdStartTrainer",
    "DecoderTrainer",
    "DecoderTrainingConfig",
    "ReconstructionArguments",
    "ReconstructionBatch",
    "UAEProjector",
    "UAEReconstructionPipeline",
    "UAEReconstructionPipelineOutput",
    "build_tiny_models",
    "ToyWorldVisionModel",
    "toy_world_dataset",
    "caption_images",
    "encode_generate_prompts",
    "load_saved_pipeline",
    "load_uae_pipeline",
    "load_encoder",
    "NotAnEncoderError",
    "pipeline_model_card",
]


def __getattr__(name: str):
    if name in _SUBMODULE_OF:
        value = getattr(importlib.import_module(f".{_SUBMODULE_OF[name]}", __name__), name)
        globals()[name] = value  # later reads skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when a watched module is about to load, wraps the loader the other finders chose."""

    def __init__(self):
        self.waiting: dict[str, list[Callable[[ModuleType], None]]] = {}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.waiting:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _CallbackLoader(spec.loader, self)
                return spec
        return None


class _CallbackLoader(importlib.abc.Loader):
    """Executes a module with its own loader, then hands it to the callbacks waiting for it."""

    def __init__(self, loader, finder: _AfterImportFinder):
        self.loader = loader
        self.finder = finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        for callback in self.finder.waiting.pop(module.__name__, []):
            callback(module)

    def __getattr__(self, name: str):  # get_source, get_filename, ... stay the real loader's
        if name == "loader":  # not set yet (a copy being built)
            raise AttributeError(name)
        return getattr(self.loader, name)


_AFTER_IMPORT = _AfterImportFinder()


def _after_import(module_name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call `callback(module)` now if `module_name` is imported, else right after its first import; a callback
    already waiting for that module is not added twice."""
    if module_name in sys.modules:
        callback(sys.modules[module_name])
        return
    waiting = _AFTER_IMPORT.waiting.setdefault(module_name, [])
    if callback not in waiting:
        waiting.append(callback)
    if _AFTER_IMPORT not in sys.meta_path:
        sys.meta_path.insert(0, _AFTER_IMPORT)


def _register_toy_world_backbone(similarity: ModuleType) -> None:
    # The toy world's backbone module registers "toyworld" (and its transformers Auto classes) as it loads. It costs
    # the `datasets` import, which the metric, the trainers and the toy world's data load anyway.
    importlib.import_module(".toy_world.backbone", __name__)


install_evaluate_hook()
_after_import(f"{__name__}.rewards.similarity", _register_toy_world_backbone)
