"""Every benchmark, side by side on the tiny twins (CPU), with the targets we hold ourselves to.

    python benchmarks/run_all.py --output results.json

Runs each benchmark module's `measure()` in turn, prints its table, then a summary of the ratios against their
targets; the full figures go to the JSON file.
"""

import argparse
import json
import time

import cli_argument_errors
import decoder_families
import decoder_rl_step
import flow_grpo_step
import grpo_overhead
import import_time
import real_size_memory
import reconstruction_throughput
import scoring_throughput
import sharding_memory
import stage_memory

BENCHMARKS = {
    "reconstruction_throughput": reconstruction_throughput,
    "scoring_throughput": scoring_throughput,
    "grpo_overhead": grpo_overhead,
    "flow_grpo_step": flow_grpo_step,
    "decoder_rl_step": decoder_rl_step,
    "decoder_families": decoder_families,
    "stage_memory": stage_memory,
    "sharding_memory": sharding_memory,
    "real_size_memory": real_size_memory,
    "import_time": import_time,
    "cli_argument_errors": cli_argument_errors,
}

# (label, how to read it from the figures, target, whether lower is better)
TARGETS = [
    ("reward path / decoder sampling", lambda f: f["grpo_overhead"]["reward_vs_decoding"]["ratio"], 1.15, True),
    ("UnifiedGRPOTrainer / stock GRPOTrainer", lambda f: f["grpo_overhead"]["trainer_vs_stock"]["ratio"], 1.05, True),
    ("batched + cached scoring / one pair at a time", lambda f: f["scoring_throughput"]["warm_over_loop"], 3.0, False),
    ("batched scoring, cold cache / one pair at a time", lambda f: f["scoring_throughput"]["cold_over_loop"], None,
     False),
    ("pipeline batch 8 / batch 1 (images/s)", lambda f: f["reconstruction_throughput"]["batch_8_over_batch_1"], None,
     False),
    ("Flow-GRPO update, timestep_fraction 0.5 / 1.0", lambda f: f["flow_grpo_step"]["update_ratio"], None, True),
    ("Flow-GRPO rollout / stock pipeline call (worst family)",
     lambda f: f["decoder_families"]["worst_rollout_over_stock"], 1.10, True),
    ("reward decoding / stock pipeline call (worst family)", lambda f: f["decoder_families"]["worst_reward_over_stock"],
     1.10, True),
    ("DiffusionNFT / Flow-GRPO step time per image", lambda f: f["decoder_rl_step"]["nft_over_flow_grpo_time"], None,
     True),
    ("DiffusionNFT / Flow-GRPO step memory per image", lambda f: f["decoder_rl_step"]["nft_over_flow_grpo_memory"],
     None, True),
    ("cold-start step memory, checkpointed / plain", lambda f: f["stage_memory"]["cold_start_checkpointed_over_plain"],
     None, True),
    ("trained state per process, FSDP2 or ZeRO-3 / DDP (worst)",
     lambda f: f["sharding_memory"]["largest_trained_state_vs_ddp"], 0.6, True),
    ("stage-2 frozen decoder per process, sharded / DDP", lambda f: f["sharding_memory"]["understanding_frozen_decoder_vs_ddp"],
     0.6, True),
    ("stage-3 frozen encoder per process, sharded / DDP", lambda f: f["sharding_memory"]["stage3_frozen_encoder_vs_ddp"],
     0.6, True),
    ("slowest CLI argument error (s)", lambda f: max(row["seconds"] for row in f["cli_argument_errors"]["mistakes"].values()),
     2.0, True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="results.json", help="JSON file for all figures")
    args = parser.parse_args()
    figures, started = {}, time.perf_counter()
    for name, module in BENCHMARKS.items():
        print(f"\n== {name} ==")
        start = time.perf_counter()
        figures[name] = module.measure()
        module.report(figures[name])
        figures[name]["seconds"] = time.perf_counter() - start
    print(f"\n== summary ({time.perf_counter() - started:.0f} s) ==")
    print(f"{'ratio':<48}{'measured':>10}{'target':>10}{'':>6}")
    for label, read, target, lower_is_better in TARGETS:
        value = read(figures)
        verdict = "" if target is None else ("ok" if (value <= target) == lower_is_better else "MISS")
        target_text = "" if target is None else f"{'<=' if lower_is_better else '>='}{target}"
        print(f"{label:<48}{value:>10.2f}{target_text:>10}{verdict:>6}")
    with open(args.output, "w") as handle:
        json.dump(figures, handle, indent=2, default=float)
    print(f"figures written to {args.output}")


if __name__ == "__main__":
    main()
