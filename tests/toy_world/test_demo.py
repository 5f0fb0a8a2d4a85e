import json
import shlex
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch

from uae_hf import load_saved_pipeline
from uae_hf.cli import main

from uae_hf.toy_world import toy_world_dataset
from uae_hf.toy_world.demo import STAGE3, STAGE_RECORD, STAGES
from uae_hf.toy_world.report import learning_speed, timing_text

from network_block import BLOCK_NETWORK


@pytest.mark.slow
@pytest.mark.timeout(1200)  # 77 s alone; 301 s beside the engine launches on 2 cores (2026-12-07)
def test_quick_demo_runs_every_stage_for_two_seeds_and_writes_every_artefact(tmp_path, capsys):
    top = tmp_path / "demo"
    script = BLOCK_NETWORK + (f"from uae_hf.cli import main; main(['demo', '--quick', '--seeds', '2', '--output-dir', "
                              f"{str(top)!r}])")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| stage 3: DiffusionNFT on the decoder (sampled without CFG) |" in result.stdout  # the summary table
    assert "Setting accelerator to CPU" not in result.stderr  # DeepSpeed's, imported by the trainers: quiet too
    # a progress bar per stage and one line per stage; the Trainer's log dictionaries only in trainer_state.json
    for logged in ("{'loss'", "'eval_reward'", "{'train_runtime'"):
        assert logged not in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]
    for index, stage in enumerate(STAGES):
        assert result.stdout.count(f"[{stage}] trained in ") == 2, stage  # once per seed
        assert f"{index + 1}/{len(STAGES)} {stage}" in result.stderr, stage
        state = json.loads((top / "seed-0" / "stages" / stage / "trainer_state.json").read_text())
        assert any("loss" in record for record in state["log_history"]), stage

    # the summary: mean and [min, max] of every table entry over the two seeds' own results
    runs = [json.loads((top / f"seed-{seed}" / "results.json").read_text()) for seed in (0, 1)]
    assert [run["config"]["seed"] for run in runs] == [0, 1]
    summary = json.loads((top / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and list(summary["table"]) == list(STAGES)
    bench = [run["stages"]["generation_nft"]["unified_bench"] for run in runs]
    assert summary["table"]["generation_nft"]["Unified-Bench (toy backbone)"] == bench
    row = next(line for line in (top / "summary.md").read_text().splitlines() if "DiffusionNFT on the decoder" in line)
    assert f"{sum(bench) / 2:.2f} [{min(bench):.2f}, {max(bench):.2f}]" in row
    # stage 3's learning speed: each run's validation gain over its own start, per seed, and its plot
    speeds = {str(seed): learning_speed(run["curves"]) for seed, run in zip((0, 1), runs)}
    assert summary["learning_speed"] == speeds and set(speeds["0"]) == set(STAGE3)
    curves = runs[1]["curves"]["generation_nft"]
    assert speeds["1"]["generation_nft"]["step"] == [1, 2]  # 1/6 of 2 steps rounds to 0: not a point of its own
    assert speeds["1"]["generation_nft"]["gain"][-1] == pytest.approx(100 * (curves["eval_reward"][-1] - curves["eval_reward"][0]))
    assert "| DiffusionNFT, no CFG |" in (top / "summary.md").read_text()
    assert PIL.Image.open(top / "stage3_learning_speed.png").width > 100

    out = top / "seed-0"
    results = runs[0]
    assert list(results["stages"]) == list(STAGES)
    for stage, scores in results["stages"].items():
        assert 0 < scores["unified_bench"] <= 100 and 0 <= scores["attribute_accuracy"]["mean"] <= 1, stage
        assert len(scores["captions"]) == results["config"]["eval_rows"]
    curves = results["curves"]
    assert len(curves["understanding"]["reward"]) == results["config"]["understanding_steps"]
    assert len(curves["understanding"]["completions/mean_length"]) == results["config"]["understanding_steps"]
    for stage in STAGE3:  # trained for its steps, validated before training, then during it
        steps = results["config"]["generation_nft_steps" if stage == "generation_nft" else "generation_steps"]
        assert len(curves[stage]["reward"]) == steps
        assert curves[stage]["eval_step"][0] == 0 and curves[stage]["eval_step"][-1] == steps
        assert all(0 < reward <= 1 for reward in curves[stage]["eval_reward"])
    assert len(curves["pretrain"]["loss"]) == results["config"]["pretrain_steps"]

    report = (out / "report.md").read_text()
    assert "A quick run" in report and "mean nothing" in report  # nobody mistakes quick numbers for results
    for name in ("reward_per_step.png", "stage3_objectives.png", "caption_length_per_step.png", "scores_per_stage.png", "losses.png",
                 *(f"reconstructions_{i + 1}_{stage}.png" for i, stage in enumerate(STAGES))):
        assert PIL.Image.open(out / name).width > 100, name
        assert f"]({name})" in report, name
    for name in ("models/toyworld-backbone/model.safetensors", "models/encoder/model.safetensors",
                 "stages/understanding/adapter_model.safetensors", "stages/understanding/README.md",
                 "stages/generation/pytorch_lora_weights.safetensors", "stages/generation/README.md",
                 "stages/generation_nft/pytorch_lora_weights.safetensors", "stages/generation_nft/README.md",
                 "stages/sft/adapter_model.safetensors", "stages/sft/README.md", "stages/pretrain/README.md",
                 "stages/cold_start/projector/config.json", "pipeline/model_index.json"):
        assert (out / name).exists(), name

    cards = [*(out / "stages").glob("*/README.md"), out / "pipeline" / "README.md"]
    assert len(cards) == len(STAGES) + 1
    for card in cards:  # model cards never carry the user's local paths
        assert str(tmp_path) not in card.read_text(), card
    assert "toyworld" in (out / "pipeline" / "README.md").read_text()  # the final pipeline's score
    for stage in ("sft", "understanding"):  # adapters name their base from their own folder (it moves with them)
        config = json.loads((out / "stages" / stage / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "../../models/encoder", config

    # the final pipeline, loaded as the report says (with its encoder adapter), scores what the report and card say
    pipeline = results["pipeline"]
    printed = f"{pipeline['unified_bench']:.2f}"
    card = (out / "pipeline" / "README.md").read_text()
    assert f"| {printed} |" in card and "encoder_adapter" in card
    assert f"it scores **Unified-Bench {printed}**" in report
    assert (out / "pipeline" / "encoder_adapter" / "adapter_model.safetensors").read_bytes() == \
        (out / "stages" / "understanding" / "adapter_model.safetensors").read_bytes()
    command = next(line.strip().strip("`") for line in report.splitlines() if line.strip().startswith("`uae-hf bench "))
    scoring = BLOCK_NETWORK + f"from uae_hf.cli import main; main({shlex.split(command)[1:]!r})"
    result = subprocess.run([sys.executable, "-c", scoring], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"**Unified-Bench: {printed}** over {results['config']['eval_rows']} images" in result.stdout, result.stdout
    assert "tie_word_embeddings" not in result.stderr and "Warning" not in result.stderr  # quiet unless --verbose
    # in bfloat16 too, every component and the adapter as asked; the adapter also loads as a Hub repo's subfolder
    bf16 = load_saved_pipeline(out / "pipeline", torch_dtype=torch.bfloat16)
    bf16.load_encoder_adapter(str(out / "pipeline"), adapter_kwargs={"subfolder": "encoder_adapter"})  # as the card
    dtypes = {name: {p.dtype for p in module.parameters()}
              for name, module in bf16.components.items() if isinstance(module, torch.nn.Module)}
    assert set(dtypes) >= {"vlm", "transformer", "projector"} and all(found == {torch.bfloat16}
                                                                     for found in dtypes.values()), dtypes
    assert any("lora_" in name for name, _ in bf16.vlm.named_parameters())
    image = tmp_path / "scene.png"
    toy_world_dataset(1, "test", seed=0)[0]["image"].save(image)  # a held-out scene

    # the README's Python round trip, as written there, on this run's folder (from another working directory)
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    snippet = next(block for block in readme.split("```python")[1:] if "outputs/demo/pipeline" in block).split("```")[0]
    snippet = snippet.replace("outputs/demo", str(out)).replace('"scene.png"', repr(str(image)))
    result = subprocess.run([sys.executable, "-c", BLOCK_NETWORK + snippet], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert PIL.Image.open(tmp_path / "reconstruction.png").size == (32, 32) and result.stdout.strip()

    # a second run in the same folder (here in this process) reloads every finished stage instead of training it
    # again, says so, keeps their times and gives its own apart; the pipeline it saves again scores the same
    first = results["stages"]
    capsys.readouterr()
    main(["demo", "--quick", "--output-dir", str(out)])
    printed = capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert again["stages"] == first and again["pipeline"] == results["pipeline"]
    assert again["reloaded"] == ["models", *STAGES] and results["reloaded"] == []
    assert {stage: again["timings_s"][stage] for stage in STAGES} == {stage: results["timings_s"][stage] for stage in STAGES}
    assert again["timings_s"]["total"] == pytest.approx(
        again["timings_s"]["run"] + sum(results["timings_s"][stage] for stage in ("build", *STAGES)))
    for stage in STAGES:
        assert f"[{stage}] reloaded (trained in {results['timings_s'][stage]:.0f} s by an earlier run)" in printed
    assert timing_text(again).startswith("This run: ") and timing_text(again) in printed  # the report's head
    assert f"(this run: {again['timings_s']['run'] / 60:.1f} min)" in printed

    # other settings: refused in one line naming the difference, before anything is trained; --overwrite retrains the
    # stages they touch (here the DiffusionNFT run of stage 3, the one the final pipeline keeps) and reloads the others
    records = {stage: (out / "stages" / stage / STAGE_RECORD).read_text() for stage in STAGES}
    for refused, difference in ((["demo", "--output-dir", str(out)], "quick True (now False)"),
                                (["demo", "--quick", "--generation-beta", "0.01", "--output-dir", str(out)],
                                 "generation_beta 0.0 (now 0.01)")):
        with pytest.raises(SystemExit) as exit:
            main(refused)
        error = capsys.readouterr().err
        assert exit.value.code == 2 and difference in error and "--overwrite" in error, error[-3000:]
        assert len(error.strip().splitlines()) == 1, error
    assert records == {stage: (out / "stages" / stage / STAGE_RECORD).read_text() for stage in STAGES}
    main(["demo", "--quick", "--overwrite", "--generation-nft-beta", "0.5", "--output-dir", str(out)])
    retrained = [stage for stage in STAGES if (out / "stages" / stage / STAGE_RECORD).read_text() != records[stage]]
    assert retrained == ["generation_nft"]
    record = json.loads((out / "stages" / "generation_nft" / STAGE_RECORD).read_text())
    assert record["settings"]["generation_nft_beta"] == 0.5 and record["settings"]["versions"]["torch"]
