"""What the commands that evaluate share: evaluator parameters from the command line, and the
tables of an evaluation and of a sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mergekit_core.config import parse_key_values


def eval_params(items: list[str] | None) -> dict[str, Any]:
    """``--eval-param k=v``; values naming an existing relative path become absolute (cwd)."""
    return {k: (str(Path(v).absolute()) if isinstance(v, str) and v and Path(v).exists() else v)
            for k, v in parse_key_values(list(items or [])).items()}


def print_eval(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['method']} on {result['split']}" + (f" ({result['subset']})" if result["subset"] else ""))
    for col in ("task", "metric", "merged", "own model", "interference"):
        table.add_column(col, overflow="fold")
    for task, e in result["tasks"].items():
        own = "-" if e["individual"] is None else f"{e['individual']:.4f}"
        delta = "-" if e["interference_delta"] is None else f"{e['interference_delta']:+.4f}"
        table.add_row(task, e["metric"], f"{e['value']:.4f}", own, delta)
    Console().print(table)
    s = result["summary"]
    if s["mean_metric"] is not None:
        typer.echo(f"mean {s['mean_metric']:.4f}" + (f", normalized {s['mean_normalized']:.4f}" if s["mean_normalized"] else "")
                   + (f", worst interference {s['min_interference_delta']:+.4f}" if s["min_interference_delta"] is not None else ""))
    written = result.get("written") or {}
    for label, key in (("results", "results"), ("in the run bundle", "run_bundle"), ("index", "index")):
        if written.get(key):
            typer.echo(f"{label}: {written[key]}")


def point_text(point: dict[str, Any]) -> str:
    """A sweep point as people write it: ``lambda=0.3, density=0.2``."""
    return ", ".join(f"{k}={v}" for k, v in point.items())


def print_sweep(result: dict[str, Any], limit: int = 20) -> None:
    """The sweep's points, best first (the ranking criterion's score), with each task's metric."""
    from rich.console import Console
    from rich.table import Table

    scored = sorted((r for r in result["points"] if r.get("score") is not None),
                    key=lambda r: (-r["score"], -(r["summary"].get("mean_metric") or float("-inf"))))
    console = Console()
    tasks = list(result.get("eval_tasks") or [])
    per_task = console.width >= 48 + 9 * len(tasks)  # else one "worst task" column keeps the table legible
    table = Table(title=f"sweep: {result['method']} on {result['split']}, ranked by {result['ranking']}")
    for col in ("rank", "point", "score", "mean", *(tasks if per_task else ["worst task"])):
        table.add_column(col, overflow="fold", justify="left" if col in ("point", "worst task") else "right")
    for rank, r in enumerate(scored[:limit], 1):
        point = point_text(r["point"])
        metrics = r.get("metrics") or {}
        if per_task:
            cells = [f"{metrics.get(t, float('nan')):.4f}" for t in tasks]
        else:
            deltas = {t: d for t, d in (r.get("interference_delta") or {}).items() if d is not None}
            worst = min(deltas, key=deltas.get) if deltas else min(metrics, key=metrics.get, default="-")
            cells = [f"{worst} {metrics.get(worst, float('nan')):.4f}"]
        table.add_row(str(rank), point, f"{r['score']:+.4f}", f"{r['summary']['mean_metric']:.4f}", *cells)
    console.print(table)
    skipped = [r for r in result["points"] if r.get("score") is None and not r.get("error")]
    more = len(scored) - limit
    if more > 0:
        typer.echo(f"{more} more points in the results file (or --json)")
    if skipped:
        typer.echo(f"{len(skipped)} {'point' if len(skipped) == 1 else 'points'} skipped "
                   f"({skipped[0].get('skipped') or 'no score'})")


def print_sweep_points(result: dict[str, Any], limit: int = 50, order: str = "score") -> None:
    """``mk sweep show``: every point of a sweep summary (best first, or in evaluation order), its
    score and mean, and what the search predicted for it when it recorded that (a Bayesian search:
    phase, GP mean and deviation)."""
    from rich.console import Console
    from rich.table import Table

    points = list(enumerate(result["points"], 1))
    if order == "score":
        points.sort(key=lambda t: (t[1].get("score") is None, -(t[1].get("score") or 0.0),
                                   -((t[1].get("summary") or {}).get("mean_metric") or float("-inf"))))
    best = result.get("best") or {}
    predicted = any(r.get("proposal") for _, r in points)
    search = result.get("search") or {}
    table = Table(title=f"sweep ({search.get('type', '?')}): {result.get('method')} on {result.get('split')}, "
                        f"scored by {result.get('ranking')}")
    columns = ["#", "point", "score", "mean"] + (["phase", "predicted", "± sd"] if predicted else [])
    for col in columns:
        table.add_column(col, overflow="fold", justify="left" if col in ("point", "phase") else "right")
    for number, r in points[:limit]:
        score = "-" if r.get("score") is None else f"{r['score']:+.4f}"
        mean = (r.get("summary") or {}).get("mean_metric")
        mark = " *" if best and r.get("point") == best.get("point") else ""
        row = [f"{number}{mark}", point_text(r["point"]), score, "-" if mean is None else f"{mean:.4f}"]
        if predicted:
            p = r.get("proposal") or {}
            row += [str(p.get("phase", "-")),
                    "-" if p.get("mean") is None else f"{p['mean']:+.4f}",
                    "-" if p.get("sd") is None else f"{p['sd']:.4f}"]
        table.add_row(*row)
    Console().print(table)
    if len(points) > limit:
        typer.echo(f"{len(points) - limit} more points (--limit, or --json)")
    warm = (result.get("warm_start") or {})
    if warm.get("points"):
        typer.echo(f"warm start: {warm['points']} points from {len(warm.get('used') or {})} earlier sweep(s)")
    if best:
        typer.echo(f"best (*): {point_text(best['point'])}, score {best['score']:+.4f}")
    if result.get("plot"):
        typer.echo(f"plot: {result['plot']}")
