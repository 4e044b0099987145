"""`mk evaluate` and `mk sweep` (run a sweep, or `mk sweep show` a finished one)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from mergekit_core.cli.evaluation_view import (
    eval_params,
    point_text,
    print_eval,
    print_sweep,
)
from mergekit_core.errors import UsageError
from mergekit_core.plugins import PluginHost


def merge_recipe(model_dir: Path) -> Any:
    """The spec of the merge that wrote ``model_dir`` (from the recipe in its safetensors header),
    or None when mk did not write it or its sources are gone."""
    from mergekit_core.config import MergeConfig
    from mergekit_core.errors import MergekitError
    from mergekit_core.io.safetensors_header import read_header

    for shard in sorted(model_dir.glob("*.safetensors"))[:1]:
        try:
            recipe = json.loads(read_header(shard).metadata.get("mergekit_recipe", "null") or "null")
            if isinstance(recipe, dict) and isinstance(recipe.get("config"), dict):
                return MergeConfig.from_dict(recipe["config"]).to_spec()
        except (MergekitError, ValueError):
            return None
    return None


def register(app: typer.Typer, host: PluginHost) -> None:
    @app.command("evaluate")
    def evaluate(
        paths: list[str] = typer.Argument(..., help="A run bundle (runs/run_...) or a model directory."),
        tasks: list[str] = typer.Option(None, "--tasks", "-t", help="Tasks to evaluate (default: all)."),
        split: str = typer.Option("test", "--split", help="Split: train, validation or test."),
        evaluator: str = typer.Option(None, "--evaluator", "-e", help="Evaluator (default: the run's)."),
        param: list[str] = typer.Option(None, "--param", "-p", help="Evaluator parameter KEY=VALUE (repeat)."),
        max_samples: int = typer.Option(None, "--max-samples", help="Evaluate a deterministic stratified subset."),
        output_dir: Path = typer.Option(Path("artifacts"), "--output-dir",
                                        help="Where results of a model directory go (a run bundle's go into "
                                             "the bundle's own folder)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Evaluate a merged model on named tasks and record the results."""
        path = Path(paths[0])
        if len(paths) > 1:  # `--tasks a b` leaves b as a positional word
            if not tasks:
                raise UsageError(f"give one path to evaluate, got {len(paths)}")
            tasks = list(tasks) + paths[1:]
        from mergekit_core.config import MergeConfig, SourceSpec
        from mergekit_core.evaluation.evaluate import evaluate_merge
        from mergekit_core.evaluation.scoring import make_setup, setup_from_spec
        from mergekit_core.io.destination import check_inside_nothing
        from mergekit_core.outputs import combo_dir, read_json

        meta_path = path / "merge_metadata.json"
        subset = {"max_samples": max_samples} if max_samples else None
        if meta_path.is_file():
            meta = read_json(meta_path)
            spec = MergeConfig.from_dict(meta["config"]).to_spec()
            setup = setup_from_spec(host, spec, evaluator=evaluator, params=eval_params(param),
                                    tasks=tasks, split=split, subset=subset)
            model = meta["output"]["path"]
            if meta["output"]["kind"] != "model" or model is None:
                raise UsageError(f"{path}: the run saved no full model to evaluate; merge with output.kind: model")
            result = evaluate_merge(setup, host, model, method=meta["method"], sources=spec.sources,
                                    base_model=spec.base_model, combo_dir=path.parent.parent, tag=path.name,
                                    params=meta["params"], run_dir=path)
        else:
            if not (path / "config.json").is_file() and not list(path.glob("*.safetensors")):
                raise UsageError(f"{path}: neither a run bundle (merge_metadata.json) nor a model directory")
            check_inside_nothing(output_dir, [path], "results folder (--output-dir)")
            setup = make_setup(host, evaluator, eval_params(param), tasks, split, subset, output_dir)
            spec = merge_recipe(path)
            if spec is not None:  # mk wrote it: score it against its own sources, as a run bundle is
                result = evaluate_merge(setup, host, str(path), method=spec.method.name, sources=spec.sources,
                                        base_model=spec.base_model, tag=path.name, params=spec.method.params,
                                        combo_dir=combo_dir(output_dir, spec.method.name, spec.task_combo))
            else:
                result = evaluate_merge(setup, host, str(path), method="external",
                                        sources=[SourceSpec(path.name, path)], base_model=None,
                                        combo_dir=combo_dir(output_dir, "external", path.name), tag=path.name)
        if as_json:
            typer.echo(json.dumps(result, indent=2, default=str))
        else:
            print_eval(result)

    sweep_app = typer.Typer(cls=_sweep_group(), help=(
        "Evaluate a grid (or a plugin's search) of merges: 'mk sweep CONFIG' runs one, "
        "'mk sweep show SWEEP_JSON' prints a finished one."))
    app.add_typer(sweep_app, name="sweep")

    @sweep_app.command("show")
    def show(
        paths: list[Path] = typer.Argument(..., help="Sweep summaries (sweep_*.json in the combo's sweeps/ folder)."),
        limit: int = typer.Option(50, "--limit", "-n", min=1, help="Show at most this many points of each."),
        order: str = typer.Option("score", "--order", help="score (best first) or run (evaluation order)."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON (a list for several)."),
    ) -> None:
        """Print finished sweeps' points as tables (with a Bayesian search's predictions)."""
        from mergekit_core.cli.evaluation_view import print_sweep_points
        from mergekit_core.outputs import read_json

        if order not in ("score", "run"):
            raise UsageError(f"--order must be score or run, got {order!r}")
        results = []
        for path in paths:
            try:
                result = read_json(path)
            except (OSError, ValueError) as exc:
                raise UsageError(f"{path}: cannot read a sweep summary ({exc})",
                                 hint="give a sweep_*.json that mk sweep wrote") from None
            if not isinstance(result, dict) or not isinstance(result.get("points"), list):
                raise UsageError(f"{path}: not a sweep summary (no 'points' list)",
                                 hint="give a sweep_*.json that mk sweep wrote, not its journal")
            results.append(result)
        if as_json:
            typer.echo(json.dumps(results[0] if len(results) == 1 else results, indent=2, default=str))
            return
        for path, result in zip(paths, results):
            if len(results) > 1:
                typer.echo(str(path))
            print_sweep_points(result, limit=limit, order=order)

    @sweep_app.command("run")
    def sweep(
        config: Path = typer.Argument(..., help="A merge config with a search block and an evaluator (eval_tasks: default all its tasks)."),
        resume: bool = typer.Option(False, "--resume", help="Continue after a crash: skip finished points."),
        as_json: bool = typer.Option(False, "--json", help="Print the sweep result as JSON."),
    ) -> None:
        """Evaluate a grid (or a plugin's search) of merges; rank points by max-min interference.

        Trials run here one after another, or where the config's 'executor' says (mk-ray: ray).

        'mk sweep show SWEEP_JSON' prints a finished sweep's points."""
        from mergekit_core.config import load_merge_config
        from mergekit_core.evaluation.sweep import run_sweep

        show = not as_json and sys.stderr.isatty()
        result = run_sweep(load_merge_config(config), host, resume=resume,
                           progress=SweepProgress() if show else None)
        for warning in result.get("warnings") or []:  # the search strategy's (Search.finish)
            typer.echo(f"warning: {warning}", err=True)
        if as_json:
            typer.echo(json.dumps(result, indent=2, default=str))
            return
        best = result["best"]
        print_sweep(result)
        typer.echo(f"{len(result['points'])} points in {result['wall_time_s']:.1f} s; results: {result['path']}")
        for record in [r for r in result["points"] if r.get("error")][:3]:
            typer.echo(f"failed: {point_text(record['point'])}: {record['error']}", err=True)
        if result.get("failed"):
            typer.echo(f"{result['failed']} trial(s) failed (recorded in the journal; --resume runs them again)",
                       err=True)
        if best:
            typer.echo(f"best: {point_text(best['point'])} (worst-task interference {best['score']:+.4f}, "
                       f"mean {best['summary']['mean_metric']:.4f})")


def _sweep_group() -> type:
    """``mk sweep``: a group whose default command is ``run``, so ``mk sweep CONFIG`` (and ``mk sweep
    --help``) keep working beside ``mk sweep show SWEEP_JSON``."""
    from typer.core import TyperGroup

    class SweepGroup(TyperGroup):
        def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
            if not args or args[0] not in self.commands:
                args = ["run", *args]
            return super().parse_args(ctx, args)

    return SweepGroup


class SweepProgress:
    """Points done, trials running and failed, the best score so far and time left, on one rich
    progress bar."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(),
                                 TextColumn("running {task.fields[running]} failed {task.fields[failed]}"),
                                 TextColumn("best {task.fields[best]}"),
                                 console=Console(stderr=True), transient=True)
        self.task: Any = None
        self.failed = 0

    def __call__(self, event: str, **info: Any) -> None:
        if event == "start":
            self.progress.start()
            self.task = self.progress.add_task("sweep", total=info.get("total"), best="-", running=0, failed=0)
        elif event == "running":
            self.progress.update(self.task, running=info["running"])
        elif event == "point":
            best = info["best"]
            self.failed += bool(info["record"].get("error"))
            self.progress.update(self.task, advance=1, running=info.get("running", 0), failed=self.failed,
                                 best=f"{best['score']:+.4f} at {point_text(best['point'])}" if best else "-")
        elif event == "end":
            self.progress.stop()
