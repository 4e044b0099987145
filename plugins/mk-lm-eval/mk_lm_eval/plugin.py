"""Entry point: the `lm_eval` evaluator and `mk lm-eval tiny`. No torch or lm-eval import here."""

from __future__ import annotations

from pathlib import Path

import typer

from mergekit_core import hookimpl


@hookimpl
def mk_evaluators():
    from mk_lm_eval.evaluator import LmEvalEvaluator

    return [LmEvalEvaluator()]


def tiny(
    out: Path = typer.Option(Path("lm-eval-tiny"), "--out", "-o", help="Directory of the tiny pool."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random base model."),
) -> None:
    """Write a tiny offline pool: a 2-layer Llama, two fine-tunes, a LoRA adapter, two task YAMLs."""
    from mergekit_core import UsageError
    from mk_lm_eval.tiny import build

    if out.exists() and any(out.iterdir()) and not (out / "tasks" / "tiny_a.yaml").is_file():
        raise UsageError(f"{out}: a folder with other files in it; give a new or empty folder for the tiny pool")
    paths = build(out, seed=seed)
    for name, path in paths.items():
        typer.echo(f"{name:12} {path}")


@hookimpl
def mk_register_commands(app):
    sub = typer.Typer(help="lm-evaluation-harness helpers (the evaluator itself is 'lm_eval').",
                      no_args_is_help=True)
    sub.command("tiny")(tiny)
    app.add_typer(sub, name="lm-eval")
