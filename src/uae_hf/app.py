"""The UAE round trip and Unified-Bench in a Gradio app: `uae-hf app`, or a Hugging Face Space (`write_space`).

Tab "Round trip": an uploaded image (or a bundled sample photo), read as `uae-hf reconstruct` reads files
(`load_image`), beside its reconstruction, the caption between them (its length in tokens, whether the length limit
cut it), the per-backbone scores and every setting used. Tab "Unified-Bench": uploaded references round-tripped by the
app's pipeline or another round-trip system picked there (`BenchSystem`: Janus, Emu3), or uploaded reconstructions
paired with them by name, and scored as `uae-hf bench` scores them, with its table and grid.
Every score in the app is a cosine similarity ×100, as the paper's tables and Unified-Bench's overall number.
"""

import importlib.metadata
import importlib.resources
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image

from .metrics import metric_path

TITLE = "UAE: image → caption → image"
SPACE_SDK = "gradio"


def sample_photo_files(folder: str | Path) -> list[Path]:
    """The bundled scikit-image photos as PNG files in `folder` (the app's examples, no download)."""
    from .sample_data import skimage_photos

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for row in skimage_photos(size=256):
        path = folder / f"{row['name']}.png"
        row["image"].save(path)
        paths.append(path)
    return paths


@dataclass
class BenchSystem:
    """A round-trip system the bench tab can pick besides the app's pipeline, loaded when first picked, then kept.

    Args:
        label (`str`): its name in the picker.
        load (`Callable`): returns the system (`uae_hf.round_trip.RoundTripSystem`, e.g. `JanusRoundTrip`), on its
            device.
        settings (`dict`): what identifies it in `settings.json` and the report (`system` and its checkpoints, as
            `uae-hf bench` records them).
        call_kwargs (`dict`): passed to each of its calls besides the tab's caption and guidance settings (e.g.
            Emu3's `height` and `width`).
        takes_steps (`bool`, defaults to `False`): whether it takes `num_inference_steps` (a diffusion decoder).
    """

    label: str
    load: Callable[[], object]
    settings: dict
    call_kwargs: dict = field(default_factory=dict)
    takes_steps: bool = False


class RoundTripApp:
    """What the app runs: a UAE pipeline and the Unified-Bench metric, with the settings each run records.

    Args:
        pipeline: a `UAEReconstructionPipeline` (on its device, in its dtype), or a `PairedRoundTrip`.
        source (`str`): how the settings name the pipeline (a folder or Hub id, or "tiny twins").
        config_name (`str`, defaults to `"default"`), checkpoints (`dict`, *optional*), device (`str`), backbone_dtype
            (`str`): the scoring backbones, as `evaluate.load("unified_bench", ...)` takes them; loaded here, so a
            backbone that cannot load fails before the app starts.
        batch_size (`int`, defaults to 4): images per pipeline call and per backbone pass in the bench tab.
        bench_systems (`Sequence[BenchSystem]`, *optional*): other systems the bench tab can pick (the app's pipeline
            is its first choice, `self.systems`).
        **call_kwargs: passed to every pipeline call (`height`, `width`, `conditioning_mode`).
    """

    def __init__(self, pipeline, source: str, config_name: str = "default", checkpoints: dict[str, str] | None = None,
                 device: str = "cpu", backbone_dtype: str = "float32", batch_size: int = 4,
                 bench_systems: Sequence[BenchSystem] = (), **call_kwargs):
        import evaluate

        from .metrics.round_trip_bench import system_label, system_report
        from .round_trip import system_of

        self.pipeline, self.source = pipeline, source
        self.scoring = {"config_name": config_name, "checkpoints": checkpoints or {}, "device": device,
                        "dtype": backbone_dtype}
        self.metric = evaluate.load(metric_path("unified_bench"), config_name, checkpoints=checkpoints,
                                    device=device, dtype=backbone_dtype)
        self.batch_size, self.fixed_call_kwargs = batch_size, call_kwargs
        pipeline.set_progress_bar_config(disable=True)
        name, named = system_of(pipeline)
        own = {"system": name, **named, "pipeline": source}  # the pipeline as the app names it
        own_system = BenchSystem(system_label(system_report(own)), lambda: pipeline, own, call_kwargs, True)
        self.systems = {system.label: system for system in (own_system, *bench_systems)}
        if len(self.systems) <= len(bench_systems):
            raise ValueError("two bench systems share a label: give each its own")
        self._loaded = {}  # label → system, once picked

    def call_kwargs(self, steps: int, guidance: float, temperature: float, max_tokens: int) -> dict:
        if int(steps) < 1 or int(max_tokens) < 1:
            raise ValueError("steps and max tokens must be at least 1")
        return {"num_inference_steps": int(steps), "guidance_scale": float(guidance), "max_new_tokens": int(max_tokens),
                "temperature": float(temperature), "do_sample": float(temperature) > 0}

    def settings(self, seed: int, **call_kwargs) -> dict:
        return {"pipeline": self.source, "seed": int(seed), **call_kwargs, "device": str(self.pipeline.device),
                "dtype": str(self.pipeline.dtype).removeprefix("torch."), "scoring": self.scoring}

    def round_trip(self, image, steps: int, guidance: float, temperature: float, max_tokens: int, seed: int) -> dict:
        """One image's round trip, as image 0 of `uae-hf reconstruct` (`seed` draws its caption and its noise), on
        `image` read as the CLI reads it (`load_image`: a file as uploaded, or a PIL image): the reconstruction, the
        caption with the number of tokens the encoder drew for it, per-backbone scores ×100 and the settings. An
        unreadable file is a `ValueError` that names it."""
        import torch
        from transformers import StoppingCriteriaList

        from .pipelines.uae_reconstruction.captioning import _derived_generators

        kwargs = {**self.call_kwargs(steps, guidance, temperature, max_tokens), **self.fixed_call_kwargs}
        original = _read_upload(image)
        generator = torch.Generator().manual_seed(int(seed))
        # the pipeline's call in its two steps, to count what the encoder draws: the caption, then the decoder
        sampling = ("max_new_tokens", "do_sample", "temperature")
        drawn = _DrawnTokens()
        caption = self.pipeline.caption([original], **{key: kwargs[key] for key in sampling},
                                        generator=_derived_generators([generator]),
                                        stopping_criteria=StoppingCriteriaList([drawn]))[0]
        out = self.pipeline.generate([caption], generator=[generator],
                                     **{key: value for key, value in kwargs.items() if key not in sampling})
        eos = self.pipeline.vlm.generation_config.eos_token_id
        ended = bool(drawn.tokens) and drawn.tokens[-1] in ({eos} if isinstance(eos, int) else set(eos or ()))
        scores = self.metric.compute(predictions=out.images[:1], references=[original], return_per_image=True)
        per_backbone = {name: 100 * value for name, value in scores["per_image"][0].items()}
        return {
            "reconstruction": out.images[0],
            "caption": caption,
            "tokens": len(drawn.tokens) - ended,  # the end-of-text token not counted
            "cut_by_length_limit": not ended and len(drawn.tokens) >= kwargs["max_new_tokens"],
            "cut_by_text_encoder": bool(out.truncated[0]) if out.truncated else False,
            "scores": {**per_backbone, "overall": scores["unified_bench"]},
            "settings": self.settings(seed, **kwargs),
        }

    def bench(self, reference_files: list[str], reconstruction_files: list[str] | None, protocol: str, steps: int,
              guidance: float, temperature: float, max_tokens: int, seed: int, output_dir: str | Path,
              system: str | None = None) -> dict:
        """Unified-Bench on uploaded files (`run_bench`'s `scores.json`, written with `grid.png` to `output_dir`):
        the references are round-tripped by `system` (a label of `self.systems`; default: the app's pipeline), or
        paired by name with `reconstruction_files` when given."""
        from .metrics.round_trip_bench import references_from_folder, run_bench

        picked = self.systems.get(system or next(iter(self.systems)))
        if picked is None:
            raise ValueError(f"no round-trip system {system!r} in this app: pick one of {', '.join(self.systems)}")
        if not reference_files:
            raise ValueError("upload the reference images first")
        output_dir = Path(output_dir)
        references_dir = _copy_files(reference_files, output_dir / "references")
        references = references_from_folder(references_dir, protocol)
        scoring = {key: self.scoring[key] for key in ("config_name", "checkpoints", "device")}
        scoring["batch_size"] = self.batch_size
        scoring["dtype"] = self.scoring["dtype"] if protocol == "default" else "float32"
        if reconstruction_files:
            return run_bench(references, output_dir / "report",
                             reconstructions_dir=_copy_files(reconstruction_files, output_dir / "reconstructions"),
                             protocol=protocol, **scoring)
        kwargs = {**self.call_kwargs(steps, guidance, temperature, max_tokens), **picked.call_kwargs}
        if not picked.takes_steps:
            del kwargs["num_inference_steps"]
        if picked.label not in self._loaded:
            self._loaded[picked.label] = picked.load()
        return run_bench(references, output_dir / "report", pipeline=self._loaded[picked.label], seed=int(seed),
                         protocol=protocol, pipeline_settings=picked.settings, **scoring, **kwargs)


def _read_upload(image) -> PIL.Image.Image:
    """An upload (its file, as the browser sent it) or a PIL image as 8-bit RGB, read as the CLI reads images; a file
    that is no image, or a damaged one, is a one-line `ValueError` naming it."""
    from .images import load_image

    if not isinstance(image, (str, Path)):
        return load_image(image, "the image")
    name = Path(image).name
    try:
        return load_image(image, name)
    except ValueError as error:
        if isinstance(error.__cause__, PIL.Image.DecompressionBombError) or error.__cause__ is None:
            raise  # a readable file that is too large or holds values out of range: its own message says why
        raise ValueError(f"Cannot read {name}: it is not an image file, or a damaged one. Upload a PNG, JPEG, "
                         "WebP, BMP, TIFF or GIF file.") from error


class _DrawnTokens:
    """A stopping criterion for `generate` that stops nothing: it keeps the tokens drawn for one caption (the count the
    max-new-tokens limit applies to, which a caption decoded and tokenized again need not have)."""

    def __init__(self):
        self.start, self.tokens = None, []

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        if self.start is None:
            self.start = input_ids.shape[-1] - 1
        self.tokens = input_ids[0, self.start :].tolist()
        return torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)


def _copy_files(files: list[str], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copyfile(file, folder / Path(file).name)
    return folder


def _caption_note(result: dict) -> str:
    notes = [f"{result['tokens']} tokens"]
    if result["cut_by_length_limit"]:
        notes.append(f"cut by the max-tokens limit ({result['settings']['max_new_tokens']}: raise it for the whole "
                     "caption)")
    if result["cut_by_text_encoder"]:
        notes.append("longer than the decoder's text encoder reads (it used the start)")
    return "Caption: " + "; ".join(notes)


def _scores_table(scores: dict) -> list[list]:
    return [[name, round(value, 2)] for name, value in scores.items()]


def _bench_table(report: dict) -> list[list]:
    rows = [[name, round(100 * s["mean"], 2), round(100 * s["min"], 2), round(100 * s["max"], 2)]
            for name, s in report["backbones"].items()]
    if report["unified_bench"] is not None:
        rows.append(["overall (Unified-Bench)", round(report["unified_bench"], 2), None, None])
    return rows


def _bench_summary(report: dict) -> str:
    """The bench tab's one-line result, on the app's scale (`scores.md` gives the backbones' cosines unscaled)."""
    protocol = f"{report['protocol']} protocol"
    if report["unified_bench"] is None:
        line = f"**Unified-Bench: no pair scored** ({protocol})"
    else:
        line = f"**Unified-Bench: {report['unified_bench']:.2f}** over {report['num_images']} images ({protocol})"
    if report["skipped"]:
        line += "\n\nSkipped " + "; ".join(f"{item['image']}: {item['error']}" for item in report["skipped"])
    return line


def _bench_grid(report: dict, references_dir: Path, path: Path, size: int = 8) -> str | None:
    """`grid.png` drawn again with each pair's score ×100 (`uae-hf bench` writes the cosine); `None` without a pair."""
    from .images import load_image, pil_rgb, to_rgb
    from .visualization import reconstruction_grid

    rows = report["per_image"][:size]
    if not rows:
        return None
    rgb = pil_rgb if report["protocol"] == "official" else to_rgb
    reconstruction_grid(
        [load_image(references_dir / row["file"], row["file"], rgb) for row in rows],
        [load_image(row["reconstruction"], row["reconstruction"], rgb) for row in rows],
        [row.get("caption", "") for row in rows], names=[row["file"] for row in rows],
        scores=[100 * row["overall"] for row in rows],
    ).save(path)
    return str(path)


def build_app(app: RoundTripApp, defaults: dict | None = None, examples_dir: str | Path | None = None):
    """The Gradio `Blocks` of `app`: launch it (`.launch()`), or mount it in a FastAPI server.

    Args:
        app (`RoundTripApp`): the pipeline and metric to run.
        defaults (`dict`, *optional*): the controls' starting values (`steps`, `guidance`, `temperature`,
            `max_tokens`, `seed`).
        examples_dir (`str` or `Path`, *optional*): where the sample photos are written (default: a temporary folder).
    """
    import gradio as gr

    defaults = {"steps": 28, "guidance": 5.0, "temperature": 0.7, "max_tokens": 128, "seed": 0, **(defaults or {})}
    examples = sample_photo_files(examples_dir or tempfile.mkdtemp(prefix="uae-app-photos-"))

    def controls():
        with gr.Row():
            steps = gr.Slider(1, 100, value=defaults["steps"], step=1, label="Decoder steps")
            guidance = gr.Slider(0, 15, value=defaults["guidance"], step=0.5, label="CFG scale (1: none)")
        with gr.Row():
            temperature = gr.Slider(0, 2, value=defaults["temperature"], step=0.05,
                                    label="Caption temperature (0: greedy)")
            max_tokens = gr.Slider(1, 1024, value=defaults["max_tokens"], step=1, label="Caption max tokens")
            seed = gr.Number(value=defaults["seed"], precision=0, label="Seed")
        return [steps, guidance, temperature, max_tokens, seed]

    def run_round_trip(image, steps, guidance, temperature, max_tokens, seed, progress=gr.Progress()):
        # the inputs as sent (preprocess=False): the upload is its file, which `round_trip` reads as the CLI reads
        # files, and says in one line if it cannot (gr.Image would decode it first, with Gradio's generic error)
        if not (image or {}).get("path"):
            raise gr.Error("Upload an image or pick a sample photo first.", print_exception=False)
        progress(0, desc="captioning, then drawing")
        try:
            result = app.round_trip(image["path"], steps, guidance, temperature, max_tokens, seed)
        except ValueError as error:
            raise gr.Error(str(error), print_exception=False) from error
        return (result["reconstruction"], result["caption"], _caption_note(result), _scores_table(result["scores"]),
                result["settings"])

    def run_bench(references, reconstructions, system, protocol, steps, guidance, temperature, max_tokens, seed,
                  progress=gr.Progress(track_tqdm=True)):
        output_dir = tempfile.mkdtemp(prefix="uae-app-bench-")
        try:
            report = app.bench(references, reconstructions, protocol, steps, guidance, temperature, max_tokens, seed,
                               output_dir, system)
        except ValueError as error:
            raise gr.Error(str(error), print_exception=False) from error
        report_dir = Path(output_dir, "report")
        grid = _bench_grid(report, Path(output_dir, "references"), report_dir / "grid.png")
        return _bench_summary(report), _bench_table(report), grid, str(report_dir / "scores.json")

    with gr.Blocks(title=TITLE, analytics_enabled=False) as blocks:
        gr.Markdown(f"# {TITLE}\nThe encoder captions the image; the decoder redraws it from the caption alone; "
                    "Unified-Bench scores how close the redrawing is (cosine similarity ×100, per backbone).")
        with gr.Tab("Round trip"):
            with gr.Row():
                image = gr.Image(type="filepath", label="Original", sources=["upload", "clipboard"],
                                 elem_id="original")
                reconstruction = gr.Image(type="pil", label="Reconstruction", interactive=False,
                                          elem_id="reconstruction")
            caption = gr.Textbox(label="Caption", lines=3, interactive=False, elem_id="caption")
            caption_note = gr.Markdown(elem_id="caption-note")
            settings = controls()
            button = gr.Button("Round trip", variant="primary", elem_id="run-round-trip")
            scores = gr.Dataframe(headers=["backbone", "score ×100"], label="Scores", interactive=False,
                                  elem_id="scores")
            used = gr.JSON(label="Settings used", elem_id="settings")
            gr.Examples([[str(path)] for path in examples], inputs=[image], label="Sample photos (scikit-image)")
            button.click(run_round_trip, [image, *settings], [reconstruction, caption, caption_note, scores, used],
                         preprocess=False)
        with gr.Tab("Unified-Bench"):
            with gr.Row():
                references = gr.File(file_count="multiple", file_types=["image"], label="Reference images",
                                     elem_id="references")
                reconstructions = gr.File(file_count="multiple", file_types=["image"], elem_id="reconstructions",
                                          label="Reconstructions to score instead of a round trip (optional; "
                                          "named like the references, optionally recon_-prefixed)")
            system = gr.Dropdown(list(app.systems), value=next(iter(app.systems)), label="Round-trip system",
                                 info="what round-trips the references (decoder steps apply to diffusion decoders)",
                                 interactive=len(app.systems) > 1, elem_id="bench-system")
            protocol = gr.Radio(["default", "official"], value="default", label="Protocol",
                                info="official: as Unified-Bench's Score_i2i.py")
            bench_settings = controls()
            bench_button = gr.Button("Score", variant="primary", elem_id="run-bench")
            summary = gr.Markdown(elem_id="bench-summary")
            table = gr.Dataframe(headers=["backbone", "mean ×100", "min ×100", "max ×100"], interactive=False,
                                 label="Per backbone", elem_id="bench-table")
            grid = gr.Image(type="filepath", label="Originals | reconstructions", interactive=False,
                            elem_id="bench-grid")
            scores_file = gr.File(label="scores.json", elem_id="bench-scores")
            bench_button.click(run_bench, [references, reconstructions, system, protocol, *bench_settings],
                               [summary, table, grid, scores_file])
    return blocks


SPACE_APP = '''"""The UAE round trip and Unified-Bench for {pipeline} (written by uae_hf.app.write_space)."""

from pathlib import Path

from uae_hf.cli import main  # the copy of uae_hf beside this file

HERE = Path(__file__).parent  # what this Space holds is named from here, wherever it runs
main([{argv}])
'''


def space_requirements() -> list[str]:
    """What the Space's copy of uae_hf needs, as pip installs it from PyPI: this package's dependencies and its `app`
    extra's, with their version bounds."""
    from packaging.requirements import Requirement

    lines = []
    for text in importlib.metadata.requires("uae-hf") or ():
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": "app"}):
            extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
            line = f"{requirement.name}{extras}{requirement.specifier}"
            if line not in lines:
                lines.append(line)
    return lines


def _copy_package(folder: Path) -> None:
    """This uae_hf into `folder/uae_hf`: its package folder and the card templates installed as
    `uae_hf.model_cards` (from the repository's top-level `model_cards/`)."""
    target = folder / "uae_hf"
    shutil.rmtree(target, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(Path(__file__).parent, target, ignore=ignore)
    if not (target / "model_cards").is_dir():
        shutil.copytree(Path(str(importlib.resources.files("uae_hf.model_cards"))), target / "model_cards",
                        ignore=ignore)


def _space_source(source: str, folder: Path, name: str, flag: str) -> tuple[str, bool]:
    """`source` as the Space names it: a Hub id as it is, or a local folder copied to `folder/name` (returned
    relative to the Space, with `True`)."""
    local = Path(source).expanduser()
    if not local.exists():
        return source, False
    local, target = local.resolve(), (folder / name).resolve()
    if target != local:
        if target in local.parents or local in target.parents:
            raise ValueError(f"{flag} {source} and the Space's copy of it, {target}, overlap: write the Space to "
                             "another folder")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(local, target, ignore=shutil.ignore_patterns(".git", ".cache"))
    return name, True


def write_space(folder: str | Path, pipeline: str, app_args: list[str] | tuple[str, ...] = (),
                encoder: str | None = None, encoder_adapter: str | None = None,
                checkpoints: dict[str, str] | None = None, title: str = "UAE round trip") -> Path:
    """Write a Gradio Space into `folder` that runs `uae-hf app --pipeline PIPELINE *app_args` (with `--encoder`,
    `--encoder-adapter` and `--checkpoint BACKBONE=PATH` for `encoder`, `encoder_adapter` and `checkpoints`).

    The Space holds what it runs: each of these given as a local folder is copied into it (`pipeline/`, `encoder/`,
    `encoder_adapter/`, `backbones/<name>/`; a Hub id stays a Hub id), and so is this uae_hf package (`uae_hf/`,
    which `app.py` imports), whose dependencies `requirements.txt` lists as pip installs them from PyPI.
    `README.md` carries the Space's front matter. Upload it with
    `huggingface_hub.upload_folder(repo_id=..., repo_type="space", folder_path=folder)`.
    """
    import gradio
    from huggingface_hub import SpaceCard, SpaceCardData

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sources = [("--pipeline", "pipeline", None, pipeline), ("--encoder", "encoder", None, encoder),
               ("--encoder-adapter", "encoder_adapter", None, encoder_adapter)]
    sources += [("--checkpoint", f"backbones/{name}", name, path) for name, path in (checkpoints or {}).items()]
    argv, hub_ids = ["'app'"], []
    for flag, name, backbone, source in sources:
        if source is None:
            continue
        where, local = _space_source(str(source), folder, name, flag)
        prefix = f"{backbone}=" if backbone else ""
        copy = f"str(HERE / {where!r})"
        argv += [repr(flag), (f"{prefix!r} + {copy}" if prefix else copy) if local else repr(prefix + where)]
        hub_ids += [] if local else [where]
    argv += map(repr, map(str, app_args))
    _copy_package(folder)
    if pipeline not in hub_ids:
        pipeline = f"pipeline/ (a copy of {Path(pipeline).resolve().name})"
    (folder / "app.py").write_text(SPACE_APP.format(pipeline=pipeline, argv=", ".join(argv)))
    (folder / "requirements.txt").write_text("\n".join(space_requirements()) + "\n")
    data = SpaceCardData(title=title, sdk=SPACE_SDK, sdk_version=gradio.__version__, app_file="app.py",
                         models=hub_ids or None, tags=["uae", "uae_hf"])
    card = SpaceCard(f"---\n{data.to_yaml()}\n---\n\n# {title}\n\nImage → caption → image with `{pipeline}`, and "
                     "Unified-Bench on uploaded images. Run it locally with `pip install -r requirements.txt` and "
                     f"`python app.py` in this folder.\n\nSettings: `{json.dumps(list(map(str, app_args)))}`\n")
    card.save(folder / "README.md")
    return folder
