"""The demo's report folder: `results.json`, `report.md` and PNG plots (training curves and per-stage scores)."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .world import ATTRIBUTES  # noqa: E402


def _plot_curves(path: Path, panels: list[tuple[str, list[float], str]], title: str) -> None:
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.4), squeeze=False)
    for axis, (label, values, colour) in zip(axes[0], panels):
        axis.plot(range(1, len(values) + 1), values, color=colour, linewidth=1.5)
        axis.set_xlabel("step")
        axis.set_title(label)
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_stage_scores(path: Path, stages: dict) -> None:
    names = list(stages)
    figure, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    series = [
        ("Unified-Bench (toy backbone)", [stages[s]["unified_bench"] for s in names], "tab:blue"),
        ("reconstruction attribute accuracy", [stages[s]["attribute_accuracy"]["mean"] for s in names], "tab:green"),
        ("caption attributes stated correctly", [stages[s]["caption"]["recall"] for s in names], "tab:orange"),
    ]
    for axis, (label, values, colour) in zip(axes, series):
        axis.plot(names, values, marker="o", color=colour)
        for x, y in enumerate(values):
            axis.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        axis.set_title(label)
        axis.tick_params(axis="x", labelrotation=20)
        axis.grid(alpha=0.3)
    figure.suptitle("held-out scores after each stage")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


QUICK_NOTE = """
> **A quick run** (`--quick`): budgets small enough only to check that every stage runs end to end. Its scores,
> captions and curves mean nothing about the method; `uae-hf demo` without `--quick` is the run that does.
"""


def write_report(results: dict, out: Path, stage_titles: dict[str, str]) -> None:
    """Write `results.json`, the plots and `report.md` into `out`; `stage_titles` names the stages, in order."""
    stage_order = list(stage_titles)
    out = Path(out)
    stages, curves = results["stages"], results["curves"]
    with open(out / "results.json", "w") as handle:
        json.dump(results, handle, indent=2)

    plots = {}
    understanding, generation = curves.get("understanding", {}), curves.get("generation", {})
    if understanding.get("reward") or generation.get("reward"):
        plots["reward_per_step.png"] = "Reward per step (toy-backbone similarity of reconstruction and original)"
        _plot_curves(out / "reward_per_step.png", [
            ("stage 2 (GRPO on the encoder)", understanding.get("reward", []), "tab:blue"),
            ("stage 3 (Flow-GRPO on the decoder)", generation.get("reward", []), "tab:purple"),
        ], "reward per step")
    if understanding.get("completions/mean_length"):
        plots["caption_length_per_step.png"] = "Caption length per step of stage 2: the aha curve"
        _plot_curves(out / "caption_length_per_step.png", [
            ("tokens per caption", understanding["completions/mean_length"], "tab:red"),
            ("words per caption", understanding.get("caption_words/mean", []), "tab:orange"),
        ], "stage 2: caption length per step")
    losses = [(stage_titles[s], curves[s]["loss"], "tab:gray") for s in ("sft", "pretrain", "cold_start")
              if curves.get(s, {}).get("loss")]
    if losses:
        plots["losses.png"] = "Training losses of the supervised stages"
        _plot_curves(out / "losses.png", losses, "loss per step")
    plots["scores_per_stage.png"] = "Held-out scores after each stage"
    _plot_stage_scores(out / "scores_per_stage.png", stages)

    rows = []
    for stage in stage_order:
        if stage not in stages:
            continue
        s = stages[stage]
        rows.append(
            f"| {stage_order.index(stage) + 1}. {stage_titles[stage]} | {s['unified_bench']:.2f} | "
            f"{s['attribute_accuracy']['mean']:.3f} | {s['attribute_accuracy']['all']:.3f} | "
            f"{s['caption']['words']:.2f} | {s['caption']['recall']:.3f} | {s['caption']['precision']:.3f} | "
            f"{results['timings_s'].get(stage, 0.0):.0f} |"
        )
    examples = []
    for stage in stage_order:
        if stage in stages:
            examples.append(f"| {stage} | " + " · ".join(f"`{c}`" for c in stages[stage]["captions"][:3]) + " |")
    grids = "\n".join(
        f"**{stage_order.index(s) + 1}. {stage_titles[s]}**\n\n![](reconstructions_{stage_order.index(s) + 1}_{s}.png)\n"
        for s in stage_order if s in stages
    )
    config = results["config"]
    text = f"""# UAE on the toy world

The whole recipe, trained from scratch on 32-pixel scenes (one shape: {', '.join(f'{k} ({len(v)})' for k, v in ATTRIBUTES.items())}), scored on
{config['eval_rows']} held-out scenes after every stage (greedy captions, {config['num_inference_steps']} decoder steps,
CFG {config['guidance_scale']}, seed {config['seed']}). Total time: {results['timings_s']['total'] / 60:.1f} min.
{QUICK_NOTE if config.get('quick') else ''}
| stage | Unified-Bench (toy backbone) | attribute accuracy | all attributes right | caption words | caption attributes right (of 5) | caption precision | time (s) |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

- *Unified-Bench*: 100 × mean cosine of the toy backbone's embeddings of reconstruction and original.
- *attribute accuracy*: the toy backbone reads shape, colour, size, position and background from the
  reconstruction; the share that matches the original's ground truth (*all attributes right*: every one).
- *caption attributes right*: of the five attributes, the share each caption states correctly (no reward sees it).

## Plots

{chr(10).join(f'**{caption}**{chr(10)}{chr(10)}![]({name}){chr(10)}' for name, caption in plots.items())}
## Example captions (first held-out scenes)

| after | captions |
|---|---|
{chr(10).join(examples)}

## Reconstructions

The first held-out scenes after each stage, up to four pairs to a row: original | reconstruction (the 32-pixel
scenes enlarged pixel for pixel), the caption the encoder wrote underneath. Scene `#k` is the same in every stage.

{grids}
## Files

- `models/`: the toy backbone, the encoder / decoder / projector built from scratch.
- `stages/*/`: each stage's trained weights (encoder LoRA of stage 2, DiT LoRA of stage 3, cold-start projector)
  with model cards.
- `pipeline/`: the final UAE pipeline (stage-2 LoRA merged into the encoder, stage-3 LoRA fused into the DiT):
  `uae-hf reconstruct IMAGE --pipeline {out / 'pipeline'} --output-dir OUT --height 32 --width 32`.
"""
    (out / "report.md").write_text(text)
