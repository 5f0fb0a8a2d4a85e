"""The `uae-hf` command line: a thin shell over the library."""

import argparse
import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

from .decoders import FAMILY_OF_PIPELINE, supported_pipelines


class CommandLineError(SystemExit):
    """A mistake the user can act on: `main` prints `uae-hf: <message>` (no traceback) and exits with status 2."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2  # argparse's status for a usage error; str(error) stays the message


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says it or there is none to show (None, False, [])."""

    def _get_help_string(self, action):
        nothing_to_show = action.default is None or action.default is False or action.default == []
        if nothing_to_show or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def closest_options(message: str, options) -> str:
    """argparse's "unrecognized arguments: --x" `message` with the closest of `options` to each (difflib)."""
    if not message.startswith("unrecognized arguments:"):
        return message
    described = []
    for argument in message.removeprefix("unrecognized arguments:").split():
        flag = argument.split("=")[0]
        close = difflib.get_close_matches(flag, options, n=2, cutoff=0.6) if flag.startswith("-") else []
        described.append(f"{argument} (did you mean {' or '.join(close)}?)" if close else argument)
    return "unrecognized arguments: " + " ".join(described)


class _Parser(argparse.ArgumentParser):
    """argparse with defaults in `--help`, no abbreviated options (a typo is an error, never a prefix of a valid
    option), and usage errors as one `CommandLineError` line naming the closest valid option."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message):
        options = [option for action in self._actions for option in action.option_strings]
        raise CommandLineError(f"{closest_options(message, options)} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):
        # argparse reports unknown options of a subcommand through the top parser: the subcommand's parser checks them
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            command = self._subparsers._group_actions[0].choices.get(getattr(namespace, "command", None)) \
                if self._subparsers else None
            (command or self).error(f"unrecognized arguments: {' '.join(unknown)}")
        return namespace


def positive_int(value: str) -> int:
    """An argparse type: an integer of at least 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


def torch_device(value: str) -> str:
    """An argparse type: a device string torch parses, on hardware this machine has."""
    import torch

    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: pass cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{value}: this machine has no usable CUDA GPU (torch.cuda.is_available() "
                                             "is False): pass --device cpu, or leave --device out")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{value}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{value}: MPS is not available on this machine: pass --device cpu")
    return value


# Warnings users cannot act on, off unless --verbose (regular expressions on the message's start).
HARMLESS_WARNINGS = (
    r"The following generation flags are not valid and may be ignored",  # seeded captioning samples outside generate
    r"`(is_)?gradient_checkpointing\w*` is deprecated",  # TRL calls transformers' old names
    r"Model config: \w+_token_id must be `None` or an integer within the vocabulary",  # the tiny twins' CLIP towers
    # an encoder adapter with its own embeddings and head (the demo's): inference never merges it
    r"Model has `tie_word_embeddings=True` and a tied layer is part of the adapter",
    r"No LoRA keys associated to \w+",  # a DiT LoRA file holds no text-encoder keys, by design
    # PEFT saving an adapter whose base is a relative path (the demo's) offline: no UAE stage changes the vocabulary
    r"Could not find a config file in .* - will assume that the vocabulary was not modified",
    r"Setting accelerator to CPU\. If you have GPU",  # DeepSpeed, imported by accelerate, on a machine without one
)
_HARMLESS = re.compile("|".join(HARMLESS_WARNINGS))


class _HideHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _HARMLESS.match(record.getMessage())


@contextlib.contextmanager
def _quiet_hub(verbose: bool):
    """Within: no download bars from huggingface_hub (restored on the way out); `verbose`: as it has them. Cheap: the
    argument checks that may download (a `--pipeline` Hub repo) run in it before any other library loads."""
    import huggingface_hub.utils

    if verbose or huggingface_hub.utils.are_progress_bars_disabled():
        yield
        return
    huggingface_hub.utils.disable_progress_bars()
    try:
        yield
    finally:
        huggingface_hub.utils.enable_progress_bars()


@contextlib.contextmanager
def _quiet_libraries(verbose: bool, data: bool = False):
    """Within: no loading bars from huggingface_hub, transformers, diffusers (and datasets, evaluate with `data`), no
    `HARMLESS_WARNINGS`; the commands' own progress bars stay. Everything is restored on the way out. `verbose`: as
    the libraries have it."""
    if verbose:
        yield
        return
    # each library's module with {is,enable,disable}_progress_bar (datasets.utils.tqdm is also a class's name)
    loggers = [importlib.import_module(f"{name}.utils.logging") for name in ("transformers", "diffusers")]
    bars = loggers + [importlib.import_module(name) for name in ("datasets.utils.tqdm", "evaluate.utils.logging")
                      if data]
    with contextlib.ExitStack() as restore:
        for library in bars:
            if library.is_progress_bar_enabled():
                library.disable_progress_bar()
                restore.callback(library.enable_progress_bar)
        restore.enter_context(_quiet_hub(verbose))
        hide = _HideHarmless()
        for library in loggers:
            for handler in library.get_logger().handlers:
                handler.addFilter(hide)
                restore.callback(handler.removeFilter, hide)
        deepspeed = logging.getLogger("DeepSpeed")  # its logger, made on import: the filter is there before
        deepspeed.addFilter(hide)
        restore.callback(deepspeed.removeFilter, hide)
        restore.enter_context(warnings.catch_warnings())
        for pattern in HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        yield


def reconstruct(
    pipeline,
    image_paths: list[Path],
    originals: list,
    output_dir: Path,
    batch_size: int = 4,
    seed: int = 0,
    **generate_kwargs,
) -> list[dict]:
    """Round-trip each image through `pipeline` (`uae_hf.round_trip.round_trip`: image i with seed `seed + i`, whatever
    the batch size); write reconstructions, `captions.jsonl` and `grid.png`.

    `reconstructions/<name>.png` is named as `uae_hf.metrics.round_trip_bench.unique_names` says: the image's stem;
    its file name where stems are shared (`x.png.png`, `x.jpg.png`); its path from the common folder where file names
    are shared too (`d1/x.png.png`).
    """
    from tqdm.auto import tqdm

    from .metrics.round_trip_bench import unique_names
    from .round_trip import round_trip
    from .visualization import reconstruction_grid

    names = unique_names(image_paths)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "reconstructions").mkdir(exist_ok=True)
    rows, reconstructions = [], []
    with tqdm(total=len(originals), desc="reconstructing", unit="image") as progress:
        for item in round_trip(pipeline, originals, batch_size, seed, progress=progress, **generate_kwargs):
            target = output_dir / "reconstructions" / f"{names[item.index]}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            item.reconstruction.save(target)
            reconstructions.append(item.reconstruction)
            rows.append({"image": str(image_paths[item.index]), "caption": item.caption, "reconstruction": str(target)})
    with open(output_dir / "captions.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    labels = [name if "/" in name else Path(path).name for name, path in zip(names, image_paths)]
    reconstruction_grid(originals, reconstructions, [row["caption"] for row in rows], names=labels).save(
        output_dir / "grid.png"
    )
    return rows


def _guidance_scale(args) -> float:
    """`--guidance-scale`, else the decoder's default: the UAE pipeline's (SD3's) 5.0, or another family's own."""
    if args.guidance_scale is not None:
        return args.guidance_scale
    source = getattr(args, "pipeline_source", None)
    text_to_image = source.text_to_image_class if source else None
    if text_to_image in (None, SD3_CLASS):
        return UAE_GUIDANCE_SCALE
    from .decoders import family_class

    return family_class([text_to_image]).default_guidance_scale


def _generate_kwargs(args) -> dict:
    kwargs = {
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": _guidance_scale(args),
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "do_sample": args.temperature > 0,
    }
    if args.height:
        kwargs["height"] = args.height
    if args.width:
        kwargs["width"] = args.width
    if args.conditioning_mode:
        kwargs["conditioning_mode"] = args.conditioning_mode
    return kwargs


def _add_generation_arguments(parser: argparse.ArgumentParser, steps: int, tokens: int) -> None:
    parser.add_argument("--num-inference-steps", type=positive_int, default=steps, help="decoder sampling steps")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="the decoder's guidance scale (default: its own; 5.0 for a UAE or SD3 pipeline, 3.5 for "
                        "FLUX.1-dev's guidance embedding, 4.0 for Qwen-Image's true CFG)"),
    parser.add_argument("--height", type=positive_int, default=None,
                        help="output height (default: the decoder's native size)")
    parser.add_argument("--width", type=positive_int, default=None,
                        help="output width (default: the decoder's native size)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=tokens, help="caption length limit")
    parser.add_argument("--temperature", type=float, default=0.7, help="caption sampling temperature (0: greedy)")
    parser.add_argument("--conditioning-mode", choices=["embeddings", "text"], default=None,
                        help="override the pipeline's mode (default: its own)")
    _add_model_arguments(parser)
    parser.add_argument("--batch-size", type=positive_int, default=4, help="images per pipeline call")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of the first image (image i uses seed + i)")
    parser.add_argument("--encoder-adapter", default=None, metavar="DIR",
                        help="a PEFT adapter folder to load on the encoder, e.g. a stage-2 output (default: none)")
    parser.add_argument("--encoder", default=None, metavar="VLM",
                        help="with a text-to-image --pipeline (StableDiffusion3Pipeline, FluxPipeline, "
                        "Flux2KleinPipeline, QwenImagePipeline): the chat VLM (folder or Hub id) that captions; the "
                        "decoder then draws from the captions in text mode. With bench --system emu3: Emu3's Chat "
                        "checkpoint (e.g. BAAI/Emu3-Chat-hf)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the pipeline folder's own code (by default a UAE pipeline is rebuilt from uae_hf's "
                        "classes and no code from the folder or repo runs)")


DTYPES = ("auto", "bfloat16", "float16", "float32")


def _add_model_arguments(parser: argparse.ArgumentParser, device: bool = True) -> None:
    if device:
        parser.add_argument("--device", type=torch_device, default=None,
                            help="where the models run (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="dtype of every model loaded; auto (default): bfloat16 on a GPU, else as stored on disk")


def _device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _torch_dtype(args, device: str = "cpu"):
    """The `--dtype` choice as a `torch.dtype`; `None` (each model as stored) for auto off the GPU."""
    import torch

    if args.dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else None
    return getattr(torch, args.dtype)


def _folder_fingerprint(folder: Path) -> str:
    """A short hash of a folder's file names, sizes and modification times: a model saved again into the same folder
    changes it, and no weights are read."""
    digest = hashlib.sha256()
    for path in sorted(path for path in folder.rglob("*") if path.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _pipeline_folder(source: str) -> tuple[Path, str | None]:
    """`--pipeline` as a local folder (a Hub repo from the cache, or downloaded) and its Hub revision, if any."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CommandLineError(f"--pipeline {source}: not a pipeline folder (it has no model_index.json); pass a "
                                   "folder written by save_pretrained or uae-hf convert-release")
        return path, None
    if path.exists():
        raise CommandLineError(f"--pipeline {source} is a file, not a pipeline folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = Path(snapshot_download(source))
    except HFValidationError:
        raise CommandLineError(f"--pipeline {source}: no such folder") from None
    except RepositoryNotFoundError:
        raise CommandLineError(f"--pipeline {source}: no such folder, and no such Hub repo (if it is private or "
                               "gated, log in first: hf auth login)") from None
    except LocalEntryNotFoundError:
        raise CommandLineError(f"--pipeline {source}: no such folder, and no Hub repo of that name in the local "
                               "cache (offline, or the Hub cannot be reached)") from None
    return folder, folder.name if folder.parent.name == "snapshots" else None


@dataclass
class PipelineSource:
    """What `--pipeline` names, found before any model loads: its local folder, its Hub revision (for a Hub repo),
    and, for a text-to-image pipeline of a supported family (no encoder: `--encoder` captions, the decoder draws
    from the captions as text prompts), its class name."""

    folder: Path
    revision: str | None
    text_to_image_class: str | None


UAE_PIPELINE_CLASS = "UAEReconstructionPipeline"
SD3_CLASS = "StableDiffusion3Pipeline"
UAE_GUIDANCE_SCALE = 5.0  # the UAE pipeline's (and SD3's) default; other families default to their own


def _looks_like_a_path(value: str) -> bool:
    """Whether `value` can only be a local path (no Hub id, `owner/name`, is written like it)."""
    return Path(value).is_absolute() or value.startswith((".", "~")) or value.count("/") > 1 or "\\" in value


def _check_model_folder(argument: str, value: str, marker: str, what: str) -> None:
    """A local `value` (given as `argument`, e.g. `--encoder DIR`) must be a folder holding `marker`
    (`CommandLineError` if not); a Hub id is left to the loader."""
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / marker).is_file():
            raise CommandLineError(f"{argument}: not {what} (it has no {marker})")
    elif path.exists():
        raise CommandLineError(f"{argument} is a file, not {what}")
    elif _looks_like_a_path(value):
        raise CommandLineError(f"{argument}: no such folder")


def _pipeline_source(args, download: bool = True) -> PipelineSource | None:
    """`--pipeline` with `--encoder`, `--encoder-adapter` and `--conditioning-mode`, checked without loading a model
    (a Hub repo is downloaded, unless `download` is False: then only a local folder is checked, and `None` returned
    for a Hub id)."""
    if not download and not Path(args.pipeline).expanduser().exists():
        return None
    folder, revision = _pipeline_folder(args.pipeline)
    try:
        class_name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as error:
        raise CommandLineError(f"--pipeline {args.pipeline}: cannot read its model_index.json ({error})") from error
    class_name = class_name[-1] if isinstance(class_name, list) else class_name
    text_to_image = class_name if class_name != UAE_PIPELINE_CLASS else None
    if text_to_image and text_to_image not in FAMILY_OF_PIPELINE:
        raise CommandLineError(f"--pipeline {args.pipeline} is a {class_name}, not a UAE pipeline nor a decoder uae_hf "
                               "supports: pass a folder written by UAEReconstructionPipeline.save_pretrained or uae-hf "
                               f"convert-release, or with --encoder one of {supported_pipelines()}")
    if text_to_image and not args.encoder:
        raise CommandLineError(f"--pipeline {args.pipeline} is a plain {class_name}: it has no encoder to caption "
                               "images. Pass --encoder (a chat VLM folder or Hub id, e.g. Qwen/Qwen2.5-VL-3B-Instruct) "
                               "to caption with it and draw from the captions in text mode, or a UAE pipeline")
    if text_to_image and args.conditioning_mode == "embeddings":
        raise CommandLineError(f"--conditioning-mode embeddings needs a projector, which the plain {class_name} "
                               f"--pipeline {args.pipeline} lacks: leave --conditioning-mode out (text mode)")
    if args.encoder and not text_to_image:
        raise CommandLineError("--encoder is for a text-to-image --pipeline without an encoder (SD3, FLUX.1, ...); "
                               f"{args.pipeline} is a UAE pipeline with its own encoder: drop --encoder "
                               "(--encoder-adapter loads an adapter on it)")
    if args.encoder:
        _check_model_folder(f"--encoder {args.encoder}", args.encoder, "config.json", "a model folder")
    if args.encoder_adapter:
        _check_model_folder(f"--encoder-adapter {args.encoder_adapter}", args.encoder_adapter, "adapter_config.json",
                           "a PEFT adapter folder")
    return PipelineSource(folder, revision, text_to_image)


def _local_fingerprint(source: str | None) -> tuple[str | None, str | None]:
    """A local folder's resolved path and `_folder_fingerprint`; a Hub id (or `None`) as it is, without one."""
    if source and Path(source).is_dir():
        return str(Path(source).resolve()), _folder_fingerprint(Path(source))
    return source, None


def _pipeline_settings(args, source: PipelineSource) -> dict:
    """What identifies the pipeline `_load_pipeline` will make of `source` (for `bench`)."""
    device = _device(args)
    dtype = _torch_dtype(args, device)
    adapter, adapter_fingerprint = _local_fingerprint(args.encoder_adapter)
    settings = {
        "pipeline": args.pipeline if source.revision else str(source.folder.resolve()),
        "revision": source.revision,
        "folder_fingerprint": None if source.revision else _folder_fingerprint(source.folder),
        "encoder_adapter": adapter,
        "encoder_adapter_fingerprint": adapter_fingerprint,
        "trust_remote_code": args.trust_remote_code,
        "dtype": str(dtype).removeprefix("torch.") if dtype else "as stored",
        "device": device,
    }
    if args.encoder:  # only then: earlier runs' settings have no such key
        settings["encoder"], settings["encoder_fingerprint"] = _local_fingerprint(args.encoder)
    return {"system": args.system, **settings}


def _load_pipeline(args, source: PipelineSource):
    """The `--pipeline` found at `source` (a text-to-image one paired with `--encoder`: SD3 as a text-mode UAE
    pipeline, another family as a `PairedRoundTrip`), with its `--encoder-adapter`, in `--dtype` on `--device`."""
    from .pipelines import load_saved_pipeline, load_uae_pipeline

    device = _device(args)
    dtype = _torch_dtype(args, device)
    if source.text_to_image_class == SD3_CLASS:
        pipeline = load_uae_pipeline(source.folder, args.encoder, conditioning_mode="text", torch_dtype=dtype)
    elif source.text_to_image_class:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from .paired_round_trip import PairedRoundTrip

        vlm = AutoModelForImageTextToText.from_pretrained(args.encoder, dtype=dtype or "auto")
        decoder = load_saved_pipeline(source.folder, torch_dtype=dtype)
        pipeline = PairedRoundTrip(vlm, AutoProcessor.from_pretrained(args.encoder), decoder)
    else:
        pipeline = load_saved_pipeline(source.folder, trust_remote_code=args.trust_remote_code, torch_dtype=dtype)
    if args.encoder_adapter:
        pipeline.load_encoder_adapter(args.encoder_adapter)
    return pipeline.to(device)


def _check_output_folder(argument: str, folder: str) -> None:
    if Path(folder).is_file():
        raise CommandLineError(f"{argument} {folder} is a file: pass a folder to write into")


def _check_tiny_models(args) -> None:
    _check_output_folder("output_dir", args.output_dir)


def _cmd_tiny_models(args) -> None:
    from .tiny_models import build_tiny_models

    out = build_tiny_models(args.output_dir, with_t5=not args.no_t5)
    print(f"tiny twins written to {out}")


CONSOLE_CAPTION_CHARS = 120  # captions.jsonl keeps each whole


def _console_caption(caption: str) -> str:
    if len(caption) <= CONSOLE_CAPTION_CHARS:
        return repr(caption)
    return f"{caption[:CONSOLE_CAPTION_CHARS]!r}... ({len(caption.split())} words)"


def _check_reconstruct(args) -> None:
    """The images (each given once, some of them files) and the pipeline, before any model loads."""
    from .metrics.round_trip_bench import unique_names

    paths = [Path(p) for p in args.images]
    try:
        unique_names(paths)  # the same image twice
    except ValueError as error:
        raise CommandLineError(str(error)) from None
    problems = [f"{path} is a folder: pass the image files in it" if path.is_dir() else f"{path}: no such image file"
                for path in paths if not path.is_file()]
    if len(problems) == len(paths):  # else the files that are there run, and the others are named as skipped
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CommandLineError(f"{problems[0]}{more}: nothing to reconstruct")
    _check_output_folder("--output-dir", args.output_dir)
    args.pipeline_source = _pipeline_source(args)


def _cmd_reconstruct(args) -> None:
    from .images import load_image

    paths = [Path(p) for p in args.images]
    readable, originals, errors = [], [], []
    for path in paths:  # every image read before the pipeline loads; an unreadable one is skipped and reported
        try:
            originals.append(load_image(path, str(path)))
            readable.append(path)
        except (OSError, ValueError) as error:
            errors.append(str(error))  # it names the file
    if not readable:
        more = f" (and {len(errors) - 1} more unreadable image(s))" if len(errors) > 1 else ""
        raise CommandLineError(f"{errors[0]}{more}: nothing to reconstruct")
    for error in errors:
        print(f"uae-hf: skipped {error}", file=sys.stderr)
    pipeline = _load_pipeline(args, args.pipeline_source)
    rows = reconstruct(
        pipeline, readable, originals, Path(args.output_dir), args.batch_size, args.seed, **_generate_kwargs(args)
    )
    for row in rows:
        print(f"{row['image']}: {_console_caption(row['caption'])}")
    skipped = f"; skipped {len(paths) - len(readable)} unreadable image(s)" if len(readable) < len(paths) else ""
    print(f"wrote {len(rows)} reconstructions, captions.jsonl (whole captions) and grid.png to {args.output_dir}"
          f"{skipped}")


def _check_convert_release(args) -> None:
    """A local release folder that is there, and a destination that is no file, before any model loads."""
    source, fix = Path(args.source).expanduser(), "pass the release's folder, or its Hub id (zhiyuanyan1/UAE)"
    if source.is_file():
        raise CommandLineError(f"source {args.source} is a file: {fix}")
    if not source.exists() and _looks_like_a_path(args.source):
        raise CommandLineError(f"source {args.source}: no such folder; {fix}")
    _check_output_folder("destination", args.destination)


def _cmd_convert_release(args) -> None:
    from .release import load_uae_release

    pipeline = load_uae_release(args.source, torch_dtype=_torch_dtype(args))
    print(pipeline.release_load_report)  # what llm_lora replaced in llm/, as the release's own code loads it
    pipeline.save_pretrained(args.destination)
    print(f"converted {args.source} into a self-loading pipeline folder: {args.destination}")


def _cmd_demo(args) -> None:
    """The UAE recipe from nothing on the toy world (see `uae_hf.toy_world.demo`)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise CommandLineError("demo draws its report's plots with matplotlib: pip install 'uae-hf[demo]'") from error
    from .toy_world.demo import demo_config_from_args, run_demo, run_demo_seeds

    config = demo_config_from_args(args)
    out = Path(config.output_dir)
    if args.seeds > 1:
        summary = run_demo_seeds(config, args.seeds)
        print((out / "summary.md").read_text())
        print(f"summary: {out / 'summary.md'}; each seed's report and pipeline under {out}/seed-N "
              f"(this run: {sum(summary['run_minutes']):.1f} min)")
        return
    results = run_demo(config)
    print((out / "report.md").read_text().split("## Plots")[0])
    print(f"report: {out / 'report.md'}; pipeline: {out / 'pipeline'} (this run: {results['timings_s']['run'] / 60:.1f} min)")


# The scoring backbones' registry names (`uae_hf.rewards.similarity.BACKBONES`, whose module loads torch and
# transformers), to refuse a misspelt one before anything loads; a test keeps them equal to the registry's.
BACKBONE_NAMES = ("clip", "dinov2", "dinov3", "longclip", "siglip", "toyworld")
DEFAULT_BACKBONES = ("clip", "dinov2", "dinov3", "longclip")  # `--backbones default`: the paper's four


def _backbone_checkpoints(args) -> dict[str, str]:
    """`--checkpoint BACKBONE=PATH ...` as a dict, once `--backbones` and every `--checkpoint` are checked: known
    backbones, checkpoints only for those scored, and a local checkpoint a model folder."""
    try:
        checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    except ValueError:
        raise CommandLineError("--checkpoint takes BACKBONE=PATH_OR_ID") from None
    used = DEFAULT_BACKBONES if args.backbones == "default" else tuple(args.backbones.split("+"))
    for name in used:
        if name not in BACKBONE_NAMES:
            close = sorted(difflib.get_close_matches(name, BACKBONE_NAMES, n=2))
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise CommandLineError(f"--backbones {args.backbones}: unknown backbone {name!r}{hint}; choose from "
                                   f"{', '.join(BACKBONE_NAMES)}, joined with '+', or default (the paper's four)")
    for name, checkpoint in checkpoints.items():
        if name not in used:
            raise CommandLineError(f"--checkpoint {name}={checkpoint}: {name} is not scored (--backbones "
                                   f"{args.backbones}: {'+'.join(used)})")
        _check_model_folder(f"--checkpoint {name}={checkpoint}", checkpoint, "config.json", "a model folder")
    return checkpoints


def _without_options(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """`argv` without `options` and their values (`--name value` or `--name=value`)."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in options:
            skip = True
        elif not item.startswith(tuple(f"{option}=" for option in options)):
            kept.append(item)
    return kept


def _app_round_trips(args):
    """The app's `RoundTripApp`: `--pipeline` (or the tiny twins, built into a temporary folder and scored with the
    twin backbones) in `--dtype` on `--device`, and the scoring backbones."""
    from .app import RoundTripApp
    from .rewards.similarity import BackboneUnavailableError

    checkpoints = args.checkpoints
    device = _device(args)
    bench_systems = []
    if args.pipeline:
        source = args.pipeline
        pipeline = _load_pipeline(args, args.pipeline_source)
    else:
        from .metrics.unified_bench.unified_bench import backbones_of
        from .pipelines import load_uae_pipeline
        from .tiny_models import build_tiny_models

        tiny = build_tiny_models(Path(tempfile.mkdtemp(prefix="uae-tiny-twins-")), with_t5=False)
        source = "tiny twins (uae-hf tiny-models)"
        pipeline = load_uae_pipeline(tiny / "decoder", tiny / "encoder", tiny / "projector",
                                     torch_dtype=_torch_dtype(args, device)).to(device)
        if args.encoder_adapter:
            pipeline.load_encoder_adapter(args.encoder_adapter)
        used = backbones_of(args.backbones)  # each scored with its twin, unless --checkpoint says otherwise
        checkpoints = {path.name: str(path) for path in (tiny / "backbones").iterdir() if path.name in used} | checkpoints
        # the bench tab's other systems: the Janus and Emu3 twins (Emu3's at 64 x 64, its default 720 x 720 being
        # 8193 tokens), unless other checkpoints are named
        if not args.bench_janus:
            bench_systems.append(_app_bench_system(args, "janus", str(tiny / "janus"), "janus (tiny twin)"))
        if not args.bench_emu3:
            twins = [str(tiny / "emu3" / name) for name in ("chat", "gen")]
            bench_systems.append(_app_bench_system(args, "emu3", twins, "emu3 (tiny twins)",
                                                   {"height": 64, "width": 64}))
    bench_systems += [_app_bench_system(args, name, getattr(args, f"bench_{name}")) for name in TOKEN_SYSTEMS
                      if getattr(args, f"bench_{name}")]
    fixed = {key: value for key, value in _generate_kwargs(args).items()
             if key in ("height", "width", "conditioning_mode")}
    try:
        return RoundTripApp(pipeline, source, args.backbones, checkpoints, device, args.backbone_dtype,
                            args.batch_size, bench_systems, **fixed)
    except BackboneUnavailableError as error:
        raise CommandLineError(f"cannot load the {error.backbone} backbone ({error.checkpoint}): {error.reason}. "
                               f"Point it at a local copy with --checkpoint {error.backbone}=PATH") from error


def _app_bench_system(args, name: str, checkpoints, label: str | None = None, call_kwargs: dict | None = None):
    """The app's `--bench-janus MODEL` / `--bench-emu3 CHAT GEN` system (`checkpoints`), as `uae-hf bench --system
    NAME` would make it (loaded when first picked; Emu3 at the app's --height and --width when given)."""
    from .app import BenchSystem
    from .metrics.round_trip_bench import system_label, system_report

    system_args = argparse.Namespace(**{**vars(args), "system": name})
    if name == "emu3":
        system_args.encoder, system_args.model = checkpoints
    else:
        system_args.model = checkpoints
    settings = _token_system_settings(system_args)
    if call_kwargs is None:
        call_kwargs = {key: value for key, value in _token_system_kwargs(system_args).items()
                       if name == "emu3" and key in ("height", "width")}
    return BenchSystem(label or system_label(system_report(settings)), lambda: _load_token_system(system_args),
                       settings, call_kwargs)


def _check_app(args) -> None:
    """Gradio, the backbones and the pipeline (a local one only, for `--write-space`), before any model loads."""
    if importlib.util.find_spec("gradio") is None:
        raise CommandLineError("app runs on Gradio: pip install 'uae-hf[app]'")
    if args.write_space and not args.pipeline:
        raise CommandLineError("--write-space needs --pipeline: the Hub repo (or a folder the Space holds) it runs")
    args.checkpoints = _backbone_checkpoints(args)
    if args.pipeline:
        args.pipeline_source = _pipeline_source(args, download=not args.write_space)
    elif args.encoder:
        raise CommandLineError("--encoder is for a text-to-image --pipeline; without --pipeline the app runs the tiny "
                               "twins, which have their own encoder")
    if args.bench_emu3:
        _check_emu3_size(args, "--bench-emu3")
    for flag, folders in (("--bench-janus", [args.bench_janus] if args.bench_janus else []),
                          ("--bench-emu3", args.bench_emu3 or [])):
        for folder in folders:
            if args.write_space and Path(folder).exists():
                raise CommandLineError(f"{flag} {folder} is a local folder, which a Space does not hold: pass its Hub "
                                       "id")
            _check_model_folder(f"{flag} {folder}", folder, "config.json", "a model folder")


def _cmd_app(args) -> None:
    """`uae-hf app`: the Gradio app of `uae_hf.app`, or with `--write-space` the Space that runs it."""
    from .app import build_app, write_space

    if args.write_space:
        flags = _without_options(args.argv[1:], ("--write-space", "--host", "--port", "--pipeline", "--encoder",
                                                 "--encoder-adapter", "--checkpoint"))
        try:  # local folders are copied into the Space
            space = write_space(args.write_space, args.pipeline, flags, args.encoder, args.encoder_adapter,
                                _backbone_checkpoints(args))
        except ValueError as error:
            raise CommandLineError(str(error)) from None
        print(f"wrote a Space to {space}")
        return
    app = _app_round_trips(args)
    defaults = {"steps": args.num_inference_steps, "guidance": _guidance_scale(args),
                "temperature": args.temperature, "max_tokens": args.max_new_tokens, "seed": args.seed}
    build_app(app, defaults).queue().launch(server_name=args.host, server_port=args.port, show_error=True)


# `uae_hf.round_trip.ROUND_TRIP_SYSTEMS` (whose module loads torch); a test keeps them equal
BENCH_SYSTEMS = ("uae", "pair", "janus", "emu3")
# what a system's round trip takes besides the references: the flags that name its models
SYSTEM_FLAGS = {"uae": ("--pipeline", "--encoder-adapter", "--trust-remote-code"),
                "pair": ("--pipeline", "--encoder", "--encoder-adapter", "--trust-remote-code"), "janus": ("--model",),
                "emu3": ("--encoder", "--model")}
# the systems that draw image tokens with a --model (a transformers checkpoint), not a diffusers --pipeline
TOKEN_SYSTEMS = ("janus", "emu3")


def _given_flags(args, flags) -> list[str]:
    return [flag for flag in flags if getattr(args, flag[2:].replace("-", "_"))]


def _check_compare(args) -> None:
    """`--compare`: no other source, and runs that compare (`check_comparable`), before anything is written."""
    from .metrics.bench_comparison import ComparisonError, check_comparable

    given = _given_flags(args, ("--images-dir", "--dataset", "--pipeline", "--model", "--reconstructions",
                                "--encoder", "--system"))
    if given:
        raise CommandLineError(f"--compare reads finished runs: drop {' and '.join(given)}")
    _check_output_folder("--output-dir", args.output_dir)
    try:
        check_comparable(args.compare)
    except ComparisonError as error:
        raise CommandLineError(f"--compare: {error}") from None


def _check_system(args) -> None:
    """`--system` (default: pair with `--encoder`, else uae) and the flags it takes."""
    args.system = args.system or ("pair" if args.encoder else "uae")
    others = _given_flags(args, sorted({flag for flags in SYSTEM_FLAGS.values() for flag in flags}
                                       - set(SYSTEM_FLAGS[args.system])))
    if args.system == "uae" and args.encoder:
        raise CommandLineError("--encoder pairs a chat VLM with a text-to-image --pipeline: that is --system pair")
    if args.system == "pair" and args.pipeline and not args.encoder:
        raise CommandLineError("--system pair captions with --encoder (a chat VLM folder or Hub id, e.g. "
                               "Qwen/Qwen2.5-VL-3B-Instruct): pass it")
    if others:
        raise CommandLineError(f"--system {args.system} takes {' and '.join(SYSTEM_FLAGS[args.system])}, not "
                               f"{' and '.join(others)}")
    if args.system == "janus":
        fixed = _given_flags(args, ("--height", "--width", "--conditioning-mode"))
        if fixed:
            raise CommandLineError(f"--system janus draws at its checkpoint's own size, from the caption as text: "
                                   f"drop {' and '.join(fixed)}")
    if args.system == "emu3":
        _check_emu3(args)
    if args.system in TOKEN_SYSTEMS and args.model:
        _check_model_folder(f"--model {args.model}", args.model, "config.json", "a model folder")


def _check_emu3_size(args, who: str) -> None:
    """`--height`/`--width` for the Emu3 system `who` names: both or neither, multiples of Emu3's 8 pixels a token."""
    if bool(args.height) != bool(args.width):
        raise CommandLineError(f"{who} draws at --height and --width together, or at Emu3-Gen's 720 x 720: pass both "
                               "or neither")
    if args.height and (args.height % 8 or args.width % 8):
        raise CommandLineError(f"{who} draws 8 x 8 pixels per image token: --height {args.height} --width "
                               f"{args.width} must be multiples of 8")


def _check_emu3(args) -> None:
    """`--system emu3`: the Chat checkpoint (`--encoder`) with the Gen one (`--model`), at a size Emu3 draws."""
    if args.conditioning_mode:
        raise CommandLineError("--system emu3 draws from the caption as text: drop --conditioning-mode")
    if bool(args.encoder) != bool(args.model):
        given, missing = ("--encoder", "--model") if args.encoder else ("--model", "--encoder")
        raise CommandLineError(f"--system emu3 captions with --encoder (Emu3's Chat checkpoint, e.g. "
                               f"BAAI/Emu3-Chat-hf) and draws with --model (its Gen checkpoint, e.g. "
                               f"BAAI/Emu3-Gen-hf): {given} was given, pass {missing} too")
    _check_emu3_size(args, "--system emu3")
    if args.encoder:
        _check_model_folder(f"--encoder {args.encoder}", args.encoder, "config.json", "a model folder")


def _check_bench(args) -> None:
    """Every bench argument that needs no model: the sources, the backbones, the system and its models, the pairing
    of `--reconstructions` with `--images-dir`; with `--compare`, the runs."""
    from .metrics.round_trip_bench import no_pair_message, pairing_summary, references_from_folder

    if args.compare:
        _check_compare(args)
        return
    _check_system(args)
    if bool(args.images_dir) == bool(args.dataset):
        raise CommandLineError("pass exactly one of --images-dir or --dataset")
    if args.images_dir and Path(args.images_dir).is_file():
        raise CommandLineError(f"--images-dir {args.images_dir} is a file, not a folder: pass the folder that holds "
                               "the reference images")
    round_trip = "--model" if args.system in TOKEN_SYSTEMS else "--pipeline"
    if not (args.pipeline or args.model) and not args.reconstructions:
        raise CommandLineError(f"neither {round_trip} (round trip) nor --reconstructions (score only) was given: pass "
                               "one of them (not both)")
    if (args.pipeline or args.model) and args.reconstructions:
        raise CommandLineError(f"both {round_trip} and --reconstructions were given: pass one of them (not both)")
    if args.reconstructions and not Path(args.reconstructions).is_dir():
        state = "is a file, not a folder" if Path(args.reconstructions).exists() else "does not exist"
        raise CommandLineError(f"--reconstructions {args.reconstructions} {state}")
    if args.encoder and not args.pipeline and args.system != "emu3":
        raise CommandLineError("--encoder is for a text-to-image --pipeline (SD3, FLUX.1, ...): drop it, or pass the "
                               "--pipeline")
    _check_output_folder("--output-dir", args.output_dir)
    args.checkpoints = _backbone_checkpoints(args)
    if args.protocol == "official" and args.backbone_dtype != "float32":
        raise CommandLineError("--protocol official sets the backbones' precision as the official scorer does "
                               "(float32; LongCLIP float16 on CUDA): drop --backbone-dtype")
    args.references = None  # a --dataset's are read once its library has loaded
    if args.images_dir:
        try:
            every_reference = references_from_folder(args.images_dir, args.protocol)
        except ValueError as error:
            raise CommandLineError(f"--images-dir: {error}") from error
        args.references = every_reference[: args.limit] if args.limit else every_reference
        if args.reconstructions:
            paired, unmatched = pairing_summary(args.references, args.reconstructions, args.protocol)
            if not paired:
                message = no_pair_message(args.references, args.reconstructions, unmatched)
                raise CommandLineError(f"--reconstructions: {message}")
            # named: the images that pair with no reference at all (not those of references beyond --limit)
            _, unmatched = pairing_summary(every_reference, args.reconstructions, args.protocol)
            if unmatched:
                names = ", ".join(path.relative_to(args.reconstructions).as_posix() for path in unmatched)
                print(f"uae-hf: {len(unmatched)} reconstruction(s) match no reference in --images-dir, not scored: "
                      f"{names}", file=sys.stderr)
    args.pipeline_source = _pipeline_source(args) if args.pipeline else None


def _token_system_settings(args) -> dict:
    """What identifies the `--system janus` / `emu3` round trip `_load_token_system` will make (for `bench`)."""
    device = _device(args)
    dtype = _torch_dtype(args, device)
    encoder = {}
    if args.system == "emu3":
        encoder["encoder"], encoder["encoder_fingerprint"] = _local_fingerprint(args.encoder)
    model, fingerprint = _local_fingerprint(args.model)
    return {"system": args.system, **encoder, "model": model, "model_fingerprint": fingerprint,
            "dtype": str(dtype).removeprefix("torch.") if dtype else "as stored", "device": device}


def _token_system_kwargs(args) -> dict:
    """The round trip's settings for `--system janus` / `emu3`: caption sampling as for every system; image sampling
    the checkpoint's own (Janus-Pro: CFG 5, temperature 1; Emu3-Gen: CFG 3, top-k 2048, 720 x 720) unless
    `--guidance-scale` (or, for Emu3, `--height` and `--width`) say otherwise."""
    kwargs = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "do_sample": args.temperature > 0}
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
    if args.height:
        kwargs.update(height=args.height, width=args.width)
    return kwargs


def _load_token_system(args):
    device = _device(args)
    dtype = _torch_dtype(args, device)
    if args.system == "emu3":
        from .emu3_round_trip import Emu3RoundTrip

        return Emu3RoundTrip.from_pretrained(args.encoder, args.model, torch_dtype=dtype).to(device)
    from .janus_round_trip import JanusRoundTrip

    return JanusRoundTrip.from_pretrained(args.model, torch_dtype=dtype).to(device)


def _cmd_bench(args) -> None:
    from .metrics.round_trip_bench import (
        ResumeError,
        bench_settings,
        prepare_round_trip_dir,
        references_from_dataset,
        run_bench,
    )
    from .rewards.similarity import BackboneUnavailableError

    if args.compare:
        from .metrics.bench_comparison import compare_runs

        compare_runs(args.compare, args.output_dir)
        print(Path(args.output_dir, "comparison.md").read_text())
        print(f"wrote comparison.md, comparison.json and comparison_grid.png to {args.output_dir}")
        return
    references = args.references
    if references is None:
        try:
            references = references_from_dataset(args.dataset, args.split, args.image_column)
        except ValueError as error:
            raise CommandLineError(str(error)) from error
        references = references[: args.limit] if args.limit else references
    pipeline, pipeline_settings, call_kwargs = None, None, {}
    try:
        if args.pipeline or args.model:
            tokens = args.system in TOKEN_SYSTEMS
            pipeline_settings = _token_system_settings(args) if tokens else _pipeline_settings(args,
                                                                                                 args.pipeline_source)
            call_kwargs = _token_system_kwargs(args) if tokens else _generate_kwargs(args)
            # a folder that cannot be resumed is refused before the pipeline loads (run_bench checks again)
            settings = bench_settings(references, pipeline_settings, seed=args.seed, **call_kwargs)
            prepare_round_trip_dir(args.output_dir, settings, overwrite=args.overwrite)
            pipeline = _load_token_system(args) if tokens else _load_pipeline(args, args.pipeline_source)
        report = run_bench(
            references, args.output_dir, pipeline=pipeline, reconstructions_dir=args.reconstructions,
            config_name=args.backbones, checkpoints=args.checkpoints, device=_device(args), dtype=args.backbone_dtype,
            batch_size=args.batch_size, seed=args.seed, protocol=args.protocol, pipeline_settings=pipeline_settings,
            **call_kwargs,
        )
    except ResumeError as error:
        made = (f"with other settings: {'; '.join(error.differences)}" if error.differences else
                "by a run that did not record its settings")
        raise CommandLineError(f"--output-dir {args.output_dir} holds {error.reusable} reconstruction(s) made {made}. "
                               "Pass --overwrite to delete them and start over, or choose another --output-dir") \
            from None
    except BackboneUnavailableError as error:
        download = "" if error.reason == "no such folder" else f" (e.g. from `hf download {error.checkpoint} " \
            "--local-dir PATH`)"
        raise CommandLineError(f"cannot load the {error.backbone} backbone ({error.checkpoint}): {error.reason}. "
                               f"Point it at a local copy with --checkpoint {error.backbone}=PATH{download}") from error
    print(Path(args.output_dir, "scores.md").read_text())
    if report["reused"]:
        print(f"reused {report['reused']} reconstruction(s) from an earlier run in {args.output_dir} with the same "
              "settings (--overwrite starts over)")
    if report["skipped"]:
        print(f"skipped {len(report['skipped'])} image(s): see scores.json")


def _add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' loading bars and warnings, and a failure's traceback")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="uae-hf", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny-models", help="write the offline tiny twins of every model")
    tiny.add_argument("output_dir", help="folder to write encoder/, encoders/{qwen3_vl,gemma3}/, decoder/, "
                      "decoders/{flux1,flux2_klein,qwen_image}/, projector/, janus/, emu3/{chat,gen}/ and backbones/ "
                      "into")
    tiny.add_argument("--no-t5", action="store_true", help="build the decoder without its optional T5 encoder")
    _add_verbose_argument(tiny)
    tiny.set_defaults(func=_cmd_tiny_models, check=_check_tiny_models)

    rec = commands.add_parser("reconstruct", help="image → caption → image with a saved UAE pipeline")
    rec.add_argument("images", nargs="+", help="image files")
    rec.add_argument("--pipeline", required=True, help="pipeline folder or Hub repo")
    rec.add_argument("--output-dir", required=True, help="where to write reconstructions, captions.jsonl, grid.png "
                     "(reconstructions/<stem>.png; <file name>.png for images that share a stem)")
    _add_generation_arguments(rec, steps=40, tokens=512)
    _add_verbose_argument(rec)
    rec.set_defaults(func=_cmd_reconstruct, check=_check_reconstruct)

    bench = commands.add_parser("bench", help="Unified-Bench: round trip a set of images, then score and report")
    source = bench.add_argument_group("reference images (one of)")
    source.add_argument("--images-dir", help="a folder of reference images")
    source.add_argument("--dataset", help="a datasets id or local folder with an image column")
    bench.add_argument("--split", default="test", help="dataset split")
    bench.add_argument("--image-column", default="image", help="dataset image column")
    bench.add_argument("--system", choices=BENCH_SYSTEMS, default=None,
                       help="the round-trip system: uae (a UAE --pipeline), pair (--encoder, a chat VLM, captions; a "
                       "text-to-image --pipeline draws), janus (one Janus / Janus-Pro --model does both), emu3 "
                       "(Emu3's Chat checkpoint, --encoder, captions; its Gen checkpoint, --model, draws) (default: "
                       "pair with --encoder, else uae)")
    bench.add_argument("--pipeline", help="pipeline folder or Hub repo to round-trip with")
    bench.add_argument("--model", default=None,
                       help="with --system janus: the JanusForConditionalGeneration checkpoint (folder or Hub id, e.g. "
                       "deepseek-community/Janus-Pro-7B); with --system emu3: the Gen checkpoint (BAAI/Emu3-Gen-hf)")
    bench.add_argument("--compare", nargs="+", default=None, metavar="RUN_DIR",
                       help="compare finished bench runs (same references, backbones and protocol): write "
                       "comparison.md, comparison.json and comparison_grid.png to --output-dir")
    bench.add_argument("--reconstructions", help="score this folder of reconstructions instead (names match the "
                       "references, optionally with a recon_ prefix)")
    bench.add_argument("--output-dir", required=True, help="where reconstructions and reports go; a rerun with the "
                       "same settings resumes (settings.json says which)")
    bench.add_argument("--overwrite", action="store_true", help="delete the --output-dir's earlier reconstructions "
                       "and start over (needed to rerun with other settings)")
    bench.add_argument("--backbones", default="default", help='"default" (the paper\'s four) or e.g. "clip+dinov2"')
    bench.add_argument("--checkpoint", action="append", default=[], metavar="BACKBONE=PATH",
                       help="replace a backbone's checkpoint, e.g. a local copy (repeatable)")
    bench.add_argument("--backbone-dtype", choices=DTYPES[1:], default="float32",
                       help="dtype of the scoring backbones (float32, as the official scorer; --dtype sets the pipeline's)")
    bench.add_argument("--protocol", choices=("default", "official"), default="default",
                       help="default: batched, references cached; official: as Unified-Bench's Score_i2i.py (one pair "
                       "at a time, its image decoding, preprocessing and precision, references from subfolders too, "
                       "its pairing and JSON fields in scores.json)")
    bench.add_argument("--limit", type=positive_int, default=None, help="only the first N references (default: all)")
    _add_generation_arguments(bench, steps=40, tokens=512)
    _add_verbose_argument(bench)
    bench.set_defaults(func=_cmd_bench, check=_check_bench)

    convert = commands.add_parser("convert-release", help="the released UAE model → a self-loading pipeline folder")
    convert.add_argument("source", help="local copy of the release, or its Hub id (zhiyuanyan1/UAE)")
    convert.add_argument("destination", help="folder to write (loads with DiffusionPipeline.from_pretrained)")
    _add_model_arguments(convert, device=False)
    _add_verbose_argument(convert)
    convert.set_defaults(func=_cmd_convert_release, check=_check_convert_release)

    app = commands.add_parser("app", help="a Gradio app: round-trip uploaded images and score them with "
                              "Unified-Bench (pip install 'uae-hf[app]')")
    app.add_argument("--pipeline", default=None, help="pipeline folder or Hub repo (default: the offline tiny twins, "
                     "built into a temporary folder, scored with the twin backbones)")
    app.add_argument("--backbones", default="default", help='"default" (the paper\'s four) or e.g. "clip+dinov2"')
    app.add_argument("--checkpoint", action="append", default=[], metavar="BACKBONE=PATH",
                     help="replace a backbone's checkpoint, e.g. a local copy (repeatable)")
    app.add_argument("--backbone-dtype", choices=DTYPES[1:], default="float32", help="dtype of the scoring backbones")
    app.add_argument("--bench-janus", default=None, metavar="MODEL",
                     help="a Janus / Janus-Pro checkpoint the Unified-Bench tab can also round-trip with (as uae-hf "
                     "bench --system janus; loaded when first picked; with the tiny twins: the Janus twin)")
    app.add_argument("--bench-emu3", nargs=2, default=None, metavar=("CHAT", "GEN"),
                     help="Emu3's Chat and Gen checkpoints, which the Unified-Bench tab can also round-trip with (as "
                     "uae-hf bench --system emu3, at --height and --width when given; with the tiny twins: the Emu3 "
                     "twins at 64 x 64)")
    _add_generation_arguments(app, steps=28, tokens=128)
    app.add_argument("--host", default=None, help="address to listen on (default: GRADIO_SERVER_NAME, else 127.0.0.1; "
                     "0.0.0.0 for every interface)")
    app.add_argument("--port", type=positive_int, default=None,
                     help="port to listen on (default: GRADIO_SERVER_PORT, else 7860)")
    app.add_argument("--write-space", default=None, metavar="DIR",
                     help="write a Hugging Face Space (app.py, requirements.txt, README.md) that runs this app with "
                     "these flags into DIR, and exit")
    _add_verbose_argument(app)
    app.set_defaults(func=_cmd_app, check=_check_app)

    commands.add_parser(
        "train", help="train a UAE stage: uae-hf train --config recipe.yaml [--any_config_field value ...]",
        add_help=False,
    )

    demo = commands.add_parser(
        "demo", help="the whole UAE recipe from nothing on a built-in toy world, with a report (offline, CPU)"
    )
    demo.add_argument("--output-dir", default=None,
                      help="where models, stages and the report go (default: outputs/demo, with --quick outputs/demo-quick)")
    demo.add_argument("--quick", action="store_true",
                      help="the same path with tiny budgets that only check the plumbing (32 s measured on a 2-core CPU)")
    demo.add_argument("--overwrite", action="store_true",
                      help="retrain the stages in --output-dir that were made with other settings (else the demo refuses)")
    for name, kind, help_text in [
        ("seed", int, "seed of the world, models and stages"),
        ("pretrain_steps", positive_int, "decoder pre-training steps"),
        ("understanding_steps", positive_int, "stage 2 (GRPO) steps"),
        ("generation_steps", positive_int, "stage 3 Flow-GRPO steps (both of its runs)"),
        ("generation_nft_steps", positive_int, "stage 3 DiffusionNFT steps"),
        ("stage3_learning_rate", float, "learning rate of every stage-3 run (default 1e-3)"),
        ("generation_beta", float, "stage 3 Flow-GRPO KL weight (default 0: no KL)"),
        ("generation_nft_beta", float, "stage 3 DiffusionNFT beta of its implicit policies (default 1.0)"),
    ]:
        demo.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, help=help_text)
    demo.add_argument("--stage3-objective", default=None,
                      choices=["generation", "generation_cfg_free", "generation_nft"],
                      help="the stage-3 run whose DiT LoRA the final pipeline keeps (default generation_nft)")
    demo.add_argument("--seeds", type=positive_int, default=1,
                      help="run the whole demo for this many seeds (from --seed), each in OUTPUT_DIR/seed-N, and "
                      "summarise mean and range over seeds in OUTPUT_DIR/summary.md")
    _add_verbose_argument(demo)
    demo.set_defaults(func=_cmd_demo)
    return parser


TRAINING_BATCH_COUNTS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")


def check_training_counts(values) -> None:
    """`uae-hf train`'s batch sizes and step counts (attributes of `values`; an absent one passes) that would train
    nothing, or fail deep inside a trainer or its configuration, refused by flag (`CommandLineError`). A
    negative `max_steps` trains `num_train_epochs` epochs, as in transformers."""
    for name in TRAINING_BATCH_COUNTS:
        value = getattr(values, name, 1)
        if value < 1:
            raise CommandLineError(f"--{name} {value:g}: pass a positive number")
    max_steps, epochs = getattr(values, "max_steps", -1), getattr(values, "num_train_epochs", 1)
    if max_steps == 0:
        raise CommandLineError("--max_steps 0 trains nothing: pass a positive number of steps, or -1 (the default) to "
                               "train for --num_train_epochs")
    if max_steps < 0 and epochs <= 0:
        raise CommandLineError(f"--num_train_epochs {epochs:g} trains nothing: pass a positive number of epochs, or "
                               "--max_steps N")


def _given_training_counts(argv: list[str]) -> argparse.Namespace:
    """The `check_training_counts` values that the `--config` recipe and the flags set (a flag wins over the recipe),
    read without TRL, whose import takes seconds; values not set, or not numbers, are left out (the full parse
    reports those)."""
    parser = _Parser(prog="uae-hf train", add_help=False)
    parser.add_argument("--config")
    names = (*TRAINING_BATCH_COUNTS, "max_steps", "num_train_epochs")
    for name in names:  # both spellings, as transformers' HfArgumentParser accepts them
        parser.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name)
    flags, _ = parser.parse_known_args(argv)
    values = {}
    if flags.config:
        import yaml

        with contextlib.suppress(OSError, yaml.YAMLError):
            recipe = yaml.safe_load(Path(flags.config).read_text())
            values = {name: recipe[name] for name in names if isinstance(recipe, dict) and name in recipe}
    values |= {name: getattr(flags, name) for name in names if getattr(flags, name) is not None}
    numbers = {}
    for name, value in values.items():
        with contextlib.suppress(TypeError, ValueError):
            numbers[name] = float(value)
    return argparse.Namespace(**numbers)


def _run(argv: list[str], verbose: bool) -> None:
    if argv[:1] == ["train"]:  # TRL-style: every UnifiedGRPOConfig field from --config YAML or --flags
        check_training_counts(_given_training_counts(argv[1:]))  # before TRL and the models load
        with _quiet_libraries(verbose, data=True):
            from .trainer.train_script import main as train_main

            train_main([arg for arg in argv[1:] if arg != "--verbose"])
        return
    args = build_parser().parse_args(argv)
    args.argv = argv
    check = getattr(args, "check", None)
    if check is not None:  # every argument that needs no model, before the libraries load (may store on args)
        with _quiet_hub(args.verbose):
            check(args)
    with _quiet_libraries(args.verbose, data=args.command in ("bench", "demo")):
        args.func(args)


def main(argv: list[str] | None = None) -> None:
    """Run `uae-hf`. A mistake the user can act on ends as `uae-hf: <message>` on stderr and exit status 2 (raised
    as `CommandLineError`); with `--verbose`, with the traceback of its cause."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    try:
        _run(argv, verbose)
    except CommandLineError as error:
        if verbose and error.__cause__ is not None:
            traceback.print_exception(error.__cause__)
        print(f"uae-hf: {error}", file=sys.stderr)
        raise
    except (OSError, ValueError) as error:  # bad input that reached a library: its message, without the traceback
        if verbose:
            raise
        message = str(error).strip() or type(error).__name__
        print(f"uae-hf: {message} (--verbose shows the traceback)", file=sys.stderr)
        raise CommandLineError(message) from error


if __name__ == "__main__":
    main(sys.argv[1:])
