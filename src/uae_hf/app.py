"""The UAE round trip and Unified-Bench in a Gradio app: `uae-hf app`, or a Hugging Face Space (`write_space`).

Tab "Round trip": an uploaded image (or a bundled sample photo) beside its reconstruction, the caption between them
(its length in tokens, whether the length limit cut it), the per-backbone scores and every setting used. Tab
"Unified-Bench": uploaded references round-tripped (or uploaded reconstructions paired with them by name) and scored,
with the table and the grid that `uae-hf bench` writes.
"""

import json
import shutil
import tempfile
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


class RoundTripApp:
    """What the app runs: a UAE pipeline and the Unified-Bench metric, with the settings each run records.

    Args:
        pipeline: a `UAEReconstructionPipeline` (on its device, in its dtype).
        source (`str`): how the settings name the pipeline (a folder or Hub id, or "tiny twins").
        config_name (`str`, defaults to `"default"`), checkpoints (`dict`, *optional*), device (`str`), backbone_dtype
            (`str`): the scoring backbones, as `evaluate.load("unified_bench", ...)` takes them; loaded here, so a
            backbone that cannot load fails before the app starts.
        batch_size (`int`, defaults to 4): images per pipeline call and per backbone pass in the bench tab.
        **call_kwargs: passed to every pipeline call (`height`, `width`, `conditioning_mode`).
    """

    def __init__(self, pipeline, source: str, config_name: str = "default", checkpoints: dict[str, str] | None = None,
                 device: str = "cpu", backbone_dtype: str = "float32", batch_size: int = 4, **call_kwargs):
        import evaluate

        self.pipeline, self.source = pipeline, source
        self.scoring = {"config_name": config_name, "checkpoints": checkpoints or {}, "device": device,
                        "dtype": backbone_dtype}
        self.metric = evaluate.load(metric_path("unified_bench"), config_name, checkpoints=checkpoints,
                                    device=device, dtype=backbone_dtype)
        self.batch_size, self.fixed_call_kwargs = batch_size, call_kwargs
        pipeline.set_progress_bar_config(disable=True)

    def call_kwargs(self, steps: int, guidance: float, temperature: float, max_tokens: int) -> dict:
        if int(steps) < 1 or int(max_tokens) < 1:
            raise ValueError("steps and max tokens must be at least 1")
        return {"num_inference_steps": int(steps), "guidance_scale": float(guidance), "max_new_tokens": int(max_tokens),
                "temperature": float(temperature), "do_sample": float(temperature) > 0, **self.fixed_call_kwargs}

    def settings(self, seed: int, **call_kwargs) -> dict:
        return {"pipeline": self.source, "seed": int(seed), **call_kwargs, "device": str(self.pipeline.device),
                "dtype": str(self.pipeline.dtype).removeprefix("torch."), "scoring": self.scoring}

    def round_trip(self, image: PIL.Image.Image, steps: int, guidance: float, temperature: float, max_tokens: int,
                   seed: int) -> dict:
        """One image's round trip (`seed` draws its caption and its noise, as image 0 of `uae-hf reconstruct`):
        the reconstruction, the caption with its length, per-backbone scores ×100 and the settings."""
        import torch

        from .images import pil_rgb

        kwargs = self.call_kwargs(steps, guidance, temperature, max_tokens)
        original = pil_rgb(image, "the uploaded image")
        out = self.pipeline(image=[original], generator=[torch.Generator().manual_seed(int(seed))], **kwargs)
        caption = out.captions[0]
        tokens = len(self.pipeline.processor.tokenizer(caption, add_special_tokens=False).input_ids)
        scores = self.metric.compute(predictions=out.images[:1], references=[original], return_per_image=True)
        per_backbone = {name: 100 * value for name, value in scores["per_image"][0].items()}
        return {
            "reconstruction": out.images[0],
            "caption": caption,
            "tokens": tokens,
            "cut_by_length_limit": tokens >= kwargs["max_new_tokens"],
            "cut_by_text_encoder": bool(out.truncated[0]) if out.truncated else False,
            "scores": {**per_backbone, "overall": scores["unified_bench"]},
            "settings": self.settings(seed, **kwargs),
        }

    def bench(self, reference_files: list[str], reconstruction_files: list[str] | None, protocol: str, steps: int,
              guidance: float, temperature: float, max_tokens: int, seed: int, output_dir: str | Path) -> dict:
        """Unified-Bench on uploaded files (`run_bench`'s `scores.json`, written with `grid.png` to `output_dir`):
        the references are round-tripped, or paired by name with `reconstruction_files` when given."""
        from .metrics.round_trip_bench import references_from_folder, run_bench

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
        kwargs = self.call_kwargs(steps, guidance, temperature, max_tokens)
        return run_bench(references, output_dir / "report", pipeline=self.pipeline, seed=int(seed), protocol=protocol,
                         pipeline_settings={"pipeline": self.source}, **scoring, **kwargs)


def _copy_files(files: list[str], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copyfile(file, folder / Path(file).name)
    return folder


def _caption_note(result: dict) -> str:
    notes = [f"{result['tokens']} tokens"]
    if result["cut_by_length_limit"]:
        notes.append("cut by the max-tokens limit (raise it for the whole caption)")
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
        if image is None:
            raise gr.Error("Upload an image or pick a sample photo first.")
        progress(0, desc="captioning, then drawing")
        try:
            result = app.round_trip(image, steps, guidance, temperature, max_tokens, seed)
        except ValueError as error:
            raise gr.Error(str(error)) from error
        return (result["reconstruction"], result["caption"], _caption_note(result), _scores_table(result["scores"]),
                result["settings"])

    def run_bench(references, reconstructions, protocol, steps, guidance, temperature, max_tokens, seed,
                  progress=gr.Progress(track_tqdm=True)):
        output_dir = tempfile.mkdtemp(prefix="uae-app-bench-")
        try:
            report = app.bench(references, reconstructions, protocol, steps, guidance, temperature, max_tokens, seed,
                               output_dir)
        except ValueError as error:
            raise gr.Error(str(error)) from error
        report_dir = Path(output_dir, "report")
        grid = report_dir / "grid.png"
        return (report_dir.joinpath("scores.md").read_text(), _bench_table(report),
                str(grid) if grid.exists() else None, str(report_dir / "scores.json"))

    with gr.Blocks(title=TITLE, analytics_enabled=False) as blocks:
        gr.Markdown(f"# {TITLE}\nThe encoder captions the image; the decoder redraws it from the caption alone; "
                    "Unified-Bench scores how close the redrawing is (cosine similarity ×100, per backbone).")
        with gr.Tab("Round trip"):
            with gr.Row():
                image = gr.Image(type="pil", label="Original", sources=["upload", "clipboard"], elem_id="original")
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
            button.click(run_round_trip, [image, *settings], [reconstruction, caption, caption_note, scores, used])
        with gr.Tab("Unified-Bench"):
            with gr.Row():
                references = gr.File(file_count="multiple", file_types=["image"], label="Reference images",
                                     elem_id="references")
                reconstructions = gr.File(file_count="multiple", file_types=["image"], elem_id="reconstructions",
                                          label="Reconstructions to score instead of a round trip (optional; "
                                          "named like the references, optionally recon_-prefixed)")
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
            bench_button.click(run_bench, [references, reconstructions, protocol, *bench_settings],
                               [summary, table, grid, scores_file])
    return blocks


SPACE_APP = '''"""The UAE round trip and Unified-Bench for {pipeline} (written by uae_hf.app.write_space)."""

from uae_hf.cli import main

main({argv!r})
'''


def write_space(folder: str | Path, pipeline: str, app_args: list[str] | tuple[str, ...] = (),
                requirement: str = "uae-hf[app]", title: str = "UAE round trip") -> Path:
    """Write a Gradio Space for `pipeline` (a Hub id, or a folder the Space holds) into `folder`: `app.py` runs
    `uae-hf app --pipeline PIPELINE *app_args`, `requirements.txt` installs `requirement` (point it at where uae_hf
    installs from), and `README.md` carries the Space's front matter. Upload it with
    `huggingface_hub.upload_folder(repo_id=..., repo_type="space", folder_path=folder)`."""
    import gradio
    from huggingface_hub import SpaceCard, SpaceCardData

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    argv = ["app", "--pipeline", str(pipeline), *map(str, app_args)]
    (folder / "app.py").write_text(SPACE_APP.format(pipeline=pipeline, argv=argv))
    (folder / "requirements.txt").write_text(f"{requirement}\ngradio=={gradio.__version__}\n")
    data = SpaceCardData(title=title, sdk=SPACE_SDK, sdk_version=gradio.__version__, app_file="app.py",
                         models=[pipeline] if not Path(pipeline).exists() else None, tags=["uae", "uae_hf"])
    card = SpaceCard(f"---\n{data.to_yaml()}\n---\n\n# {title}\n\nImage → caption → image with `{pipeline}`, and "
                     "Unified-Bench on uploaded images. Run it locally with `uae-hf app --pipeline "
                     f"{pipeline}`.\n\nSettings: `{json.dumps(argv[3:])}`\n")
    card.save(folder / "README.md")
    return folder
