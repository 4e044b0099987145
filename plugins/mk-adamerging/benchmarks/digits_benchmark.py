"""AdaMerging on the digits pool: task-wise, layer-wise and AdaMerging++ (both objectives) against
task arithmetic with its lambda tuned on the validation split, over several pool seeds.

    python plugins/mk-adamerging/benchmarks/digits_benchmark.py --seeds 0,1,2 --out /tmp/ada-bench

Builds (or reuses) one pool per seed under OUT/pools, merges the 8 full fine-tunes, and reports
test accuracy and normalized accuracy (merged / fine-tuned, per task, averaged) per method: mean
and standard deviation over seeds, the per-task accuracies, steps per second and peak memory of
the adaptation. Nothing is tuned for AdaMerging: the official defaults (init 0.3, Adam 1e-3,
batch 16, 2 batches per task per step, clamp to [0, 1]) with ``--steps`` (official 500).
Writes OUT/adamerging_digits.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from mk_digits.build import BuildSettings, build_pool
from mk_digits.data import TASKS

from mergekit_core.api import MergeConfig, make_setup, optimize_and_merge, run_merge, score
from mergekit_core.testing import fresh_host

HOST = fresh_host(entry_points=True)
TA_GRID = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6]
VARIANTS = {  # name -> adamerging params
    "task-wise AdaMerging (entropy)": {"granularity": "task", "objective": "entropy"},
    "layer-wise AdaMerging (entropy)": {"granularity": "layer", "objective": "entropy"},
    "layer-wise AdaMerging++ (entropy)": {"granularity": "layer", "objective": "entropy", "plus": True},
    "task-wise AdaMerging++ (entropy)": {"granularity": "task", "objective": "entropy", "plus": True},
    "task-wise AdaMerging (cross_entropy)": {"granularity": "task", "objective": "cross_entropy"},
    "task-wise AdaMerging++ (cross_entropy)": {"granularity": "task", "objective": "cross_entropy", "plus": True},
    "layer-wise AdaMerging (cross_entropy)": {"granularity": "layer", "objective": "cross_entropy"},
    "layer-wise AdaMerging++ (cross_entropy)": {"granularity": "layer", "objective": "cross_entropy", "plus": True},
}


def pool_for(seed: int, root: Path, quick: bool) -> Path:
    path = root / f"pool_seed{seed}"
    if not (path / "pool.json").is_file():
        build_pool(path, BuildSettings.quick(seed) if quick else BuildSettings(seed=seed))
    return path


def accuracies(pool: Path, state: dict, split: str, out: Path) -> dict[str, float]:
    setup = make_setup(HOST, "digits", {"pool": str(pool)}, TASKS, split, None, out)
    return {t.name: score(setup, state, t)[0]["accuracy"] for t in setup.tasks}


def base_config(pool: Path, out: Path) -> dict[str, Any]:
    return {"sources": [str(pool / t) for t in TASKS], "base_model": str(pool / "base"), "method": "task_arithmetic",
            "evaluator": "digits", "evaluator_params": {"pool": str(pool)}, "eval_tasks": TASKS,
            "output_dir": str(out / "runs"), "output": {"kind": "model"}}


def tuned_task_arithmetic(pool: Path, out: Path) -> tuple[float, dict[str, float]]:
    best = None
    for lam in TA_GRID:
        spec = MergeConfig.from_dict({**base_config(pool, out), "method_params": {"lambda": lam}}).to_spec()
        state = run_merge(spec, HOST, in_memory=True, write_bundle=False).state_dict
        val = statistics.mean(accuracies(pool, state, "validation", out).values())
        if best is None or val > best[0]:
            best = (val, lam, state)
    return best[1], accuracies(pool, best[2], "test", out)


def adamerging(pool: Path, out: Path, params: dict[str, Any], steps: int, seed: int
               ) -> tuple[dict[str, float], dict[str, Any]]:
    data = {**base_config(pool, out), "seed": seed,
            "optimizer": {"name": "adamerging", "params": {**params, "steps": steps}}}
    result = optimize_and_merge(MergeConfig.from_dict(data).to_spec(), HOST, in_memory=True, write_bundle=False)
    report = result.metadata["optimizer"]["report"]
    return accuracies(pool, result.state_dict, "test", out), report


def normalized(acc: dict[str, float], finetuned: dict[str, float]) -> float:
    return statistics.mean(acc[t] / finetuned[t] for t in TASKS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="pool seeds, comma separated")
    parser.add_argument("--steps", type=int, default=500, help="AdaMerging steps (official: 500)")
    parser.add_argument("--out", type=Path, required=True, help="a new or previous output folder of this script")
    parser.add_argument("--quick", action="store_true", help="quick pools (tests of this script)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 suits these small models)")
    parser.add_argument("--variants", default="all", help="comma-separated variant names, or all")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = VARIANTS if args.variants == "all" else {k: VARIANTS[k] for k in args.variants.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}

    def record(name: str, seed: int, acc: dict[str, float], finetuned: dict[str, float], **extra: Any) -> None:
        row = rows.setdefault(name, {"per_seed": {}})
        row["per_seed"][seed] = {"test_accuracy": statistics.mean(acc.values()),
                                 "normalized_accuracy": normalized(acc, finetuned), "per_task": acc, **extra}

    for seed in seeds:
        started = time.perf_counter()
        pool = pool_for(seed, args.out / "pools", args.quick)
        meta = json.loads((pool / "pool.json").read_text())
        finetuned = {t: meta["tasks"][t]["finetuned_test_accuracy"] for t in TASKS}
        record("fine-tuned (each task its own model)", seed, finetuned, finetuned)
        zero = {t: meta["tasks"][t]["zero_shot_test_accuracy"] for t in TASKS}
        record("zero-shot (base)", seed, zero, finetuned)
        lam, acc = tuned_task_arithmetic(pool, args.out)
        record("task arithmetic (lambda tuned on validation)", seed, acc, finetuned, lam=lam)
        for name, params in variants.items():
            acc, report = adamerging(pool, args.out, params, args.steps, seed)
            record(name, seed, acc, finetuned, steps_per_second=report["steps_per_second"],
                   peak_memory_mb=report["peak_memory_mb"], loss_first=report["loss_first"],
                   loss_last=report["loss_last"], mean_lambda=report["mean_lambda"])
        print(f"seed {seed} done in {time.perf_counter() - started:.0f} s", flush=True)

    for row in rows.values():
        for key in ("test_accuracy", "normalized_accuracy"):
            vals = [v[key] for v in row["per_seed"].values()]
            row[key] = {"mean": statistics.mean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0}
        row["per_task_mean"] = {t: statistics.mean(v["per_task"][t] for v in row["per_seed"].values()) for t in TASKS}
        sps = [v["steps_per_second"] for v in row["per_seed"].values() if "steps_per_second" in v]
        if sps:
            row["steps_per_second"] = statistics.median(sps)
            row["peak_memory_mb"] = max(v["peak_memory_mb"] for v in row["per_seed"].values())
    result = {"seeds": seeds, "steps": args.steps, "threads": args.threads, "quick": args.quick,
              "task_arithmetic_grid": TA_GRID, "rows": rows}
    (args.out / "adamerging_digits.json").write_text(json.dumps(result, indent=1))
    print(table(result))


def table(result: dict[str, Any]) -> str:
    head = ("| method | test acc. (mean ± sd) | normalized acc. | " + " | ".join(TASKS) + " | steps/s |\n|---|---|---|"
            + "---|" * len(TASKS) + "---|")
    lines = [head]
    for name, row in result["rows"].items():
        acc, norm = row["test_accuracy"], row["normalized_accuracy"]
        per_task = " | ".join(f"{100 * row['per_task_mean'][t]:.1f}" for t in TASKS)
        speed = f"{row['steps_per_second']:.1f}" if "steps_per_second" in row else ""
        lines.append(f"| {name} | {100 * acc['mean']:.1f} ± {100 * acc['sd']:.1f} | "
                     f"{100 * norm['mean']:.1f} ± {100 * norm['sd']:.1f} | {per_task} | {speed} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
