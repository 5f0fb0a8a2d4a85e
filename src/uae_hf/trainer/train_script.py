"""`uae-hf train`: a thin shell over the UAE trainers, configured TRL-style from YAML and flags; the recipe's `stage`
picks the trainer + config pair."""

import argparse
import difflib
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import yaml
from transformers import AutoProcessor
from trl import ModelConfig, TrlParser, get_peft_config

from ..cli import CommandLineError, check_training_counts
from ..pipelines.uae_reconstruction.captioning import NotAnEncoderError
from ..pipelines.uae_reconstruction.hub_access import push_access_problem
from ..rewards.similarity import BACKBONES, BackboneUnavailableError
from ..sample_data import skimage_photos
from . import TRAINERS
from .sharded_parameters import whole_model_loading

TINY = "tiny"


@dataclass
class UnifiedScriptArguments:
    """What to train (the stage) and on what: the data and the decoder (the encoder is `model_name_or_path`)."""

    stage: str = field(
        default="understanding",
        metadata={"help": "UAE stage, which picks the trainer: understanding (UnifiedGRPOTrainer), generation "
                  "(FlowGRPOTrainer), generation_nft (DiffusionNFTTrainer: stage 3 with DiffusionNFT), pretrain "
                  "(DecoderPretrainingTrainer), cold_start (ColdStartTrainer). "
                  "`--stage NAME --help` lists that stage's options.", "choices": list(TRAINERS)},
    )
    dataset_name: str = field(
        default="skimage",
        metadata={"help": "'skimage' (built-in photos), a datasets Hub id, or a local dataset or image folder."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    image_size: int | None = field(default=None, metadata={"help": "Resize images to this square size (None: keep)."})
    decoder: str = field(
        default=TINY,
        metadata={"help": "UAE pipeline folder or Hub repo, or a text-to-image pipeline of a supported family (SD3, "
                  "FLUX.1, FLUX.2 [klein], Qwen-Image: text mode); 'tiny' for the offline UAE twin, 'tiny-<family>' "
                  "(e.g. 'tiny-flux1') for that family's offline twin."},
    )
    projector: str | None = field(
        default=None,
        metadata={"help": "With a plain SD3 `decoder`: a UAEProjector folder, or 'new' for a freshly initialised one "
                  "sized from the encoder and the DiT (decoder pre-training from scratch)."},
    )
    tiny_models_dir: str = field(
        default="outputs/tiny-models", metadata={"help": "Where the offline twins are built (when 'tiny' is used)."}
    )


def _twins(script_args: UnifiedScriptArguments) -> Path:
    from ..tiny_models import build_tiny_models

    folder = Path(script_args.tiny_models_dir)
    decoder = tiny_decoder_folder(folder, script_args.decoder) or folder / "decoder"
    if not (decoder / "model_index.json").exists():
        build_tiny_models(folder)
    return folder


def tiny_decoder_folder(twins: Path, decoder: str) -> Path | None:
    """`tiny-<family>`: that family's twin under `twins/decoders/`; else `None`."""
    if not decoder.startswith(f"{TINY}-"):
        return None
    return twins / "decoders" / decoder.removeprefix(f"{TINY}-").replace("-", "_")


def tiny_encoder_folder(twins: Path, model: str) -> Path | None:
    """`tiny`: the Qwen2.5-VL twin; `tiny-<family>` (`tiny-qwen3-vl`, `tiny-gemma3`): that encoder's twin under
    `twins/encoders/`; else `None`."""
    if model == TINY:
        return twins / "encoder"
    if not model.startswith(f"{TINY}-"):
        return None
    return twins / "encoders" / model.removeprefix(f"{TINY}-").replace("-", "_")


def _train_dataset(script_args: UnifiedScriptArguments) -> datasets.Dataset:
    if script_args.dataset_name == "skimage":
        return skimage_photos(script_args.image_size or 128)
    if Path(script_args.dataset_name).is_dir() and not Path(script_args.dataset_name, "dataset_info.json").exists():
        dataset = datasets.load_dataset("imagefolder", data_dir=script_args.dataset_name, split=script_args.dataset_train_split)
    elif Path(script_args.dataset_name, "dataset_info.json").exists():
        dataset = datasets.load_from_disk(script_args.dataset_name)
    else:
        dataset = datasets.load_dataset(
            script_args.dataset_name, script_args.dataset_config, split=script_args.dataset_train_split
        )
    if script_args.image_column != "image":
        if script_args.image_column not in dataset.column_names:
            raise ValueError(f"dataset has no column {script_args.image_column!r}; columns: {dataset.column_names}")
        dataset = dataset.rename_column(script_args.image_column, "image")
    if script_args.image_size:
        size = (script_args.image_size, script_args.image_size)
        dataset = dataset.map(lambda row: {"image": row["image"].convert("RGB").resize(size)})
    return dataset


def _assemble_decoder(sd3: str, encoder: str, projector: str, torch_dtype: torch.dtype | None = None):
    """A UAE pipeline from a plain SD3 pipeline, an encoder and a projector folder (or a new projector)."""
    from ..models.projector import UAEProjector
    from ..pipelines import UAEReconstructionPipeline, load_uae_pipeline

    if projector != "new":
        return load_uae_pipeline(sd3, encoder, projector, torch_dtype=torch_dtype)
    pipe = load_uae_pipeline(sd3, encoder, None, conditioning_mode="text", torch_dtype=torch_dtype, load_t5=False)
    hidden = pipe.vlm.config.get_text_config().hidden_size
    torch.manual_seed(0)
    fresh = UAEProjector(hidden, 4 * hidden, pipe.transformer.config.joint_attention_dim)
    fresh.to(dtype=torch_dtype or pipe.transformer.dtype)
    return UAEReconstructionPipeline.from_pipe(pipe, projector=fresh, conditioning_mode="embeddings")


def model_dtype(dtype: str | None) -> torch.dtype | None:
    """`ModelConfig.dtype` (`"bfloat16"`, `"float32"`, ...) as a `torch.dtype`; `None` for `"auto"` (as stored)."""
    return None if dtype in (None, "auto") else getattr(torch, dtype)


def same_checkpoint(model, name_or_path: str) -> bool:
    """Whether `model` was loaded from `name_or_path` (the same folder, or the same Hub id)."""
    source = model.config._name_or_path
    if Path(source).is_dir() and Path(name_or_path).is_dir():
        return Path(source).resolve() == Path(name_or_path).resolve()
    return source == name_or_path


def train(script_args: UnifiedScriptArguments, training_args, model_args: ModelConfig):
    """Build encoder, decoder and data from the arguments, train the stage, then save as TRL's scripts do: the
    trained parts, the trainer state (`trainer_state.json` with the log history) and the model card."""
    from ..pipelines import load_saved_pipeline, load_uae_pipeline
    from ..pipelines.uae_reconstruction import load_encoder

    uses_twins = TINY in (model_args.model_name_or_path.split("-")[0], script_args.decoder.split("-")[0])
    twins = _twins(script_args) if uses_twins else None
    encoder = str(tiny_encoder_folder(twins, model_args.model_name_or_path) or model_args.model_name_or_path)
    dtype = model_dtype(model_args.dtype)  # `dtype` loads every model: encoder, decoder, projector
    understanding = script_args.stage == "understanding"
    # every model loads whole, also under DeepSpeed ZeRO-3: the engine partitions the trained one when it prepares it
    with whole_model_loading():
        if script_args.decoder == TINY:
            decoder = load_uae_pipeline(twins / "decoder", twins / "encoder", twins / "projector", torch_dtype=dtype)
        elif script_args.decoder.startswith(f"{TINY}-"):
            decoder = load_saved_pipeline(tiny_decoder_folder(twins, script_args.decoder), torch_dtype=dtype)
        elif script_args.projector:
            decoder = _assemble_decoder(script_args.decoder, encoder, script_args.projector, dtype)
        else:
            # the config's trust_remote_code (default off) also governs the decoder folder's own code
            decoder = load_saved_pipeline(script_args.decoder, trust_remote_code=model_args.trust_remote_code,
                                          torch_dtype=dtype)
        # the decoder stages read captions with the decoder's own (frozen) encoder; stage 2 trains a LoRA on it when
        # the decoder reads the very checkpoint being trained (it decodes with the adapter disabled): one copy
        vlm = getattr(decoder, "vlm", None)  # a UAE pipeline's encoder; other families have none
        reads_trained = model_args.use_peft and vlm is not None and same_checkpoint(vlm, encoder)
        shares_encoder = not understanding or reads_trained
        if vlm is not None and shares_encoder:
            model = vlm
        else:
            model, _ = load_encoder(encoder, dtype or "auto")
    if uses_twins and training_args.backbone_checkpoints is None:
        training_args.backbone_checkpoints = {name: str(twins / "backbones" / name) for name in BACKBONES
                                              if (twins / "backbones" / name).exists()}
    trainer_class = TRAINERS[script_args.stage][1]
    trainer = trainer_class(
        model=model,
        decoder=decoder,
        args=training_args,
        train_dataset=_train_dataset(script_args),
        processing_class=AutoProcessor.from_pretrained(encoder),
        # the decoder stages train DiT / LLM LoRAs from their own decoder_lora_* / llm_lora_* fields, not the
        # encoder's LoRA flags
        peft_config=get_peft_config(model_args) if understanding else None,
    )
    resume = training_args.resume_from_checkpoint  # a checkpoint folder, or "true" for the output_dir's last one
    trainer.train(resume_from_checkpoint=True if str(resume).lower() == "true" else resume)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the log history of the whole run
    dataset_name = None if script_args.dataset_name == "skimage" else script_args.dataset_name
    trainer.create_model_card(dataset_name=dataset_name)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
    # a process group left to the interpreter's exit can abort it (gloo's threads: "terminate called without an
    # active exception"), failing a finished run
    trainer.accelerator.end_training()
    return trainer


def _unknown(names: list[str], known: list[str], prefix: str = "") -> str:
    """`names` (written with `prefix`), each with the closest of `known` (difflib) as a suggestion."""
    described = []
    for name in names:
        close = [prefix + match for match in difflib.get_close_matches(name, known, n=3, cutoff=0.6)]
        described.append(f"{prefix}{name} (did you mean {' or '.join(close)}?)" if close else prefix + name)
    return ", ".join(described)


class RecipeParser(TrlParser):
    """`TrlParser` whose mistakes are one line the user can act on (`CommandLineError`): no usage dump, no abbreviated
    options (a typo is an error, never a prefix of a valid option), and for a misspelt option or recipe key the
    closest valid names."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        raise CommandLineError(f"{message} (uae-hf train --help lists every option)")

    def _option_names(self) -> list[str]:
        return sorted({action.dest for action in self._actions} - {"help"})

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        unknown = [key for key in kwargs if key not in self._option_names()]
        if unknown:
            raise CommandLineError(f"unknown key(s) in the --config recipe: {_unknown(unknown, self._option_names())}")
        return super().set_defaults_with_config(**kwargs)

    def parse_known_args(self, args=None, namespace=None):
        namespace, remaining = super().parse_known_args(args, namespace)
        if remaining:  # TRL would report them only after building (and checking) every config
            flags = [arg.lstrip("-").split("=")[0] for arg in remaining if arg.startswith("-")]
            if not flags:
                raise CommandLineError(f"unexpected argument(s) {remaining} (options are --name value)")
            raise CommandLineError(f"unknown option(s): {_unknown(flags, self._option_names(), prefix='--')}")
        check_training_counts(namespace)  # before the configs' own checks, which name products of them
        return namespace, remaining


class _StageParser(argparse.ArgumentParser):
    def __init__(self):
        super().__init__(add_help=False, allow_abbrev=False)

    def error(self, message):
        raise CommandLineError(f"{message} (uae-hf train --help lists every option)")


def recipe_stage(argv: list[str] | None) -> str:
    """The stage a command line trains: `--stage`, else the `--config` recipe's `stage:`, else "understanding"."""
    parser = _StageParser()
    parser.add_argument("--stage", choices=list(TRAINERS))
    parser.add_argument("--config")
    known, _ = parser.parse_known_args(argv)
    if known.stage is not None or known.config is None:
        return known.stage or "understanding"
    try:
        recipe = yaml.safe_load(Path(known.config).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise CommandLineError(f"cannot read the --config recipe: {error}") from error
    stage = recipe.get("stage", "understanding") if isinstance(recipe, dict) else "understanding"
    if stage not in TRAINERS:
        raise CommandLineError(f"stage: {stage!r} in the --config recipe is not one of {list(TRAINERS)}")
    return stage


def _no_gpu_message(argv: list[str] | None) -> str:
    if "--config" not in (argv or []):
        return ("no --config recipe, so TRL's defaults apply, which train in bf16 on a GPU, and this machine has none: "
                "pass --config examples/recipes/understanding_tiny.yaml (the offline twins, on the CPU) or another "
                "recipe, or --use_cpu true --bf16 false")
    return ("this recipe trains in bf16 on a GPU (bf16: true) and this machine has none: run it on a GPU, or pass "
            "--use_cpu true --bf16 false to train on the CPU (slow at real size; the *_tiny.yaml recipes are sized "
            "for a CPU)")


def _check_hub_access(token: str | None) -> None:
    """Before any model loads: pushing needs the Hub reachable and a token that it accepts."""
    problem = push_access_problem(token)
    if problem is not None:
        raise CommandLineError(f"--push_to_hub true, but {problem}; or drop --push_to_hub (the run saves to "
                               "output_dir; push later with huggingface_hub's upload_folder)")


def main(argv: list[str] | None = None):
    """`uae-hf train`: parse the recipe and flags, then train. Mistakes in them, and a backbone that cannot be
    loaded, raise `CommandLineError` (one line, exit status 2)."""
    config_class = TRAINERS[recipe_stage(argv)][0]
    parser = RecipeParser((UnifiedScriptArguments, config_class, ModelConfig), prog="uae-hf train")
    try:
        script_args, training_args, model_args = parser.parse_args_and_config(argv)
    except (OSError, yaml.YAMLError) as error:
        raise CommandLineError(f"cannot read the --config recipe: {error}") from error
    except ValueError as error:  # a value the configs' own checks refuse (stage, group size, ...)
        if "bf16/gpu" in str(error):  # transformers' words for bf16 asked for where there is no GPU
            raise CommandLineError(_no_gpu_message(argv)) from error
        raise CommandLineError(str(error)) from error
    if training_args.push_to_hub:
        _check_hub_access(training_args.hub_token)
    try:
        return train(script_args, training_args, model_args)
    except NotAnEncoderError as error:  # a text-only model_name_or_path, or one without a chat template
        raise CommandLineError(str(error)) from error
    except BackboneUnavailableError as error:
        raise CommandLineError(
            f"cannot load the {error.backbone} backbone ({error.checkpoint}): {error.reason}. Point it at a local "
            f"copy: backbone_checkpoints: {{{error.backbone}: PATH}} in the recipe, or --backbone_checkpoints "
            f"'{{\"{error.backbone}\": \"PATH\"}}'"
        ) from error
