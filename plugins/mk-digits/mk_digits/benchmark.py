"""`mk digits bench`: every installed merge method, tuned on validation, scored on test, over seeds.

For each model seed a pool is built (cached). Each method's benchmark grid (its component's
``benchmark_grid``, else a lambda grid when it has a ``lambda`` parameter, else its defaults) is
merged in memory and scored on the validation and test splits of the eight tasks; the grid point
with the best validation accuracy averaged over tasks and seeds is chosen, and its test accuracy
is reported: mean +- sd over seeds, normalized accuracy (merged / fine-tuned, per task), and the
paired difference to task arithmetic (per seed, both methods at their chosen points). The CLIP
ViT-B/32 8-task numbers of the same methods stand beside them. Installed optimizers add the runs
they declare (``benchmark_runs``; AdaMerging's layer-wise runs): task arithmetic with the
coefficients they learn from the pool's data, one row each.

    mk digits bench [--out demo-output] [--seeds 0,1,2] [--quick] [--json]
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_core import MergekitError, PluginHost, UsageError
from mergekit_core.api import MergeConfig, optimize_and_merge, run_merge, write_json

DEFAULT_LAMBDAS = [0.1, 0.2, 0.3, 0.4, 0.5]
"""The grid of a method that has a ``lambda`` parameter and declares no benchmark grid."""

CLIP_B32 = {"zero-shot": 48.0, "fine-tuned": 90.5, "uniform": 65.8, "task_arithmetic": 69.1, "ties": 72.4}
CLIP_SOURCE = ("CLIP ViT-B/32, 8 tasks, task_vectors checkpoints (family A of shared/reference/"
               "merging-algorithms.md section 12): AdaMerging paper Table 2 (zero-shot, averaging, task "
               "arithmetic, TIES); fine-tuned from the TVQ project page (AIM-SKKU/TVQ).")
ZERO_SHOT, FINE_TUNED = "zero-shot", "fine-tuned"

Log = Callable[[str], None]


QUICK_OPTIMIZER_STEPS = 50
"""Steps of a learned run with ``--quick`` (tests of the benchmark); the optimizer's default otherwise."""


@dataclass
class LearnedRun:
    """One of an optimizer's ``benchmark_runs``: task arithmetic with the coefficients it learns
    from the pool's data (one row; nothing to tune on validation)."""

    optimizer: str
    label: str
    optimizer_params: dict[str, Any]
    max_sources = None
    benchmark_grid: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.optimizer} ({self.label})"


def learned_runs(host: PluginHost) -> list[LearnedRun]:
    """The benchmark runs every installed optimizer declares."""
    return [LearnedRun(o.name, label, dict(params)) for o in host.components("optimizer")
            for label, params in getattr(o, "benchmark_runs", {}).items()]


def grid_points(method: Any) -> list[dict[str, Any]]:
    """Every parameter combination of ``method``'s benchmark grid (``[{}]``: the defaults only)."""
    grid = getattr(method, "benchmark_grid", None)
    if grid is None:
        grid = {"lambda": DEFAULT_LAMBDAS} if any(p.name == "lambda" for p in method.params) else {}
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def pool_dir(out: Path, seed: int) -> Path:
    """The pool of model seed ``seed``: ``<out>/digits-pool`` for seed 0 (what the README's tour
    uses), ``<out>/digits-pool-seed<N>`` for the others."""
    return out / ("digits-pool" if seed == 0 else f"digits-pool-seed{seed}")


def _stat(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample sd (None with one value), in percent."""
    pct = [100.0 * v for v in values]
    return {"mean": statistics.mean(pct), "sd": statistics.stdev(pct) if len(pct) > 1 else None,
            "per_seed": pct}


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def _normalized(accs: dict[str, float], ceiling: dict[str, float]) -> float:
    return sum(accs[t] / ceiling[t] for t in accs) / len(accs)


class _Scorer:
    """Merges one pool in memory with the engine and scores the result with the `digits` evaluator."""

    def __init__(self, host: PluginHost, pool: Path, seed: int, tasks: Sequence[str], artifacts: Path) -> None:
        self.host, self.pool, self.seed, self.tasks = host, pool, seed, list(tasks)
        self.evaluator = host.get("evaluator", "digits")
        self.params = self.evaluator.resolve_params({"pool": str(pool)})
        self.artifacts = artifacts

    def _config(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        return {"sources": [{"name": t, "path": str(self.pool / t)} for t in self.tasks],
                "base_model": str(self.pool / "base"), "method": method, "method_params": params,
                "seed": self.seed, "output_dir": str(self.artifacts)}

    def _score(self, state: dict[str, Any]) -> dict[str, dict[str, float]]:
        return {split: {t: self.evaluator.evaluate(state, t, split, None, self.params)["accuracy"]
                        for t in self.tasks} for split in ("validation", "test")}

    def merge_and_score(self, method: str, params: dict[str, Any]) -> dict[str, dict[str, float]]:
        spec = MergeConfig.from_dict(self._config(method, params)).to_spec()
        return self._score(run_merge(spec, self.host, in_memory=True, write_bundle=False).state_dict)

    def learn_and_score(self, run: LearnedRun, steps: int | None) -> dict[str, dict[str, float]]:
        """Task arithmetic with the coefficients ``run``'s optimizer learns on this pool."""
        params = dict(run.optimizer_params, **({"steps": steps} if steps is not None else {}))
        data = {**self._config("task_arithmetic", {}), "evaluator": "digits",
                "evaluator_params": {"pool": str(self.pool)}, "eval_tasks": self.tasks,
                "optimizer": {"name": run.optimizer, "params": params}}
        result = optimize_and_merge(MergeConfig.from_dict(data).to_spec(), self.host, in_memory=True,
                                    write_bundle=False)
        return self._score(result.state_dict)


def run_benchmark(out: Path, host: PluginHost, seeds: Sequence[int] = (0,), quick: bool = False,
                  log: Log = print, methods: Sequence[str] | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build the pools, tune and score every method; returns the report (accuracies in percent).

    ``methods``: only these merge methods or optimizer runs (default: every installed method that
    takes 8 sources, and every optimizer's ``benchmark_runs``).
    ``progress(label)`` is called once per merge, before it runs.
    """
    from mk_digits.build import BuildSettings, build_pool, torch_threads
    from mk_digits.data import TASKS

    out = Path(out)
    started = time.time()
    chosen = [m for m in [*host.components("merge_method"), *learned_runs(host)]
              if methods is None or m.name in methods]
    if methods is not None:
        unknown = sorted(set(methods) - {m.name for m in chosen})
        if unknown:
            known = ", ".join(m.name for m in host.components("merge_method"))
            raise UsageError(f"unknown merge method(s) {', '.join(unknown)}; installed: {known}")
    skipped = {}
    for m in chosen:
        if m.max_sources is not None and m.max_sources < len(TASKS):
            skipped[m.name] = f"merges at most {m.max_sources} sources"
    runnable = [m for m in chosen if m.name not in skipped]
    scores: dict[str, dict[int, list[dict[str, dict[str, float]]]]] = {m.name: {} for m in runnable}
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {m.name: 0.0 for m in runnable}
    pools: dict[int, dict[str, Any]] = {}
    with torch_threads(1):
        for seed in seeds:
            settings = BuildSettings.quick(seed) if quick else BuildSettings(seed=seed)
            meta = build_pool(pool_dir(out, seed), settings, log=log)
            pools[seed] = meta
            scorer = _Scorer(host, pool_dir(out, seed), seed, TASKS, out / "artifacts")
            for m in runnable:
                if m.name in errors:
                    continue
                t0 = time.time()
                results = []
                for point in grid_points(m):
                    if progress:
                        progress(f"seed {seed}: {m.name} {_params_text(point)}")
                    try:
                        results.append(scorer.learn_and_score(m, QUICK_OPTIMIZER_STEPS if quick else None)
                                       if isinstance(m, LearnedRun) else scorer.merge_and_score(m.name, point))
                    except MergekitError as exc:  # a broken third-party method is a row, not the end
                        errors[m.name] = exc.message
                        log(f"{m.name} failed: {exc.message}")
                        break
                scores[m.name][seed] = results
                seconds[m.name] += time.time() - t0
    report = _report(runnable, scores, errors, seconds, pools, list(seeds), TASKS)
    report.update(skipped=skipped, quick=quick, pools=[str(pool_dir(out, s)) for s in seeds],
                  settings={str(s): pools[s]["settings"] for s in seeds},
                  build_seconds={str(s): pools[s].get("build_seconds") for s in seeds},
                  seconds=round(time.time() - started, 1))
    return report


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _at_edge(points: list[dict[str, Any]], chosen: dict[str, Any]) -> list[str]:
    """The numeric parameters (with 3 or more grid values) whose chosen value is the grid's
    smallest or largest: the optimum may lie outside the grid."""
    edge = []
    for key, value in chosen.items():
        values = sorted({p[key] for p in points if isinstance(p[key], (int, float))})
        if len(values) >= 3 and value in (values[0], values[-1]):
            edge.append(key)
    return edge


def _report(methods: list[Any], scores: dict, errors: dict[str, str], seconds: dict[str, float],
            pools: dict[int, dict], seeds: list[int], tasks: Sequence[str]) -> dict[str, Any]:
    ceiling = {s: {t: pools[s]["tasks"][t]["finetuned_test_accuracy"] for t in tasks} for s in seeds}
    zero = {s: {t: pools[s]["tasks"][t]["zero_shot_test_accuracy"] for t in tasks} for s in seeds}

    def row(name: str, test: dict[int, dict[str, float]], **extra: Any) -> dict[str, Any]:
        return {"method": name, "test": _stat([_mean(test[s]) for s in seeds]),
                "normalized": _stat([_normalized(test[s], ceiling[s]) for s in seeds]),
                "per_task": {t: 100.0 * statistics.mean(test[s][t] for s in seeds) for t in tasks},
                "clip_b32": CLIP_B32.get(name), **extra}

    rows = [row(ZERO_SHOT, zero, kind="baseline", note="the pretrained backbone with the frozen heads"),
            row(FINE_TUNED, ceiling, kind="baseline", note="one fine-tuned model per task (the ceiling)")]
    chosen_test: dict[str, dict[int, dict[str, float]]] = {}
    for m in methods:
        if m.name in errors:
            rows.append({"method": m.name, "kind": "merge", "error": errors[m.name]})
            continue
        points = grid_points(m)
        val = [statistics.mean(_mean(scores[m.name][s][i]["validation"]) for s in seeds) for i in range(len(points))]
        best = max(range(len(points)), key=val.__getitem__)
        chosen_test[m.name] = {s: scores[m.name][s][best]["test"] for s in seeds}
        grid = [{"params": p, "validation": 100.0 * v,
                 "test": 100.0 * statistics.mean(_mean(scores[m.name][s][i]["test"]) for s in seeds)}
                for i, (p, v) in enumerate(zip(points, val))]
        rows.append(row(m.name, chosen_test[m.name], kind="merge",
                        params=m.optimizer_params if isinstance(m, LearnedRun) else points[best], grid=grid,
                        at_grid_edge=_at_edge(points, points[best]), validation=100.0 * val[best],
                        seconds=round(seconds[m.name], 1)))
    reference = chosen_test.get("task_arithmetic")
    for r in rows:
        test = chosen_test.get(r["method"]) if r.get("kind") == "merge" else (
            zero if r["method"] == ZERO_SHOT else ceiling)
        if reference is not None and test is not None and "error" not in r:
            r["vs_task_arithmetic"] = _stat([_mean(test[s]) - _mean(reference[s]) for s in seeds])
    clip_ta = CLIP_B32["task_arithmetic"]
    for r in rows:
        r["clip_b32_vs_task_arithmetic"] = None if r.get("clip_b32") is None else r["clip_b32"] - clip_ta
    return {"benchmark": "digits", "split": "test (parameters chosen on validation)", "seeds": seeds,
            "tasks": list(tasks), "rows": rows, "clip_source": CLIP_SOURCE}


# --------------------------------------------------------------------------- output


def _pm(stat: dict[str, Any] | None, signed: bool = False) -> str:
    if stat is None:
        return "–"
    mean = f"{stat['mean']:+.1f}" if signed else f"{stat['mean']:.1f}"
    return mean if stat["sd"] is None else f"{mean} ± {stat['sd']:.1f}"


def _clip(r: dict[str, Any]) -> str:
    if r.get("clip_b32") is None:
        return "–"
    if r["method"] in (ZERO_SHOT, FINE_TUNED, "task_arithmetic"):
        return f"{r['clip_b32']:.1f}"
    return f"{r['clip_b32']:.1f} ({r['clip_b32_vs_task_arithmetic']:+.1f})"


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The summary table's header and cells (strings), shared by the console and Markdown."""
    header = ["method", "chosen on validation", "test accuracy", "normalized", "vs task arithmetic",
              "CLIP ViT-B/32 (vs TA)"]
    cells = []
    for r in report["rows"]:
        if "error" in r:
            cells.append([r["method"], "–", "failed", "–", "–", r["error"]])
            continue
        params = _params_text(r["params"]) if r.get("params") else ("defaults" if r["kind"] == "merge" else "–")
        if r.get("at_grid_edge"):
            params += f" ({', '.join(r['at_grid_edge'])} at the grid's edge)"
        cells.append([r["method"], params, _pm(r["test"]), _pm(r["normalized"]),
                      _pm(r.get("vs_task_arithmetic"), signed=True), _clip(r)])
    return header, cells


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    n = len(report["seeds"])
    spread = "mean ± sd over seeds " + ",".join(map(str, report["seeds"])) if n > 1 else f"seed {report['seeds'][0]}"
    table = Table(title=f"digits benchmark: 8 tasks, test accuracy %, {spread}")
    header, cells = table_rows(report)
    for col in header:
        table.add_column(col)
    for c in cells:
        table.add_row(*c)
    console = Console()
    if not console.is_terminal:  # a pipe or a file: the table's natural width, not 80 columns
        console = Console(width=160)
    console.print(table)
    for name, why in report.get("skipped", {}).items():
        console.print(f"skipped {name}: it {why}", style="dim")


def markdown(report: dict[str, Any]) -> str:
    """The summary, per-task and task-arithmetic-curve tables as Markdown (docs/benchmark.md)."""
    header, cells = table_rows(report)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    tasks = report["tasks"]
    lines += ["", "Per task (test accuracy %, mean over seeds):", "",
              "| method | " + " | ".join(tasks) + " |", "|" + " --- |" * (len(tasks) + 1)]
    for r in report["rows"]:
        if "error" not in r:
            lines.append(f"| {r['method']} | " + " | ".join(f"{r['per_task'][t]:.1f}" for t in tasks) + " |")
    ta = next((r for r in report["rows"] if r["method"] == "task_arithmetic" and "grid" in r), None)
    if ta is not None:
        lines += ["", "Task arithmetic over its grid (mean accuracy %, mean over seeds):", "",
                  "| lambda | " + " | ".join(f"{g['params']['lambda']:g}" for g in ta["grid"]) + " |",
                  "|" + " --- |" * (len(ta["grid"]) + 1),
                  "| validation | " + " | ".join(f"{g['validation']:.1f}" for g in ta["grid"]) + " |",
                  "| test | " + " | ".join(f"{g['test']:.1f}" for g in ta["grid"]) + " |"]
    return "\n".join(lines) + "\n"


def write_outputs(report: dict[str, Any], directory: Path) -> tuple[list[Path], str | None]:
    """digits_benchmark.json, .md and (with matplotlib) .png in ``directory``; returns the paths
    and a note when the PNG was skipped."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "digits_benchmark.json", directory / "digits_benchmark.md"]
    write_json(written[0], report)
    written[1].write_text(markdown(report))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written, "no PNG chart: matplotlib is not installed (pip install 'mk-digits[plot]')"
    rows = [r for r in report["rows"] if "error" not in r][::-1]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.4))
    ys = range(len(rows))
    ax.barh(ys, [r["test"]["mean"] for r in rows], xerr=[r["test"]["sd"] or 0.0 for r in rows],
            color=["#999999" if r["kind"] == "baseline" else "#4c72b0" for r in rows], capsize=3)
    clip = [(y, r["clip_b32"]) for y, r in zip(ys, rows) if r.get("clip_b32") is not None]
    if clip:
        ax.scatter([c for _, c in clip], [y for y, _ in clip], marker="D", color="#c44e52", zorder=3,
                   label="CLIP ViT-B/32, 8 tasks (published)")
        ax.legend(loc="lower right")
    ax.set_yticks(list(ys), [r["method"] for r in rows])
    ax.set_xlabel("mean test accuracy over 8 tasks (%), error bars: sd over seeds")
    ax.set_title(f"digits benchmark, seeds {','.join(map(str, report['seeds']))}, parameters tuned on validation")
    fig.tight_layout()
    written.append(directory / "digits_benchmark.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written, None


def bench(out: Path, seeds: Sequence[int], quick: bool = False, as_json: bool = False,
          methods: Sequence[str] | None = None, host: PluginHost | None = None) -> dict[str, Any]:
    """What `mk digits bench` does: run, print the table (or the JSON), write the outputs."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    err = Console(stderr=True)
    out = Path(out).resolve()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        host = host or PluginHost()
        from mk_digits.data import TASKS

        merges = sum(len(grid_points(m)) for m in [*host.components("merge_method"), *learned_runs(host)]
                     if (methods is None or m.name in methods) and (m.max_sources or len(TASKS)) >= len(TASKS))
        task = bar.add_task("building the pool", total=merges * len(seeds))

        def step(label: str) -> None:
            bar.update(task, description=label, advance=1)

        report = run_benchmark(out, host, seeds=seeds, quick=quick, methods=methods,
                               log=lambda m: err.print(m, style="dim"), progress=step)
    paths, note = write_outputs(report, out / "digits-benchmark")
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    for path in paths:
        err.print(f"wrote {path}")
    if note:
        err.print(note, style="yellow")
    err.print(f"{report['seconds']:.0f} s in all (pool builds: "
              + ", ".join(f"{s} s" for s in report["build_seconds"].values()) + ", reused pools keep their time)")
    return report


def main(argv: list[str] | None = None) -> None:
    """``python -m mk_digits.benchmark``: the same as ``mk digits bench``."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-output", help="where the pools, and the results in digits-benchmark/, go")
    parser.add_argument("--seeds", default="0", help="model seeds, comma-separated (e.g. 0,1,2)")
    parser.add_argument("--quick", action="store_true", help="smaller pools (fewer training steps)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    args = parser.parse_args(argv)
    try:
        seeds = parse_seeds(args.seeds)
        bench(Path(args.out), seeds, quick=args.quick, as_json=args.json)
    except MergekitError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; a bad list is a UsageError naming it."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds: expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds: expected distinct comma-separated integers such as 0,1,2, got {text!r}")
    return seeds


if __name__ == "__main__":
    main()
