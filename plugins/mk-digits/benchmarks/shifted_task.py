"""Why the `shifted` task vector dominates task arithmetic, and which shift rule fixes it.

    python plugins/mk-digits/benchmarks/shifted_task.py --work /tmp/me/shifted \
        --out plugins/mk-digits/benchmarks/results/shifted_task.json [--seeds 0,1,2]

For every model seed it builds (or reuses) a pool in ``--work``, then, for every tasks' fine-tune,
measures its generalisation gap (train minus test accuracy of the fine-tuned model) and its task
vector's norm relative to the pretrained weights. For each shift rule of ``mk_digits.data.SHIFTS``
it makes the `shifted` task's data and head from the same pretrained backbone, fine-tunes on it
with the pool's recipe, and measures the same two numbers plus the damage: the other seven tasks'
mean validation accuracy in a task-arithmetic merge (lambda 0.3) of all eight tasks, minus the
same without the `shifted` vector. Everything is on the validation split except the gap.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from mk_digits.build import (
    BuildSettings,
    accuracy,
    build_pool,
    finetune_on,
    load_heads,
    torch_threads,
)
from mk_digits.data import SHIFT, SHIFTS, TASKS, split_indices, task_views
from mk_digits.model import backbone_from_state, make_head
from safetensors.torch import load_file

State = dict[str, torch.Tensor]


def norm(state: State) -> float:
    return float(sum((v.double() ** 2).sum() for v in state.values()) ** 0.5)


def task_arithmetic(base: State, vectors: list[State], lam: float) -> State:
    return {k: base[k] + lam * sum(v[k] for v in vectors) for k in base}


def mean_accuracy(state: State, heads: dict[str, Any], tasks: list[str], data_seed: int) -> float:
    return sum(accuracy(state, t, heads[t], "validation", data_seed) for t in tasks) / len(tasks)


def accuracy_on(state: State, x: torch.Tensor, y: torch.Tensor, head: dict[str, torch.Tensor]) -> float:
    from mk_digits.model import head_logits

    with torch.no_grad():
        return float((head_logits(backbone_from_state(state)(x), head).argmax(-1) == y).float().mean())


def measure_seed(work: Path, seed: int, lam: float, quick: bool, log) -> dict[str, Any]:
    settings = BuildSettings.quick(seed) if quick else BuildSettings(seed=seed)
    pool = work / f"pool-seed{seed}"
    build_pool(pool, settings, log=log)
    ds = settings.data_seed
    heads = load_heads(pool)
    base = load_file(str(pool / "base" / "model.safetensors"))
    tuned = {t: load_file(str(pool / t / "model.safetensors")) for t in TASKS}
    vectors = {t: {k: tuned[t][k] - base[k] for k in base} for t in TASKS}
    base_norm = norm(base)
    tasks = {t: {"relative_norm": norm(vectors[t]) / base_norm,
                 "gap": accuracy(tuned[t], t, heads[t], "train", ds) - accuracy(tuned[t], t, heads[t], "test", ds)}
             for t in TASKS}
    others = [t for t in TASKS if t != "shifted"]
    without = mean_accuracy(task_arithmetic(base, [vectors[t] for t in others], lam), heads, others, ds)
    backbone = backbone_from_state(base)
    rules = {}
    for rule, offsets in SHIFTS.items():
        views, labels = task_views("shifted", ds, shift=rule)
        split = {s: (torch.from_numpy(views[split_indices(s, ds)].reshape(-1, 64) / 16.0).float(),
                     torch.from_numpy(labels[split_indices(s, ds)])) for s in ("train", "validation", "test")}
        with torch.no_grad():
            head = make_head(backbone(split["train"][0]), split["train"][1], 10)
        model = finetune_on(backbone, *split["train"], head, settings, seed=settings.seed * 100 + TASKS.index("shifted"))
        state = {k: v.detach() for k, v in model.state_dict().items()}
        vector = {k: state[k] - base[k] for k in base}
        merged = task_arithmetic(base, [vectors[t] for t in others] + [vector], lam)
        rules[rule] = {
            "offsets": len(offsets),
            "ink_kept": float(views.sum() / task_views("upright", ds)[0].sum()),
            "zero_shot_validation": accuracy_on(base, *split["validation"], head),
            "finetuned_test": accuracy_on(state, *split["test"], head),
            "gap": accuracy_on(state, *split["train"], head) - accuracy_on(state, *split["test"], head),
            "relative_norm": norm(vector) / base_norm,
            "damage": mean_accuracy(merged, heads, others, ds) - without,
            "own_accuracy_in_merge": accuracy_on(merged, *split["validation"], head),
        }
        log(f"seed {seed}, shift {rule}: {rules[rule]}")
    return {"tasks": tasks, "shift_rules": rules}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def stat(values: list[float]) -> list[float]:
        return [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0]

    tasks = {t: {k: stat([r["tasks"][t][k] for r in runs]) for k in ("relative_norm", "gap")} for t in TASKS}
    rules = {rule: {k: stat([r["shift_rules"][rule][k] for r in runs]) for k in runs[0]["shift_rules"][rule]}
             for rule in SHIFTS}
    return {"tasks": tasks, "shift_rules": rules}


def print_tables(summary: dict[str, Any], lam: float) -> None:
    from rich.console import Console
    from rich.table import Table

    def pm(v: list[float], scale: float = 100.0, digits: int = 1) -> str:
        return f"{scale * v[0]:.{digits}f} ± {scale * v[1]:.{digits}f}"

    console = Console()
    table = Table(title=f"fine-tunes of the pool (shift rule '{SHIFT}'): gap = train - test accuracy")
    for col in ("task", "task vector / weights (%)", "gap (points)"):
        table.add_column(col)
    for t, v in summary["tasks"].items():
        table.add_row(t, pm(v["relative_norm"], digits=2), pm(v["gap"]))
    console.print(table)
    table = Table(title=f"`shifted` by shift rule; damage = other tasks' change in a task-arithmetic merge "
                        f"(lambda {lam:g}, validation)")
    for col in ("rule", "offsets", "ink kept", "zero-shot", "fine-tuned", "gap", "vector / weights (%)",
                "damage (points)", "own acc. in merge"):
        table.add_column(col)
    for rule, v in summary["shift_rules"].items():
        table.add_row(rule, str(int(v["offsets"][0])), pm(v["ink_kept"]), pm(v["zero_shot_validation"]),
                      pm(v["finetuned_test"]), pm(v["gap"]), pm(v["relative_norm"], digits=2), pm(v["damage"]),
                      pm(v["own_accuracy_in_merge"]))
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder of the pools (built when missing)")
    parser.add_argument("--out", type=Path, help="write the measurements here as JSON")
    parser.add_argument("--seeds", default="0,1,2", help="model seeds, comma-separated")
    parser.add_argument("--lambda", dest="lam", type=float, default=0.3, help="task arithmetic's lambda")
    parser.add_argument("--quick", action="store_true", help="the quick pool settings")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    with torch_threads(1):
        runs = [measure_seed(args.work, s, args.lam, args.quick, print) for s in seeds]
    summary = summarise(runs)
    print_tables(summary, args.lam)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"seeds": seeds, "lambda": args.lam, "shift_rule_of_the_pool": SHIFT,
                                        "quick": args.quick, "summary": summary, "runs": runs}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
