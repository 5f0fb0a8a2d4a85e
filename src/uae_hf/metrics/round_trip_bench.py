"""The Unified-Bench runner: round-trip a set of images through a pipeline, then score, report and draw.

Output folder:

    reconstructions/<name>.png   one per reference image
    captions.jsonl               {"image", "caption", "reconstruction"} per image, appended as batches finish
    scores.json                  per-image rows, per-backbone mean/min/max/std, overall, unified_bench, skipped files;
                                 with protocol="official" also Score_i2i.py's own fields (see `official_fields`)
    scores.md                    the same as a Markdown table
    grid.png                     original | reconstruction pairs with their captions

A rerun skips images whose reconstruction and caption are already there, so an interrupted run resumes.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import PIL.Image

from ..images import load_image
from ..visualization import reconstruction_grid

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
OFFICIAL_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tiff"}  # the files Score_i2i.py picks up
RECONSTRUCTION_PREFIX = "recon_"


@dataclass
class ReferenceImage:
    """A reference to round-trip: its name (file stem or dataset index) and where to read it from."""

    name: str
    source: object  # a path, or an image from a dataset row

    def load(self) -> PIL.Image.Image:
        return load_image(self.source, where=f"reference {self.name!r}")

    @property
    def file_name(self) -> str:
        """The file's name with its extension (`name` for a dataset row)."""
        return Path(self.source).name if isinstance(self.source, (str, Path)) else self.name


def references_from_folder(folder: str | Path) -> list[ReferenceImage]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"reference folder {str(folder)!r} does not exist")
    paths = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {str(folder)!r}")
    return [ReferenceImage(path.stem, path) for path in paths]


def references_from_dataset(dataset: str, split: str = "test", image_column: str = "image") -> list[ReferenceImage]:
    """Rows of a `datasets` dataset (Hub id, local folder, or `save_to_disk` folder), named by their index."""
    import datasets

    if Path(dataset, "dataset_info.json").is_file():
        rows = datasets.load_from_disk(dataset)
    else:
        rows = datasets.load_dataset(dataset, split=split)
    if isinstance(rows, datasets.DatasetDict):
        rows = rows[split]
    if image_column not in rows.column_names:
        raise ValueError(f"dataset {dataset!r} has no column {image_column!r}; columns: {rows.column_names}")
    width = len(str(len(rows)))
    return [ReferenceImage(f"{index:0{width}d}", row[image_column]) for index, row in enumerate(rows)]


def _read_captions(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["image"]] = row
    return rows


def run_round_trip(
    pipeline,
    references: list[ReferenceImage],
    output_dir: str | Path,
    batch_size: int = 8,
    seed: int = 0,
    **call_kwargs,
) -> tuple[dict[str, dict], list[dict]]:
    """Caption and regenerate every reference not done yet. Returns (caption rows by name, skipped references).

    Reference i uses noise seed `seed + i`, whatever the batch size or how often the run was resumed.
    """
    import torch
    from tqdm.auto import tqdm

    output_dir = Path(output_dir)
    (output_dir / "reconstructions").mkdir(parents=True, exist_ok=True)
    captions_path = output_dir / "captions.jsonl"
    done = _read_captions(captions_path)
    todo = [
        (index, ref)
        for index, ref in enumerate(references)
        if not (ref.name in done and (output_dir / "reconstructions" / f"{ref.name}.png").exists())
    ]
    skipped = []
    pipeline.set_progress_bar_config(disable=True)
    with tqdm(total=len(references), initial=len(references) - len(todo), desc="round trip", unit="image") as bar:
        for start in range(0, len(todo), batch_size):
            batch = []
            for index, ref in todo[start : start + batch_size]:
                try:
                    batch.append((index, ref, ref.load()))
                except (ValueError, TypeError) as error:
                    logger.warning("skipping %s: %s", ref.name, error)
                    skipped.append({"image": ref.name, "error": str(error)})
                    bar.update(1)
            if not batch:
                continue
            generators = [torch.Generator().manual_seed(seed + index) for index, _, _ in batch]
            output = pipeline(image=[image for _, _, image in batch], generator=generators, **call_kwargs)
            with open(captions_path, "a") as handle:
                for (_, ref, _), caption, image in zip(batch, output.captions, output.images):
                    target = output_dir / "reconstructions" / f"{ref.name}.png"
                    image.save(target)
                    done[ref.name] = {"image": ref.name, "caption": caption, "reconstruction": str(target)}
                    handle.write(json.dumps(done[ref.name], ensure_ascii=False) + "\n")
            bar.update(len(batch))
    return done, skipped


def pair_reconstructions(references: list[ReferenceImage], folder: str | Path) -> tuple[list, list[dict]]:
    """Match each reference to `folder/<name>.<ext>` or `folder/recon_<name>.<ext>`; unmatched ones are reported."""
    folder = Path(folder)
    by_stem = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            stem = path.stem[len(RECONSTRUCTION_PREFIX) :] if path.stem.startswith(RECONSTRUCTION_PREFIX) else path.stem
            by_stem.setdefault(stem, path)
    pairs, missing = [], []
    for ref in references:
        if ref.name in by_stem:
            pairs.append((ref, by_stem[ref.name]))
        else:
            missing.append({"image": ref.name, "error": f"no reconstruction named {ref.name}.* in {str(folder)!r}"})
    return pairs, missing


def match_reconstructions_officially(references: list[ReferenceImage], folder: str | Path):
    """Score_i2i.py's pairing, driven by the reconstructions: every image file under `folder` (recursively, sorted)
    gets the reference with the same file name, else the first reference with the same stem or whose stem with a
    `recon_` prefix is its stem, else `None`.

    Returns `[(reconstruction path, reference or None), ...]`.
    """
    folder = Path(folder)
    paths = sorted((path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in OFFICIAL_SUFFIXES),
                   key=str) if folder.is_dir() else []
    by_file_name = {}
    for ref in references:
        by_file_name.setdefault(ref.file_name, ref)
    matches = []
    for path in paths:
        ref = by_file_name.get(path.name) or next(
            (ref for ref in references
             if path.stem in (Path(ref.file_name).stem, RECONSTRUCTION_PREFIX + Path(ref.file_name).stem)), None
        )
        matches.append((path, ref))
    return matches


def pair_reconstructions_officially(references: list[ReferenceImage], folder: str | Path):
    """`pair_reconstructions` the Score_i2i.py way: (matches, pairs, missing), where `matches` comes from
    `match_reconstructions_officially` and `missing` names both the references without a reconstruction and the
    reconstructions without a reference (failed pairs)."""
    matches = match_reconstructions_officially(references, folder)
    pairs = [(ref, path) for path, ref in matches if ref is not None]
    matched = {ref.name for ref, _ in pairs}
    missing = [{"image": ref.name, "error": f"no reconstruction for {ref.file_name} in {str(folder)!r}"}
               for ref in references if ref.name not in matched]
    missing += [{"image": path.name, "error": f"reconstruction {str(path)!r} has no reference of the same file name "
                 "or stem (with or without recon_): a failed pair"} for path, ref in matches if ref is None]
    return matches, pairs, missing


def official_fields(backbones, rows_by_file: dict[str, dict | None]) -> dict:
    """Score_i2i.py's JSON fields from per-image rows keyed by reconstruction file name (`None`: a failed pair, kept
    in `similarities_by_model` and `total_images` but out of every mean). `overall_average` is not x100; `best_model`
    and `worst_model` are `[name, average]`."""
    similarities = {name: {file: None if row is None else row[name] for file, row in rows_by_file.items()}
                    for name in backbones}
    statistics, averages = {}, {}
    for name, scores in similarities.items():
        valid = [score for score in scores.values() if score is not None]
        if valid:
            averages[name] = sum(valid) / len(valid)
            statistics[name] = {"total_images": len(scores), "valid_pairs": len(valid),
                                "average_similarity": averages[name], "min_similarity": min(valid),
                                "max_similarity": max(valid)}
    summary = {}
    if averages:
        summary = {
            "models_used": list(averages),
            "average_scores_by_model": averages,
            "overall_average": sum(averages.values()) / len(averages),
            "best_model": list(max(averages.items(), key=lambda item: item[1])),
            "worst_model": list(min(averages.items(), key=lambda item: item[1])),
        }
    return {"model_types": list(backbones), "similarities_by_model": similarities, "statistics_by_model": statistics,
            "summary": summary}


def score_pairs(pairs, metric, captions: dict[str, dict] | None = None):
    """Score (reference, reconstruction path) pairs with the Unified-Bench metric; unreadable files are skipped.

    Returns (metric results, per-image rows, skipped items, (originals, reconstructions)).
    """
    scored, originals, reconstructions, skipped = [], [], [], []
    for ref, reconstruction_path in pairs:
        try:
            original = ref.load()
            reconstruction = load_image(reconstruction_path, where=f"reconstruction {ref.name!r}")
        except (ValueError, TypeError) as error:
            logger.warning("skipping %s: %s", ref.name, error)
            skipped.append({"image": ref.name, "error": str(error)})
            continue
        scored.append((ref, reconstruction_path))
        originals.append(original)
        reconstructions.append(reconstruction)
    if not scored:
        raise ValueError("no readable (reference, reconstruction) pair to score")
    results = metric.compute(predictions=reconstructions, references=originals, return_per_image=True)
    rows = []
    for (ref, reconstruction_path), per_image in zip(scored, results.pop("per_image")):
        row = {"image": ref.name, "reconstruction": str(reconstruction_path), **per_image}
        if captions and ref.name in captions:
            row["caption"] = captions[ref.name]["caption"]
        rows.append(row)
    return results, rows, skipped, (originals, reconstructions)


def write_report(output_dir: str | Path, results: dict, rows: list[dict], skipped: list[dict], backbones, images,
                 checkpoints: dict | None = None, grid_size: int = 8, protocol: str = "default",
                 official: dict | None = None) -> dict:
    """Write `scores.json` (with `official`'s fields beside ours), `scores.md` and `grid.png`; return `scores.json`."""
    output_dir = Path(output_dir)
    stats = {}
    for name in backbones:
        values = [row[name] for row in rows]
        mean = sum(values) / len(values)
        std = (sum((value - mean) ** 2 for value in values) / len(values)) ** 0.5
        stats[name] = {"mean": mean, "min": min(values), "max": max(values), "std": std}
    report = {
        "num_images": len(rows),
        "backbones": stats,
        "overall": results["overall"],
        "unified_bench": results["unified_bench"],
        "protocol": protocol,
        "checkpoints": checkpoints or {},
        "per_image": rows,
        "skipped": skipped,
        **(official or {}),
    }
    (output_dir / "scores.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    lines = ["| backbone | mean | min | max |", "|---|---|---|---|"]
    lines += [f"| {name} | {s['mean']:.4f} | {s['min']:.4f} | {s['max']:.4f} |" for name, s in stats.items()]
    lines += [f"| **overall** | {results['overall']:.4f} | | |", "",
              f"**Unified-Bench: {results['unified_bench']:.2f}** over {len(rows)} images ({protocol} protocol)"]
    if skipped:
        lines += ["", f"Skipped {len(skipped)}: " + ", ".join(item["image"] for item in skipped)]
    (output_dir / "scores.md").write_text("\n".join(lines) + "\n")
    originals, reconstructions = images
    captions = [row.get("caption", "") for row in rows]
    reconstruction_grid(originals[:grid_size], reconstructions[:grid_size], captions[:grid_size]).save(
        output_dir / "grid.png"
    )
    return report


def run_bench(
    references: list[ReferenceImage],
    output_dir: str | Path,
    pipeline=None,
    reconstructions_dir: str | Path | None = None,
    config_name: str = "default",
    checkpoints: dict[str, str] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 8,
    seed: int = 0,
    protocol: str = "default",
    **call_kwargs,
) -> dict:
    """Unified-Bench end to end: round trip with `pipeline` (or score an existing `reconstructions_dir`), then report.

    Args:
        references: the originals (see `references_from_folder`, `references_from_dataset`).
        output_dir: where everything is written.
        pipeline: a `UAEReconstructionPipeline`-like callable; `None` with `reconstructions_dir` scores only.
        reconstructions_dir: reconstructions named like the references (optionally `recon_`-prefixed).
        config_name, checkpoints, device, dtype: the metric's backbones and where they run.
        batch_size (`int`, defaults to 8): images per pipeline call and per backbone pass.
        seed (`int`, defaults to 0): reference i is drawn with noise seed `seed + i`.
        protocol (`str`, defaults to `"default"`): `"official"` scores as Unified-Bench's `Score_i2i.py` (see the
            metric's `protocol`), pairs files its way (`match_reconstructions_officially`: every reconstruction file
            counts, one without a reference or unreadable is a failed pair) and adds its JSON fields to `scores.json`.
        **call_kwargs: passed to the pipeline (steps, guidance, caption sampling, ...).
    """
    import evaluate

    from . import metric_path

    if (pipeline is None) == (reconstructions_dir is None):
        raise ValueError("pass either a pipeline (round trip) or reconstructions_dir (score only)")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # Load the backbones before the long round trip, so a bad backbone name or checkpoint fails early.
    metric = evaluate.load(
        metric_path("unified_bench"), config_name, checkpoints=checkpoints, device=device, dtype=dtype,
        batch_size=batch_size, protocol=protocol,
    )
    captions, skipped = {}, []
    if pipeline is not None:
        captions, skipped = run_round_trip(pipeline, references, output_dir, batch_size, seed, **call_kwargs)
        reconstructions_dir = output_dir / "reconstructions"
    failed = {item["image"] for item in skipped}
    references = [ref for ref in references if ref.name not in failed]
    if protocol == "official":
        matches, pairs, missing = pair_reconstructions_officially(references, reconstructions_dir)
    else:
        pairs, missing = pair_reconstructions(references, reconstructions_dir)
    results, rows, unreadable, images = score_pairs(pairs, metric, captions)
    official = None
    if protocol == "official":  # one entry per reconstruction file; unmatched and unreadable ones are None
        by_path = {row["reconstruction"]: row for row in rows}
        official = official_fields(metric.backbones, {path.name: by_path.get(str(path)) for path, _ in matches})
    return write_report(output_dir, results, rows, skipped + missing + unreadable, metric.backbones, images,
                        checkpoints, protocol=protocol, official=official)
