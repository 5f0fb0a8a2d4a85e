"""The Unified-Bench runner: round-trip a set of images through a round-trip system (`uae_hf.round_trip`), then score,
report and draw.

Output folder:

    reconstructions/<name>.png   one per reference image (see "Names" below)
    captions.jsonl               {"image", "source", "caption", "reconstruction"} per image, appended as each finishes
    settings.json                what made reconstructions/ and captions.jsonl: references, the system and its
                                 checkpoints, seed, sampling settings, package versions (see `run_bench`); a rerun is
                                 checked against it
    scores.json                  per-image rows, per-backbone mean/min/max/std, overall, unified_bench, skipped files,
                                 `system` (name and checkpoints), `settings` (every setting of the run, scoring
                                 included) and `reused`; with
                                 protocol="official" also Score_i2i.py's own fields (see `official_fields`)
    scores.md                    the same as a Markdown table
    grid.png                     original | reconstruction pairs with their names, scores and captions

Names: a reference is named by its file's stem (`cat.png` → `cat`); references that share a stem are named by their
file names instead (`x.png` → `x.png`, `x.jpg` → `x.jpg`, so `reconstructions/x.png.png` and `x.jpg.png`), see
`unique_names`; dataset rows by their index. The name keys the reconstruction, the caption row and the score row.

A rerun with the same settings skips images whose reconstruction and caption are already there, so an interrupted
run resumes; a rerun with other settings is refused (`ResumeError`, naming the differences) unless `overwrite=True`,
which deletes the earlier reconstructions and starts over.
"""

import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import PIL.Image

from ..visualization import reconstruction_grid

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
OFFICIAL_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tiff"}  # the files Score_i2i.py picks up
RECONSTRUCTION_PREFIX = "recon_"
SETTINGS_FILE = "settings.json"
# The settings a reconstruction depends on: a rerun that differs in one of them cannot reuse the earlier ones.
RESUME_KEYS = ("references", "round_trip")
DATASET_ORIGIN = "dataset {dataset}, split {split}, column {column}"
# Each system's checkpoints, by the round-trip settings key that records them (`uae_hf.round_trip.system_of`).
SYSTEM_CHECKPOINTS = {"uae": {"pipeline": "pipeline"}, "pair": {"encoder": "encoder", "decoder": "pipeline"},
                      "janus": {"model": "model"}, "emu3": {"encoder": "encoder", "decoder": "model"}}
VERSIONED_PACKAGES = ("uae-hf", "torch", "transformers", "diffusers", "peft", "evaluate", "pillow")


@dataclass
class ReferenceImage:
    """A reference to round-trip: its name (file stem or dataset index) and where to read it from.

    `origin` says where the reference set comes from (a folder, a dataset split); it is part of the settings a rerun
    into the same output folder must share.
    """

    name: str
    source: object  # a path, or an image from a dataset row
    origin: str = ""

    def load(self, rgb=None) -> PIL.Image.Image:
        """The image as RGB, converted by `rgb` (default `uae_hf.images.to_rgb`; `pil_rgb` as Score_i2i.py
        decodes)."""
        from ..images import load_image, to_rgb  # torch and diffusers: this module lists files without them

        return load_image(self.source, f"reference {self.name!r}", rgb or to_rgb)

    @property
    def file_name(self) -> str:
        """The file's name with its extension (`name` for a dataset row)."""
        return Path(self.source).name if isinstance(self.source, (str, Path)) else self.name


def _clashes(names: list[str]) -> list[list[int]]:
    """Groups of indices whose names are equal ignoring case (one file on macOS and Windows file systems)."""
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        groups.setdefault(name.casefold(), []).append(index)
    return [group for group in groups.values() if len(group) > 1]


def unique_names(paths: list[str | Path]) -> list[str]:
    """Readable names for image files, no two alike (ignoring case): each file's stem; for files that share a stem,
    their file names (`x.png`, `x.jpg`); for files that share that too, their paths from the folder they have in
    common (`d1/x.png`, `d2/x.png`).

    Raises:
        `ValueError`: a file is given twice, or two differ only in letter case.
    """
    paths = [Path(os.path.abspath(path)) for path in paths]
    names = [path.stem for path in paths]
    for by_path in (False, True):
        for group in _clashes(names):
            common = Path(os.path.commonpath([paths[index].parent for index in group]))
            for index in group:
                names[index] = paths[index].relative_to(common).as_posix() if by_path else paths[index].name
    for group in _clashes(names):
        files = sorted({str(paths[index]) for index in group})
        if len(files) == 1:
            raise ValueError(f"{files[0]} is given {len(group)} times: pass each image once")
        raise ValueError(f"{' and '.join(files)} differ only in letter case, so their reconstructions would overwrite "
                         "each other on some file systems: rename one")
    return names


def references_from_folder(folder: str | Path, protocol: str = "default") -> list[ReferenceImage]:
    """The images directly in `folder` (sorted), named as `unique_names` says: their stems, file names where stems
    are shared. With `protocol="official"`, as Score_i2i.py finds references: every file under `folder`, subfolders
    included, with its file types (`OFFICIAL_SUFFIXES`: no .gif, no .tif), sorted by path."""
    folder = Path(folder)
    if folder.is_file():
        raise ValueError(f"reference folder {str(folder)!r} is a file, not a folder: pass the folder that holds the "
                         "reference images")
    if not folder.is_dir():
        raise ValueError(f"reference folder {str(folder)!r} does not exist")
    if protocol == "official":
        suffixes = OFFICIAL_SUFFIXES
        paths = sorted((path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in suffixes),
                       key=str)
    else:
        suffixes = IMAGE_SUFFIXES
        paths = sorted(path for path in folder.iterdir() if path.suffix.lower() in suffixes)
    if not paths:
        raise ValueError(f"no images ({', '.join(sorted(suffixes))}) in {str(folder)!r}")
    origin = f"folder {folder.resolve()}"
    return [ReferenceImage(name, path, origin) for name, path in zip(unique_names(paths), paths)]


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
    where = Path(dataset).resolve() if Path(dataset).exists() else dataset
    origin = DATASET_ORIGIN.format(dataset=where, split=split, column=image_column)
    return [ReferenceImage(f"{index:0{width}d}", row[image_column], origin) for index, row in enumerate(rows)]


def references_from_origin(origin: str) -> list[ReferenceImage] | None:
    """The references of a dataset `origin` as `references_from_dataset` wrote it (`None` for a folder's: its
    references are files, named in each score row's `source`)."""
    match = re.fullmatch(DATASET_ORIGIN.format(dataset="(.+)", split="(.+)", column="(.+)"), origin)
    return None if match is None else references_from_dataset(match[1], match[2], match[3])


def _read_captions(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by an interrupted run: that image is done again
            continue
        rows[row["image"]] = row
    return rows


def package_versions() -> dict[str, str]:
    """Python's and the packages' versions a run used (recorded in `settings.json` and `scores.json`)."""
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _as_json(value):
    """`value` as it reads back from JSON (tuples as lists, anything else JSON lacks as its `str`)."""
    return json.loads(json.dumps(value, default=str))


_NOT_SET = object()


def _shown(value) -> str:
    return "(not set)" if value is _NOT_SET else json.dumps(value, ensure_ascii=False)


def _differences(before: dict, now: dict) -> list[str]:
    """`"key: before → now"` for every key whose value differs between two dicts of JSON values."""
    return [f"{key}: {_shown(before.get(key, _NOT_SET))} → {_shown(now.get(key, _NOT_SET))}"
            for key in list(before) + [key for key in now if key not in before]
            if before.get(key, _NOT_SET) != now.get(key, _NOT_SET)]


def round_trip_system(round_trip: dict | None) -> str | None:
    """The system a run's `round_trip` settings name; runs from before systems were named record none: theirs is
    "pair" when they record an `encoder`, else "uae". `None` for a run that scored a folder."""
    if round_trip is None:
        return None
    return round_trip.get("system") or ("pair" if round_trip.get("encoder") else "uae")


def system_report(round_trip: dict | None) -> dict | None:
    """`{"name", "checkpoints"}` of the system a run's `round_trip` settings name (`None`: a folder was scored)."""
    name = round_trip_system(round_trip)
    if name is None:
        return None
    keys = SYSTEM_CHECKPOINTS.get(name, {"pipeline": "pipeline"})
    return {"name": name, "checkpoints": {label: round_trip.get(key) for label, key in keys.items()}}


def _resume_settings(settings: dict) -> dict:
    """The settings a reconstruction depends on, in one flat dict: `references` and the `round_trip` settings (with
    the system named, for runs from before systems were)."""
    round_trip = settings.get("round_trip")
    named = {} if round_trip is None else {"system": round_trip_system(round_trip)}
    return {"references": settings.get("references"), **(round_trip or {}), **named}


class ResumeError(ValueError):
    """An output folder holds reconstructions made with other settings (or with unrecorded ones)."""

    def __init__(self, output_dir: Path, reusable: int, differences: list[str]):
        self.output_dir, self.reusable, self.differences = output_dir, reusable, differences
        made = "with other settings: " + "; ".join(differences) if differences else "by a run that did not record them"
        super().__init__(f"{str(output_dir)!r} holds {reusable} reconstruction(s) made {made}. Pass overwrite=True "
                         "to delete them and start over, or write to another output folder")


def prepare_round_trip_dir(output_dir: str | Path, settings: dict, overwrite: bool = False) -> None:
    """Make `output_dir` ready for a round trip with `settings` and record them in `settings.json`.

    With `overwrite`, the earlier reconstructions and captions are deleted. Otherwise, earlier reconstructions are
    reused only if their `RESUME_KEYS` settings are `settings`'; if not, `ResumeError` says which differ. Differing
    package versions are only logged.
    """
    output_dir = Path(output_dir)
    captions_path, settings_path = output_dir / "captions.jsonl", output_dir / SETTINGS_FILE
    settings = _as_json(settings)
    if overwrite:
        shutil.rmtree(output_dir / "reconstructions", ignore_errors=True)
        captions_path.unlink(missing_ok=True)
    earlier = _read_captions(captions_path)
    if earlier:
        recorded = json.loads(settings_path.read_text()) if settings_path.exists() else None
        if recorded is None:
            raise ResumeError(output_dir, len(earlier), [])
        differences = _differences(_resume_settings(recorded), _resume_settings(settings))
        if differences:
            raise ResumeError(output_dir, len(earlier), differences)
        versions = _differences(recorded.get("versions", {}), settings.get("versions", {}))
        if versions:
            logger.warning("reusing reconstructions in %s made with other package versions: %s", output_dir,
                           "; ".join(versions))
    output_dir.mkdir(parents=True, exist_ok=True)
    settings_path.write_text(json.dumps({key: settings.get(key) for key in (*RESUME_KEYS, "versions")}, indent=2,
                                        ensure_ascii=False) + "\n")


def run_round_trip(
    pipeline,
    references: list[ReferenceImage],
    output_dir: str | Path,
    batch_size: int = 8,
    seed: int = 0,
    **call_kwargs,
) -> tuple[dict[str, dict], list[dict], int]:
    """Caption and regenerate every reference not done yet (`uae_hf.round_trip.round_trip`), each reconstruction and
    its `captions.jsonl` row written as soon as it is made.

    Returns (caption rows by name, skipped references, how many reconstructions were reused from an earlier run).
    Reference i uses noise seed `seed + i`, whatever the batch size or how often the run was resumed. Whether the
    earlier ones may be reused is `prepare_round_trip_dir`'s check (`run_bench` makes it).
    """
    from tqdm.auto import tqdm

    from ..round_trip import round_trip

    for group in _clashes([ref.name for ref in references]):
        raise ValueError(f"references {[references[index].name for index in group]} would share one reconstruction "
                         "file: name each reference differently")
    output_dir = Path(output_dir)
    (output_dir / "reconstructions").mkdir(parents=True, exist_ok=True)
    captions_path = output_dir / "captions.jsonl"
    done = _read_captions(captions_path)
    todo = [
        index
        for index, ref in enumerate(references)
        if not (ref.name in done and (output_dir / "reconstructions" / f"{ref.name}.png").exists())
    ]
    reused = len(references) - len(todo)
    if reused:
        logger.info("reusing %d of %d reconstructions in %s", reused, len(references), output_dir)
    skipped = []
    with tqdm(total=len(references), initial=reused, desc="round trip", unit="image") as bar:
        for item in round_trip(pipeline, [references[index] for index in todo], batch_size, seed, indices=todo,
                               load=ReferenceImage.load, progress=bar, **call_kwargs):
            ref = references[item.index]
            if item.error is not None:
                logger.warning("skipping %s: %s", ref.name, item.error)
                skipped.append({"image": ref.name, "error": str(item.error)})
                continue
            target = output_dir / "reconstructions" / f"{ref.name}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            item.reconstruction.save(target)
            source = str(ref.source) if isinstance(ref.source, (str, Path)) else ref.origin
            done[ref.name] = {"image": ref.name, "source": source, "caption": item.caption,
                              "reconstruction": str(target)}
            with open(captions_path, "a") as handle:
                handle.write(json.dumps(done[ref.name], ensure_ascii=False) + "\n")
    return done, skipped, reused


def pair_reconstructions(references: list[ReferenceImage], folder: str | Path) -> tuple[list, list[dict], list[Path]]:
    """Match each reference to the image in `folder` with its file name (`x.png`), else to one whose stem is its file
    name (`x.png.*`) or its name (`x.*`), each optionally `recon_`-prefixed.

    Returns (pairs, the references without a reconstruction as report items, the images in `folder` that match no
    reference).
    """
    folder = Path(folder)
    files = sorted(folder.iterdir()) if folder.is_dir() else []
    paths = [path for path in files if path.suffix.lower() in IMAGE_SUFFIXES]
    by_file_name, by_stem = {}, {}
    for prefix in ("", RECONSTRUCTION_PREFIX):  # a file's own name first, then the name without its prefix
        for path in paths:
            if path.name.startswith(prefix):
                name = path.name[len(prefix) :]
                by_file_name.setdefault(name, path)
                by_stem.setdefault(Path(name).stem, path)
    pairs, missing = [], []
    for ref in references:
        path = by_file_name.get(ref.file_name) or by_stem.get(ref.file_name) or by_stem.get(ref.name)
        if path is not None:
            pairs.append((ref, path))
        else:
            missing.append({"image": ref.name, "error": f"no reconstruction named {ref.file_name}, {ref.file_name}.* "
                            f"or {ref.name}.* (optionally {RECONSTRUCTION_PREFIX}-prefixed) in {str(folder)!r}"})
    paired = {path for _, path in pairs}
    return pairs, missing, [path for path in paths if path not in paired]


def match_reconstructions_officially(references: list[ReferenceImage], folder: str | Path):
    """Score_i2i.py's pairing, driven by the reconstructions: every image file under `folder` (recursively, sorted)
    gets the reference with the same file name, else the first reference with the same stem or whose stem with a
    `recon_` prefix is its stem, else `None`. Score_i2i.py keys its scores by file name, so a file name found in
    several subfolders counts once, as its last path (at the place of its first).

    Returns `[(reconstruction path, reference or None), ...]`.
    """
    folder = Path(folder)
    paths = sorted((path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in OFFICIAL_SUFFIXES),
                   key=str) if folder.is_dir() else []
    by_file_name = {}
    for ref in references:
        by_file_name.setdefault(ref.file_name, ref)
    matches = {}
    for path in paths:
        if path.name in matches:
            logger.warning("%s counts instead of %s: Score_i2i.py keeps the last file of a name", path,
                           matches[path.name][0])
        ref = by_file_name.get(path.name) or next(
            (ref for ref in references
             if path.stem in (Path(ref.file_name).stem, RECONSTRUCTION_PREFIX + Path(ref.file_name).stem)), None
        )
        matches[path.name] = (path, ref)
    return list(matches.values())


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


def pairing_summary(references: list[ReferenceImage], folder: str | Path,
                    protocol: str = "default") -> tuple[int, list[Path]]:
    """How many references `folder`'s reconstructions pair with, and the image files in it that match no reference,
    as `run_bench` pairs them with `protocol`; read from file names alone."""
    if protocol == "official":
        matches = match_reconstructions_officially(references, folder)
        return sum(ref is not None for _, ref in matches), [path for path, ref in matches if ref is None]
    pairs, _, unmatched = pair_reconstructions(references, folder)
    return len(pairs), unmatched


def no_pair_message(references: list[ReferenceImage], folder: str | Path, unmatched: list[Path]) -> str:
    """Why no reconstruction in `folder` pairs with a reference: a few of each named, and how to name them."""
    def some(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    folder, example = Path(folder), references[0].file_name
    found = (f"its images ({some([path.relative_to(folder).as_posix() for path in unmatched])}) match" if unmatched
             else "it holds no image to match")
    return (f"no reconstruction to score in {str(folder)!r}: {found} none of the references "
            f"({some([ref.file_name for ref in references])}); name each reconstruction as its reference ({example}, "
            f"{Path(example).stem}.* or {RECONSTRUCTION_PREFIX}{Path(example).stem}.*)")


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


def score_pairs(pairs, metric, captions: dict[str, dict] | None = None, rgb=None):
    """Score (reference, reconstruction path) pairs with the Unified-Bench metric; unreadable files are skipped, and
    images are made RGB by `rgb` (default `uae_hf.images.to_rgb`).

    Returns (metric results, per-image rows, skipped items, (originals, reconstructions)); the results are `None`
    when no pair could be read.
    """
    from ..images import load_image, to_rgb

    rgb = rgb or to_rgb
    scored, originals, reconstructions, skipped = [], [], [], []
    for ref, reconstruction_path in pairs:
        try:
            original = ref.load(rgb)
            reconstruction = load_image(reconstruction_path, f"reconstruction {ref.name!r}", rgb)
        except (ValueError, TypeError) as error:
            logger.warning("skipping %s: %s", ref.name, error)
            skipped.append({"image": ref.name, "error": str(error)})
            continue
        scored.append((ref, reconstruction_path))
        originals.append(original)
        reconstructions.append(reconstruction)
    if not scored:
        return None, [], skipped, ([], [])
    results = metric.compute(predictions=reconstructions, references=originals, return_per_image=True)
    rows = []
    for (ref, reconstruction_path), per_image in zip(scored, results.pop("per_image")):
        source = str(ref.source) if isinstance(ref.source, (str, Path)) else ref.origin
        row = {"image": ref.name, "file": ref.file_name, "source": source,
               "reconstruction": str(reconstruction_path), **per_image}
        if captions and ref.name in captions:
            row["caption"] = captions[ref.name]["caption"]
        rows.append(row)
    return results, rows, skipped, (originals, reconstructions)


def system_label(system: dict) -> str:
    """`janus (model: deepseek-community/Janus-Pro-7B)`: a system and its checkpoints on one line."""
    checkpoints = ", ".join(f"{label}: {value}" for label, value in system["checkpoints"].items() if value)
    return f"{system['name']} ({checkpoints})" if checkpoints else system["name"]


def write_report(output_dir: str | Path, results: dict, rows: list[dict], skipped: list[dict], backbones, images,
                 checkpoints: dict | None = None, grid_size: int = 8, protocol: str = "default",
                 official: dict | None = None, settings: dict | None = None, reused: int | None = None) -> dict:
    """Write `scores.json` (with `official`'s fields beside ours), `scores.md` and `grid.png`; return `scores.json`.
    Without any scored pair (`results` is `None`), `overall` and `unified_bench` are `None` and there is no grid."""
    output_dir = Path(output_dir)
    results = results or {"overall": None, "unified_bench": None}
    stats = {}
    for name in (backbones if rows else ()):
        values = [row[name] for row in rows]
        mean = sum(values) / len(values)
        std = (sum((value - mean) ** 2 for value in values) / len(values)) ** 0.5
        stats[name] = {"mean": mean, "min": min(values), "max": max(values), "std": std}
    for row in rows:  # the image's own overall: the mean over backbones, as the benchmark's overall is
        row["overall"] = sum(row[name] for name in backbones) / len(backbones)
    system = system_report((settings or {}).get("round_trip"))
    report = {
        "num_images": len(rows),
        "system": system,
        "backbones": stats,
        "overall": results["overall"],
        "unified_bench": results["unified_bench"],
        "protocol": protocol,
        "checkpoints": checkpoints or {},
        "settings": settings or {},
        "reused": reused or 0,
        "per_image": rows,
        "skipped": skipped,
        **(official or {}),
    }
    (output_dir / "scores.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if rows:
        lines = ["| backbone | mean | min | max |", "|---|---|---|---|"]
        lines += [f"| {name} | {s['mean']:.4f} | {s['min']:.4f} | {s['max']:.4f} |" for name, s in stats.items()]
        lines += [f"| **overall** | {results['overall']:.4f} | | |", "",
                  f"**Unified-Bench: {results['unified_bench']:.2f}** over {len(rows)} images ({protocol} protocol)"]
    else:
        lines = [f"**Unified-Bench: no pair scored** ({protocol} protocol)"]
    if system is not None:
        lines += ["", f"System: {system_label(system)}"]
    if skipped:
        lines += ["", f"Skipped {len(skipped)}: " + ", ".join(item["image"] for item in skipped)]
    (output_dir / "scores.md").write_text("\n".join(lines) + "\n")
    if not rows:
        (output_dir / "grid.png").unlink(missing_ok=True)  # an earlier run's
        return report
    originals, reconstructions = images
    shown = rows[:grid_size]
    reconstruction_grid(
        originals[:grid_size], reconstructions[:grid_size], [row.get("caption", "") for row in shown],
        names=[row["file"] for row in shown], scores=[row["overall"] for row in shown],
    ).save(output_dir / "grid.png")
    return report


def bench_settings(
    references: list[ReferenceImage],
    pipeline_settings: dict | None = None,
    reconstructions_dir: str | Path | None = None,
    seed: int = 0,
    scoring: dict | None = None,
    **call_kwargs,
) -> dict:
    """Every setting of a bench run, as `settings.json` and `scores.json` record them: `references` (their origin),
    `round_trip` (`pipeline_settings` with the seed and the pipeline's call arguments; `None` when scoring
    `reconstructions_dir`), `scoring` and package `versions`."""
    origins = sorted({ref.origin for ref in references})
    return _as_json({
        "references": origins[0] if len(origins) == 1 else origins,
        "round_trip": None if pipeline_settings is None else {**pipeline_settings, "seed": seed, **call_kwargs},
        "reconstructions_dir": None if reconstructions_dir is None else str(Path(reconstructions_dir).resolve()),
        "scoring": scoring or {},
        "versions": package_versions(),
    })


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
    pipeline_settings: dict | None = None,
    overwrite: bool = False,
    **call_kwargs,
) -> dict:
    """Unified-Bench end to end: round trip with `pipeline` (or score an existing `reconstructions_dir`), then report.

    Args:
        references: the originals (see `references_from_folder`, `references_from_dataset`).
        output_dir: where everything is written.
        pipeline: a round-trip system (`uae_hf.round_trip.RoundTripSystem`: a `UAEReconstructionPipeline`,
            `PairedRoundTrip`, `JanusRoundTrip` or `Emu3RoundTrip`); `None` with `reconstructions_dir` scores only.
        reconstructions_dir: reconstructions named like the references (optionally `recon_`-prefixed). Images in it
            that pair with no reference are reported in `skipped`; if none pairs, `ValueError` before the backbones
            load (the official protocol writes its report instead, see `protocol`).
        config_name, checkpoints, device, dtype: the metric's backbones and where they run.
        batch_size (`int`, defaults to 8): images per pipeline call and per backbone pass.
        seed (`int`, defaults to 0): reference i is drawn with noise seed `seed + i`.
        protocol (`str`, defaults to `"default"`): `"official"` scores as Unified-Bench's `Score_i2i.py` (see the
            metric's `protocol`; images decoded with PIL's `convert("RGB")`) and adds its JSON fields to
            `scores.json`. Scoring `reconstructions_dir`, it pairs files its way (`match_reconstructions_officially`:
            every reconstruction file name counts once, one without a reference or unreadable is a failed pair, and
            none scored is a report with an empty `summary`, not an error); after a round trip, each reference is
            paired with its own reconstruction.
        pipeline_settings (`dict`, *optional*): what identifies the pipeline (`system`, checkpoints, revision,
            adapter, dtype, device); recorded with the seed and `call_kwargs` as the round trip's settings, which a
            rerun into the same `output_dir` must share to reuse its reconstructions. Defaults to the system's name
            and checkpoints (`uae_hf.round_trip.system_of`) and its dtype.
        overwrite (`bool`, defaults to `False`): delete the reconstructions of an earlier run in `output_dir` and start
            over; without it, a rerun with other round-trip settings raises `ResumeError`.
        **call_kwargs: passed to the pipeline (steps, guidance, caption sampling, ...).

    Returns the `scores.json` report: see the module's docstring; `reused` counts the reconstructions taken from an
    earlier run.
    """
    import evaluate

    from . import metric_path

    if (pipeline is None) == (reconstructions_dir is None):
        raise ValueError("pass either a pipeline (round trip) or reconstructions_dir (score only)")
    output_dir = Path(output_dir)
    scoring = {"config_name": config_name, "checkpoints": checkpoints or {}, "protocol": protocol, "device": device,
               "dtype": dtype, "batch_size": batch_size}
    if pipeline is not None and pipeline_settings is None:
        from ..round_trip import system_of

        system, system_checkpoints = system_of(pipeline)
        pipeline_settings = {"system": system, **system_checkpoints}
        if hasattr(pipeline, "dtype"):
            pipeline_settings["dtype"] = str(pipeline.dtype)
    settings = bench_settings(references, pipeline_settings, reconstructions_dir, seed, scoring, **call_kwargs)
    if pipeline is not None:  # before anything loads: a folder that cannot be resumed fails at once
        prepare_round_trip_dir(output_dir, settings, overwrite)
    if reconstructions_dir is not None and protocol == "official":
        matches, pairs, missing = pair_reconstructions_officially(references, reconstructions_dir)
    elif reconstructions_dir is not None:  # a folder that pairs with nothing fails before the backbones load
        pairs, missing, unmatched = pair_reconstructions(references, reconstructions_dir)
        if not pairs:
            raise ValueError(no_pair_message(references, Path(reconstructions_dir), unmatched))
        missing += [{"image": path.name, "error": f"reconstruction {str(path)!r} pairs with none of the references "
                     "given (not scored)"} for path in unmatched]
    output_dir.mkdir(parents=True, exist_ok=True)
    # Load the backbones before the long round trip, so a bad backbone name or checkpoint fails early.
    metric = evaluate.load(
        metric_path("unified_bench"), config_name, checkpoints=checkpoints, device=device, dtype=dtype,
        batch_size=batch_size, protocol=protocol,
    )
    settings["scoring"]["backbones"] = list(metric.backbones)
    captions, skipped, reused = {}, [], 0
    if pipeline is not None:
        captions, skipped, reused = run_round_trip(pipeline, references, output_dir, batch_size, seed, **call_kwargs)
        folder = output_dir / "reconstructions"
        failed = {item["image"] for item in skipped}
        # each reference with its own reconstruction: files in the folder from other runs are never picked up
        pairs = [(ref, folder / f"{ref.name}.png") for ref in references if ref.name not in failed]
        missing, matches = [], [(path, ref) for ref, path in pairs]
    results, rows, unreadable, images = score_pairs(pairs, metric, captions, metric.similarity.rgb)
    if results is None and protocol != "official":  # Score_i2i.py writes its JSON with an empty summary instead
        raise ValueError("no readable (reference, reconstruction) pair to score")
    official = None
    if protocol == "official":  # one entry per reconstruction file; unmatched and unreadable ones are None
        by_path = {row["reconstruction"]: row for row in rows}
        # keyed by file name, as Score_i2i.py does; a round trip's own files by their path in reconstructions/
        official = official_fields(metric.backbones, {
            path.name if pipeline is None else f"{ref.name}.png": by_path.get(str(path)) for path, ref in matches
        })
    return write_report(output_dir, results, rows, skipped + missing + unreadable, metric.backbones, images,
                        checkpoints, protocol=protocol, official=official, settings=settings, reused=reused)
