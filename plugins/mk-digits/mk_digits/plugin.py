"""Entry point: the `digits` evaluator and the `mk digits` commands. No torch import here."""

from __future__ import annotations

from pathlib import Path

import typer

from mergekit_core import hookimpl


@hookimpl
def mk_evaluators():
    from mk_digits.evaluator import DigitsEvaluator

    return [DigitsEvaluator()]


def build(
    out: Path = typer.Option(Path("digits-pool"), "--out", "-o", help="Directory of the pool."),
    seed: int = typer.Option(0, "--seed", help="Model seed (pretraining and fine-tuning)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer training steps (tests, smoke runs)."),
) -> None:
    """Build the 8-task pool: pretrained backbone, fine-tunes, LoRA adapters, frozen heads."""
    from rich.console import Console
    from rich.table import Table

    from mk_digits.build import BuildSettings, build_pool

    console = Console()
    settings = BuildSettings.quick(seed) if quick else BuildSettings(seed=seed)
    meta = build_pool(out, settings, log=lambda m: console.print(m, style="dim"))
    table = Table(title=f"digits pool in {out} (test accuracy)")
    for col in ("task", "zero-shot", "fine-tuned", "LoRA"):
        table.add_column(col)
    for task, t in meta["tasks"].items():
        table.add_row(task, f"{t['zero_shot_test_accuracy']:.3f}", f"{t['finetuned_test_accuracy']:.3f}",
                      f"{t['lora_test_accuracy']:.3f}")
    console.print(table)
    console.print(f"built in {meta.get('build_seconds', 0):.0f} s (reused when the settings match)")


def bench(
    out: Path = typer.Option(Path("demo-output"), "--out", "-o",
                             help="Where the pools (digits-pool*, cached) and the results (digits-benchmark/) go."),
    seeds: str = typer.Option("0", "--seeds", help="Model seeds, comma-separated: 0,1,2 gives mean ± sd."),
    quick: bool = typer.Option(False, "--quick", help="Smaller pools (fewer training steps; tests, smoke runs)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of the table."),
    method: list[str] = typer.Option(None, "--method", "-m", help="Only this merge method (repeatable)."),
) -> None:
    """Tune every installed merge method on validation, score it on test, one table.

    Each method's parameters are chosen from its benchmark grid by mean validation accuracy over the seeds; the table shows test accuracy, normalized accuracy, the paired difference to task arithmetic, and the published CLIP ViT-B/32 numbers of the same methods.
    """
    from mk_digits.benchmark import bench as run
    from mk_digits.benchmark import parse_seeds

    run(out, parse_seeds(seeds), quick=quick, as_json=as_json, methods=method or None)


@hookimpl
def mk_register_commands(app):
    sub = typer.Typer(help="The offline digits benchmark (scikit-learn's handwritten digits, 8 tasks).",
                      no_args_is_help=True)
    sub.command("build")(build)
    sub.command("bench")(bench)
    app.add_typer(sub, name="digits")
