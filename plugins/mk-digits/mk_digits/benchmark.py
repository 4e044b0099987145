"""The README's first command: build the digits pool (cached), merge it with every installed method
at its default settings, evaluate each merge on the 8 test sets, and print one table.

Also runs one small sweep (task arithmetic's lambda on the validation split, ranked by the worst
task's interference) to show the search loop. Writes the table as JSON and, when matplotlib is
installed, as a PNG bar chart, in ``<out>/digits-benchmark/``.

    python -m mk_digits.benchmark [--out demo-output] [--quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from mergekit_core import MergekitError, PluginHost
from mergekit_core.api import MergeConfig, evaluate_result, make_setup, run_merge, run_sweep, write_json
from mk_digits.build import BuildSettings, build_pool
from mk_digits.data import TASKS


def _row(name: str, accs: dict[str, float], ceiling: dict[str, float], note: str = "") -> dict[str, Any]:
    worst = min(accs, key=accs.get)
    return {
        "method": name,
        "mean_accuracy": sum(accs.values()) / len(accs),
        "mean_normalized": sum(accs[t] / ceiling[t] for t in accs) / len(accs),
        "worst_task": worst, "worst_accuracy": accs[worst], "per_task": accs, "note": note,
    }


def _merge_and_score(host: PluginHost, setup: Any, config: dict[str, Any]) -> dict[str, float]:
    """Merge in memory, evaluate on every task, record the run; returns task -> accuracy."""
    spec = MergeConfig.from_dict(config).to_spec()
    result = run_merge(spec, host, in_memory=True)
    evaluation = evaluate_result(setup, host, spec, result)
    return {t: e["value"] for t, e in evaluation["tasks"].items()}


def run_benchmark(out: Path, host: PluginHost, quick: bool = False, log: Any = print) -> dict[str, Any]:
    pool = out / "digits-pool"
    settings = BuildSettings.quick() if quick else BuildSettings()
    meta = build_pool(pool, settings, log=log)
    ceiling = {t: meta["tasks"][t]["finetuned_test_accuracy"] for t in TASKS}
    zero = {t: meta["tasks"][t]["zero_shot_test_accuracy"] for t in TASKS}
    artifacts = out / "artifacts"
    setup = make_setup(host, "digits", {"pool": str(pool)}, list(TASKS), "test", None, artifacts)
    base = {"sources": [str(pool / t) for t in TASKS], "base_model": str(pool / "base"),
            "output_dir": str(artifacts), "output": {"kind": "model"}}
    rows = [_row("zero-shot (pretrained backbone)", zero, ceiling),
            _row("fine-tuned, one model per task (ceiling)", ceiling, ceiling)]
    for method in host.components("merge_method"):
        if method.max_sources is not None and method.max_sources < len(TASKS):
            log(f"skipping {method.name}: it merges at most {method.max_sources} sources")
            continue
        started = time.time()
        try:
            accs = _merge_and_score(host, setup, {**base, "method": method.name})
        except MergekitError as exc:  # a broken third-party method is a row, not the end of the run
            log(f"{method.name} failed: {exc.message}")
            rows.append({"method": method.name, "error": exc.message, "note": "failed"})
            continue
        rows.append(_row(method.name, accs, ceiling, f"defaults, {time.time() - started:.1f} s"))
    sweep_cfg = MergeConfig.from_dict({
        **base, "method": "task_arithmetic", "evaluator": "digits", "evaluator_params": {"pool": str(pool)},
        "split": "validation", "search": {"type": "grid", "grid": {"lambda": [0.05, 0.1, 0.15, 0.2, 0.3, 0.4]}}})
    sweep = run_sweep(sweep_cfg, host)
    best = sweep["best"]["point"]["lambda"]
    accs = _merge_and_score(host, setup, {**base, "method": "task_arithmetic", "method_params": {"lambda": best}})
    rows.append(_row(f"task_arithmetic, lambda={best:g} (sweep on validation)", accs, ceiling,
                     "max-min interference on validation"))
    return {"pool": str(pool), "settings": meta["settings"], "split": "test", "rows": rows,
            "sweep": sweep["path"]}


def write_outputs(report: dict[str, Any], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "digits_benchmark.json"]
    write_json(written[0], report)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    rows = [r for r in report["rows"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    ax.barh([r["method"] for r in rows][::-1], [100 * r["mean_accuracy"] for r in rows][::-1], color="#4c72b0")
    ax.set_xlabel("mean test accuracy over 8 tasks (%)")
    ax.set_title("digits benchmark: merged models")
    fig.tight_layout()
    written.append(directory / "digits_benchmark.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="digits benchmark (8 tasks, test accuracy)")
    for col in ("method", "mean acc", "normalized", "worst task"):
        table.add_column(col)
    for r in report["rows"]:
        if "error" in r:
            table.add_row(r["method"], "-", "-", f"failed: {r['error']}")
            continue
        table.add_row(r["method"], f"{100 * r['mean_accuracy']:.1f}", f"{100 * r['mean_normalized']:.1f}",
                      f"{r['worst_task']} {100 * r['worst_accuracy']:.1f}")
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-output", help="where the pool, merges and results go")
    parser.add_argument("--quick", action="store_true", help="a faster, smaller pool build")
    args = parser.parse_args(argv)
    from rich.console import Console

    console = Console()
    out = Path(args.out).resolve()
    try:
        report = run_benchmark(out, PluginHost(), quick=args.quick, log=lambda m: console.print(m, style="dim"))
    except MergekitError as exc:
        console.print(f"[red]Error:[/] {exc}")
        raise SystemExit(exc.exit_code) from None
    print_table(report)
    for path in write_outputs(report, out / "digits-benchmark"):
        console.print(f"wrote {path}")
    console.print(f"run bundles and evaluations: {out / 'artifacts' / 'merged'}")


if __name__ == "__main__":
    main()


