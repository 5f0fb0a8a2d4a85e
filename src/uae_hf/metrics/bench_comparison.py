"""Finished Unified-Bench runs side by side (`uae-hf bench --compare`): one table of their scores and one grid of the
same references across round-trip systems.

Runs compare when they scored the same references (same origin, same images) with the same backbones (names,
checkpoints, precision) under the same protocol; anything else is refused (`ComparisonError`, naming the difference),
and so is a run without `scores.json` (unfinished).

Output folder:

    comparison.md         one row per run: system and checkpoints, each backbone's mean, overall, Unified-Bench (x100),
                          images scored, mean caption length in words
    comparison.json       the same rows, with the shared references, backbones and protocol
    comparison_grid.png   the first references: originals on top, then one row of reconstructions per run
"""

import json
from pathlib import Path

import PIL.Image
import PIL.ImageDraw

from ..visualization import LETTERBOX, MUTED_COLOUR, SHEET_BACKGROUND, TEXT_COLOUR, _fit_line, _font, _letterbox
from ..visualization import _line_height, _printable
from .round_trip_bench import ReferenceImage, references_from_origin, system_label, system_report


class ComparisonError(ValueError):
    """Runs that cannot share one table: unfinished, or scored on other references, backbones or protocol."""


def read_run(run_dir: str | Path) -> dict:
    """A finished run's `scores.json`."""
    path = Path(run_dir) / "scores.json"
    if not path.is_file():
        raise ComparisonError(f"{run_dir} is not a finished bench run (it has no scores.json): finish it (the same "
                              "uae-hf bench command resumes it) or leave it out")
    return json.loads(path.read_text())


def _scored(report: dict) -> dict:
    """What a run's scores are comparable on."""
    settings = report.get("settings") or {}
    scoring = settings.get("scoring") or {}
    return {
        "references": settings.get("references"),
        "images": sorted(row["image"] for row in report["per_image"]),
        "backbones": {key: scoring.get(key) for key in ("backbones", "checkpoints", "dtype")},
        "protocol": report.get("protocol"),
    }


def _shown(key: str, value) -> str:
    if key == "images":
        names = ", ".join(value[:5]) + (f" and {len(value) - 5} more" if len(value) > 5 else "")
        return f"{len(value)} image(s) ({names})"
    return json.dumps(value, ensure_ascii=False)


def check_comparable(run_dirs: list[str | Path]) -> list[dict]:
    """The runs' `scores.json` reports, once every run is finished and all scored the same references with the same
    backbones under the same protocol; else `ComparisonError` names the first difference."""
    if len(run_dirs) < 2:
        raise ComparisonError("pass at least two runs to compare")
    resolved = [Path(run_dir).resolve() for run_dir in run_dirs]
    for index, path in enumerate(resolved):
        if path in resolved[:index]:
            raise ComparisonError(f"{run_dirs[index]} is given twice: pass each run once")
    reports = [read_run(run_dir) for run_dir in run_dirs]
    first = _scored(reports[0])
    for run_dir, report in zip(run_dirs[1:], reports[1:]):
        other = _scored(report)
        for key, what in (("references", "references"), ("images", "scored references"),
                          ("backbones", "backbones"), ("protocol", "protocol")):
            if first[key] != other[key]:
                raise ComparisonError(f"{run_dirs[0]} and {run_dir} differ in their {what}: "
                                      f"{_shown(key, first[key])} vs {_shown(key, other[key])}")
    return reports


def _row(run_dir, report: dict) -> dict:
    settings = report.get("settings") or {}
    system = report.get("system") or system_report(settings.get("round_trip"))
    if system is None:  # a run that scored a folder of reconstructions
        system = {"name": "reconstructions", "checkpoints": {"folder": settings.get("reconstructions_dir")}}
    captions = [row["caption"] for row in report["per_image"] if row.get("caption") is not None]
    return {
        "run": str(run_dir),
        "system": system["name"],
        "checkpoints": system["checkpoints"],
        "backbones": {name: stats["mean"] for name, stats in report["backbones"].items()},
        "overall": report["overall"],
        "unified_bench": report["unified_bench"],
        "num_images": report["num_images"],
        "mean_caption_words": sum(len(caption.split()) for caption in captions) / len(captions) if captions else None,
    }


def _number(value, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def compare_runs(run_dirs: list[str | Path], output_dir: str | Path, grid_size: int = 8, tile: int = 160) -> dict:
    """Write `comparison.md`, `comparison.json` and `comparison_grid.png` for finished runs (see the module's
    docstring) into `output_dir`; return the JSON. Nothing is written when the runs do not compare."""
    reports = check_comparable(run_dirs)
    scored = _scored(reports[0])
    rows = [_row(run_dir, report) for run_dir, report in zip(run_dirs, reports)]
    backbones = list(rows[0]["backbones"])
    comparison = {"references": scored["references"], "images": scored["images"],
                  "backbones": scored["backbones"], "protocol": scored["protocol"], "runs": rows}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "comparison.json").write_text(json.dumps(comparison, indent=2, ensure_ascii=False) + "\n")

    lines = [f"| system | {' | '.join(backbones)} | overall | Unified-Bench | images | caption words | run |",
             "|---" * (len(backbones) + 6) + "|"]
    for row in rows:
        label = system_label({"name": row["system"], "checkpoints": row["checkpoints"]})
        scores = " | ".join(_number(row["backbones"][name]) for name in backbones)
        lines.append(f"| {label} | {scores} | {_number(row['overall'])} | {_number(row['unified_bench'], 2)} | "
                     f"{row['num_images']} | {_number(row['mean_caption_words'], 1)} | {row['run']} |")
    lines += ["", f"{len(scored['images'])} references ({scored['references']}), {scored['protocol']} protocol, "
              f"backbones {'+'.join(backbones)}"]
    (output_dir / "comparison.md").write_text("\n".join(lines) + "\n")
    comparison_grid(reports, rows, grid_size, tile).save(output_dir / "comparison_grid.png")
    return comparison


def _originals(report: dict, names: list[str]) -> list[PIL.Image.Image | None]:
    """The references `names`, read from their files, or from their dataset (`None` where unreadable)."""
    rows = {row["image"]: row for row in report["per_image"]}
    dataset = None
    images = []
    for name in names:
        source = rows[name].get("source")
        if source is None or not Path(source).is_file():  # a dataset row, or a run from before rows named sources
            if dataset is None:
                dataset = {ref.name: ref for ref in references_from_origin(report["settings"]["references"]) or []}
            reference = dataset.get(name)
        else:
            reference = ReferenceImage(name, source)
        try:
            images.append(None if reference is None else reference.load())
        except (OSError, ValueError, TypeError):
            images.append(None)
    return images


def comparison_grid(reports: list[dict], rows: list[dict], grid_size: int = 8, tile: int = 160) -> PIL.Image.Image:
    """The first `grid_size` references of the first run: a row of originals, then each run's reconstructions of them,
    each row headed by its system and overall score, each reconstruction with its own overall score."""
    names = [row["image"] for row in reports[0]["per_image"]][:grid_size]
    font = _font(max(12, round(tile / 12)))
    line = _line_height(font)
    pad = max(4, tile // 32)
    band = line + pad + tile + line + pad  # header, images, per-image line
    sheet = PIL.Image.new("RGB", (max(1, len(names)) * (tile + pad) + pad, band * (1 + len(reports))),
                          SHEET_BACKGROUND)
    draw = PIL.ImageDraw.Draw(sheet)
    width = sheet.width - 2 * pad

    def draw_band(top: int, header: str, images, notes) -> None:
        draw.text((pad, top), _fit_line(_printable(header, font), font, width), fill=TEXT_COLOUR, font=font)
        for column, (image, note) in enumerate(zip(images, notes)):
            left = pad + column * (tile + pad)
            sheet.paste(_letterbox(image, tile) if image is not None else PIL.Image.new("RGB", (tile, tile), LETTERBOX),
                        (left, top + line))
            draw.text((left, top + line + tile + pad // 2), _fit_line(_printable(note, font), font, tile),
                      fill=MUTED_COLOUR, font=font)

    draw_band(0, "references", _originals(reports[0], names), names)
    for number, (report, row) in enumerate(zip(reports, rows), start=1):
        per_image = {item["image"]: item for item in report["per_image"]}
        images, notes = [], []
        for name in names:
            try:
                images.append(PIL.Image.open(per_image[name]["reconstruction"]).convert("RGB"))
            except OSError:
                images.append(None)
            notes.append(f"{per_image[name]['overall']:.4f}")
        header = f"{system_label({'name': row['system'], 'checkpoints': row['checkpoints']})}: overall " \
                 f"{_number(row['overall'])}"
        draw_band(number * band, header, images, notes)
    return sheet
