"""The demo's report folder: `results.json`, `report.md` and PNG plots (training curves and per-stage scores)."""

import json
import shlex
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


STAGE3_RUNS = {  # stage → (label, colour)
    "generation": ("Flow-GRPO, CFG", "tab:purple"),
    "generation_cfg_free": ("Flow-GRPO, no CFG", "tab:orange"),
    "generation_nft": ("DiffusionNFT, no CFG", "tab:green"),
}
STEP_TIMES = ("timing/rollout_s", "timing/reward_s", "timing/update_s")
SPEED_POINTS = (1 / 6, 1 / 3, 2 / 3, 1)  # of a run's steps: steps 10, 20, 40 and 60 of the default 60


def _seconds_at(curves: dict, steps: list[int]) -> list[float]:
    """Training seconds spent before each of `steps` (the sum of the logged rollout, reward and update times)."""
    per_step = [sum(values) for values in zip(*(curves.get(name, []) for name in STEP_TIMES))]
    return [sum(per_step[:step]) for step in steps]


def learning_speed(curves: dict) -> dict[str, dict[str, list[float]]]:
    """Per stage-3 run: its validation reward gain over its own start (x 100) at `SPEED_POINTS` of its steps (those
    it validated at), and the training seconds it took to get there."""
    speed = {}
    for stage in STAGE3_RUNS:
        run = curves.get(stage, {})
        if not run.get("eval_reward"):
            continue
        validated = dict(zip(run["eval_step"], run["eval_reward"]))
        steps = [step for step in dict.fromkeys(round(point * run["eval_step"][-1]) for point in SPEED_POINTS)
                 if step in validated and step > 0]
        speed[stage] = {"step": steps, "gain": [100 * (validated[step] - validated[0]) for step in steps],
                        "seconds": _seconds_at(run, steps)}
    return speed


def _speed_rows(speeds: list[dict]) -> tuple[str, list[str]]:
    """A table header and one row per stage-3 run: gain and seconds at each step, mean [min, max] over `speeds`."""
    runs = [stage for stage in STAGE3_RUNS if all(stage in speed for speed in speeds)]
    if not runs:
        return "", []
    steps = speeds[0][runs[0]]["step"]
    header = ("| run | " + " | ".join(f"gain at step {step} | seconds to step {step}" for step in steps) + " |\n"
              + "|---|" + "---|---|" * len(steps))
    rows = []
    for stage in runs:
        cells = []
        for index in range(len(steps)):
            cells.append(_spread([speed[stage]["gain"][index] for speed in speeds], "+.2f"))
            cells.append(_spread([speed[stage]["seconds"][index] for speed in speeds], ".0f"))
        rows.append(f"| {STAGE3_RUNS[stage][0]} | " + " | ".join(cells) + " |")
    return header, rows


def _plot_objectives(path: Path, curves: dict) -> None:
    """Stage 3's runs side by side: training reward per step, validation reward per step and per second."""
    figure, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    for stage, (label, colour) in STAGE3_RUNS.items():
        run = curves.get(stage, {})
        if not run.get("reward"):
            continue
        axes[0].plot(range(1, len(run["reward"]) + 1), run["reward"], color=colour, label=label, linewidth=1.2)
        axes[1].plot(run["eval_step"], run["eval_reward"], marker="o", color=colour, label=label)
        axes[2].plot(_seconds_at(run, run["eval_step"]), run["eval_reward"], marker="o", color=colour, label=label)
    titles = ("training reward per step", "validation reward per step", "validation reward per training second")
    for axis, title, xlabel in zip(axes, titles, ("step", "step", "seconds")):
        axis.set_title(title, fontsize=10)
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_learning_speed(path: Path, runs: list[dict]) -> None:
    """Validation gain over each run's own start per step and per training second: mean over seeds, [min, max] band."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for stage, (label, colour) in STAGE3_RUNS.items():
        curves = [run[stage] for run in runs if run.get(stage, {}).get("eval_reward")]
        if len(curves) != len(runs):
            continue
        steps = curves[0]["eval_step"]
        gains = [[100 * (reward - run["eval_reward"][0]) for reward in run["eval_reward"]] for run in curves]
        seconds = [_seconds_at(run, steps) for run in curves]
        mean = [sum(column) / len(column) for column in zip(*gains)]
        low, high = [min(column) for column in zip(*gains)], [max(column) for column in zip(*gains)]
        for axis, x in zip(axes, (steps, [sum(column) / len(column) for column in zip(*seconds)])):
            axis.plot(x, mean, marker="o", color=colour, label=label)
            axis.fill_between(x, low, high, color=colour, alpha=0.15)
    for axis, xlabel in zip(axes, ("step", "training seconds (mean over seeds)")):
        axis.axhline(0, color="black", linewidth=0.6)
        axis.set_xlabel(xlabel)
        axis.set_ylabel("validation reward gain (x 100)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"stage 3 from the same stage-2 models, {len(runs)} seeds: mean and [min, max]")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _speed_note(validation_rows: int) -> str:
    return f"""Validation reward gain over each run's own start (x 100; {validation_rows} validation scenes, each run
validated with the sampler it trains: Flow-GRPO, CFG with CFG, the others without), and the training seconds
(rollouts, rewards, updates; validation excluded) to reach that step. Flow-GRPO, no CFG against DiffusionNFT compares
the objectives on one sampler; Flow-GRPO, CFG against DiffusionNFT compares each with its own."""


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def timing_text(results: dict) -> str:
    """This run's time and, when it reloaded what an earlier run made, what it reloaded and what that took then."""
    timings, reloaded = results["timings_s"], results.get("reloaded", [])
    if not reloaded:
        return f"Total time: {_duration(timings['total'])}."
    earlier = timings["total"] - timings["run"]
    return (f"This run: {_duration(timings['run'])}; it reloaded {', '.join(reloaded)}, made by an earlier run in "
            f"{_duration(earlier)} (a reloaded stage's time is that run's); {_duration(timings['total'])} in all.")


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
    understanding = curves.get("understanding", {})
    if understanding.get("reward"):
        plots["reward_per_step.png"] = "Stage 2 reward per step (toy-backbone similarity of reconstruction and original)"
        _plot_curves(out / "reward_per_step.png", [("stage 2 (GRPO on the encoder)", understanding["reward"],
                                                    "tab:blue")], "reward per step")
    if any(curves.get(stage, {}).get("reward") for stage in STAGE3_RUNS):
        plots["stage3_objectives.png"] = ("Stage 3, Flow-GRPO (with and without CFG) and DiffusionNFT from the same "
                                          "stage-2 models: reward per step and per second")
        _plot_objectives(out / "stage3_objectives.png", curves)
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

    speed_header, speed_rows = _speed_rows([learning_speed(curves)])
    reloaded = results.get("reloaded", [])
    rows = []
    for stage in stage_order:
        if stage not in stages:
            continue
        s = stages[stage]
        rows.append(
            f"| {stage_order.index(stage) + 1}. {stage_titles[stage]} | {s['unified_bench']:.2f} | "
            f"{s['attribute_accuracy']['mean']:.3f} | {s['attribute_accuracy']['all']:.3f} | "
            f"{s['caption']['words']:.2f} | {s['caption']['recall']:.3f} | {s['caption']['precision']:.3f} | "
            f"{results['timings_s'].get(stage, 0.0):.0f}{' (reloaded)' if stage in reloaded else ''} |"
        )
    examples = []
    for stage in stage_order:
        if stage in stages:
            examples.append(f"| {stage} | " + " · ".join(f"`{c}`" for c in stages[stage]["captions"][:3]) + " |")
    grids = "\n".join(
        f"**{stage_order.index(s) + 1}. {stage_titles[s]}**\n\n![](reconstructions_{stage_order.index(s) + 1}_{s}.png)\n"
        for s in stage_order if s in stages
    )
    config, pipeline = results["config"], results["pipeline"]
    text = f"""# UAE on the toy world

The whole recipe, trained from scratch on 32-pixel scenes (one shape: {', '.join(f'{k} ({len(v)})' for k, v in ATTRIBUTES.items())}), scored on
{config['eval_rows']} held-out scenes after every stage (greedy captions, {config['num_inference_steps']} decoder steps,
CFG {config['guidance_scale']} except for DiffusionNFT, which trains and samples without CFG, seed {config['seed']}).
{timing_text(results)}
{QUICK_NOTE if config.get('quick') else ''}
| stage | Unified-Bench (toy backbone) | attribute accuracy | all attributes right | caption words | caption attributes right (of 5) | caption precision | time (s) |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

The stage-3 rows all start from the stage-2 models, each trained, validated and scored with its own sampler
(Flow-GRPO: SDE rollouts, and CFG {config['guidance_scale']} or none; DiffusionNFT: ODE rollouts without CFG);
the final pipeline keeps the {stage_titles[pipeline['stage']]} run. Saved with that LoRA fused into its DiT
(`pipeline/`, see Files), it scores **Unified-Bench {pipeline['unified_bench']:.2f}**, the score on its model card.

### Stage 3 learning speed

{_speed_note(config['validation_rows'])}

{speed_header}
{chr(10).join(speed_rows)}

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
- `pipeline/`: the final UAE pipeline, with its model card: the decoder (the DiT LoRA of
  `stages/{pipeline['stage']}` fused into the DiT, the cold-start projector), the encoder's base weights, which the
  decoder reads captions with, and in `pipeline/encoder_adapter/` the stage-2 encoder LoRA (`stages/understanding`'s)
  that writes the captions. Load that LoRA with the pipeline (`--encoder-adapter`, `pipe.load_encoder_adapter`): it is
  not merged into the encoder, because merged it would also change how the decoder reads captions. So loaded,
  `pipeline/` scores {pipeline['unified_bench']:.2f} on the held-out scenes (`held_out/`) with this command:

  `{pipeline['command']}`

  A scene of your own:

  `uae-hf reconstruct IMAGE --pipeline {shlex.quote(str(out / 'pipeline'))} --encoder-adapter {shlex.quote(str(out / 'pipeline' / 'encoder_adapter'))} --height 32 --width 32 --num-inference-steps {config['num_inference_steps']} --guidance-scale {pipeline['guidance_scale']} --temperature 0 --output-dir OUT`
"""
    (out / "report.md").write_text(text)


# (column, how to read it from a stage's scores, format) of the tables
COLUMNS = [
    ("Unified-Bench (toy backbone)", lambda s: s["unified_bench"], ".2f"),
    ("attribute accuracy", lambda s: s["attribute_accuracy"]["mean"], ".3f"),
    ("position accuracy", lambda s: s["attribute_accuracy"]["position"], ".3f"),
    ("caption words", lambda s: s["caption"]["words"], ".2f"),
    ("caption attributes right (of 5)", lambda s: s["caption"]["recall"], ".3f"),
    ("caption precision", lambda s: s["caption"]["precision"], ".3f"),
]


def _spread(values: list[float], form: str) -> str:
    mean = sum(values) / len(values)
    return f"{mean:{form}}" if len(values) == 1 else f"{mean:{form}} [{min(values):{form}}, {max(values):{form}}]"


def write_summary(runs: dict[int, dict], out: Path, stage_titles: dict[str, str]) -> dict:
    """`summary.json`, `summary.md` and `stage3_learning_speed.png` in `out` for the demo's results of several seeds
    (seed → results): the mean and [min, max] over seeds of every table entry and of stage 3's learning speed."""
    out = Path(out)
    seeds = sorted(runs)
    stages = [stage for stage in stage_titles if all(stage in runs[seed]["stages"] for seed in seeds)]
    table = {stage: {name: [read(runs[seed]["stages"][stage]) for seed in seeds] for name, read, _ in COLUMNS}
             | {"time (s)": [runs[seed]["timings_s"][stage] for seed in seeds]} for stage in stages}
    speeds = [learning_speed(runs[seed]["curves"]) for seed in seeds]
    totals = [runs[seed]["timings_s"]["total"] / 60 for seed in seeds]
    summary = {"seeds": seeds, "table": table, "learning_speed": dict(zip(seeds, speeds)), "total_minutes": totals,
               "run_minutes": [runs[seed]["timings_s"]["run"] / 60 for seed in seeds]}
    with open(out / "summary.json", "w") as handle:
        json.dump(summary, handle, indent=2)
    header = " | ".join(name for name, _, _ in COLUMNS)
    rows = [f"| {stage_titles[stage]} | " + " | ".join(_spread(table[stage][name], form) for name, _, form in COLUMNS)
            + f" | {_spread(table[stage]['time (s)'], '.0f')} |" for stage in stages]
    speed_header, speed_rows = _speed_rows(speeds)
    if speed_rows:
        _plot_learning_speed(out / "stage3_learning_speed.png", [runs[seed]["curves"] for seed in seeds])
    text = f"""# UAE on the toy world, {len(seeds)} seeds

Seeds {', '.join(map(str, seeds))}; each cell is the mean over seeds and [min, max]. Each seed's own report:
{', '.join(f'[seed {seed}](seed-{seed}/report.md)' for seed in seeds)}. Time per seed: {_spread(totals, '.1f')} min.

| stage | {header} | time (s) |
|---|{'---|' * (len(COLUMNS) + 1)}
{chr(10).join(rows)}

## Stage 3 learning speed

{_speed_note(runs[seeds[0]]['config']['validation_rows'])}

{speed_header}
{chr(10).join(speed_rows)}

![](stage3_learning_speed.png)
"""
    (out / "summary.md").write_text(text)
    return summary
