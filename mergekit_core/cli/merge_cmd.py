"""`mk merge`: run a merge from a YAML config, from flags, or both (flags win)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from mergekit_core.cli.evaluation_view import eval_params, print_eval
from mergekit_core.config import parse_key_values
from mergekit_core.io.hub import command_line_path
from mergekit_core.errors import UsageError
from mergekit_core.plugins import PluginHost

EPILOG = (
    "Examples:  mk merge configs/merge_weighted_scalar.yaml  |  "
    "mk merge --method task_arithmetic --base BASE --adapters A B --lambda 0.3 --out merged/"
)




def _absolute(path: str | None) -> str | None:
    """An output path from the command line, relative to the working directory."""
    return str(Path(path).expanduser().absolute()) if path else None


def build_spec(config: Path | None, overrides: dict[str, Any]) -> Any:
    from mergekit_core.cli.config_cmd import load_config
    from mergekit_core.config import MergeConfig

    cfg = load_config(config)[0] if config is not None else MergeConfig.from_dict({}, None)
    return cfg.with_overrides(overrides).to_spec()


class RichProgress:
    """Maps engine progress events onto rich progress bars on stderr.

    Events: ``start`` (total tensors, total bytes), ``tensor`` (name, bytes), ``end`` for the
    merge itself; ``phase`` (label, total) and ``step`` (name) for the work before it (a
    method's preparation passes, hashing the inputs).
    """

    def __init__(self) -> None:
        import time

        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.clock = time.monotonic
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[name]}"),
            console=Console(stderr=True), transient=True,
        )
        self.task: Any = None
        self.phase: Any = None
        self.started = 0.0
        self.count = self.done = self.bytes = self.total_bytes = 0

    def _detail(self) -> str:
        detail = f"{self.done}/{self.count} tensors"
        elapsed = self.clock() - self.started
        if self.total_bytes and elapsed > 0:
            detail += f", {_human(self.bytes / elapsed)}/s written"
        return detail

    def __call__(self, event: str, **info: Any) -> None:
        if event in ("start", "phase") and not self.progress.live.is_started:
            self.progress.start()
        if event == "start":
            self._end_phase()
            self.started, self.count, self.total_bytes = self.clock(), info["total"], info.get("total_bytes") or 0
            self.task = self.progress.add_task("merging", total=self.total_bytes or self.count, name="",
                                               detail=self._detail())
        elif event == "tensor":
            self.done += 1
            self.bytes += info.get("nbytes") or 0
            self.progress.update(self.task, advance=(info.get("nbytes") or 0) if self.total_bytes else 1,
                                 name=info["name"][-48:], detail=self._detail())
        elif event == "phase":
            self._end_phase()
            self.phase = self.progress.add_task(info["label"], total=info.get("total"), name="", detail="")
        elif event == "step" and self.phase is not None:
            self.progress.update(self.phase, advance=1, name=str(info.get("name", ""))[-48:])
        elif event == "end":
            self._end_phase()

    def close(self) -> None:
        self.progress.stop()

    def _end_phase(self) -> None:
        if self.phase is not None:
            self.progress.remove_task(self.phase)
            self.phase = None


class OptimizerProgress:
    """An optimizer's steps as a rich progress bar on stderr: ``start`` (total, label), ``step``
    (step, loss), ``end``."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
            console=Console(stderr=True), transient=True,
        )
        self.task: Any = None

    def __call__(self, event: str, **info: Any) -> None:
        if event == "start":
            self.progress.start()
            self.task = self.progress.add_task(info.get("label", "optimizing"), total=info.get("total"),
                                               loss="-", rate="")
        elif event == "step" and self.task is not None:
            task = self.progress.tasks[0]
            rate = f"{task.completed / task.elapsed:.1f} steps/s" if task.elapsed else ""
            self.progress.update(self.task, completed=info.get("step", task.completed + 1),
                                 loss=f"{info.get('loss', float('nan')):.4f}", rate=rate)
        elif event == "end":
            self.close()

    def close(self) -> None:
        if self.progress.live.is_started:
            self.progress.stop()


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n}"


def print_plan(spec: Any, host: PluginHost) -> dict[str, Any]:
    """The dry run: read headers and configs, validate everything, describe what would happen."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from mergekit_core.engine.lambdas import initial_values, lambda_values
    from mergekit_core.engine.plan import build_plan
    from mergekit_core.engine.resolve import resolve_components
    from mergekit_core.engine.run import merged_weights
    from mergekit_core.evaluation.optimize import optimizer_context, with_optimizer_policy

    if spec.optimizer.name != "none":  # everything the optimizer can check without running
        with optimizer_context(spec, host) as (context, optimizer, params):
            optimizer.check(context, params)
            spec = context.spec  # with the method and policy the optimizer sets
    else:
        spec = with_optimizer_policy(spec, host)
    comps = resolve_components(spec, host)
    plan = build_plan(spec, host, comps.method)
    try:
        learns = spec.optimizer.name != "none"
        values = (initial_values(plan, comps) if learns else
                  lambda_values(plan, comps, host, merged_weights(spec, host)))
        console = Console()
        console.print(f"[bold]dry run[/]: {comps.method.name} of {len(plan.sources)} sources "
                      f"-> {plan.output_kind}" + (f" at {spec.output.path}" if spec.output.path else ""))
        sources = Table(title="sources")
        for col in ("#", "name", "format", "path"):
            sources.add_column(col, overflow="fold")
        if plan.base is not None:
            sources.add_row("base", "-", plan.base.format_name, escape(str(spec.base_model)))
        for i, s in enumerate(plan.sources):
            fmt = s.reader.format_name
            if s.is_adapter:
                cfg = s.reader.config
                fmt += f" ({'DoRA' if cfg.use_dora else cfg.peft_type}, r={cfg.r})"
            sources.add_row(str(i), escape(s.name), fmt, escape(str(s.spec.path)))
        console.print(sources)
        merged, copied, dropped = (plan.by_action(a) for a in ("merge", "copy", "drop"))
        console.print(f"tensors: {len(merged)} merged, {len(copied)} copied, {len(dropped)} left out")
        reasons: dict[str, int] = {}
        for t in copied + dropped:
            reasons[f"{t.action}: {t.reason}"] = reasons.get(f"{t.action}: {t.reason}", 0) + 1
        for reason, count in sorted(reasons.items()):
            console.print(f"  {count} x {escape(reason)}")
        for note in plan.notes[:10]:
            console.print(f"  note: {escape(note)}")
        layers = plan.layers
        title = f"lambda per source ({comps.policy.name})"
        if learns:
            title = f"initial lambda per source ({comps.policy.name}; optimizer {comps.optimizer.name} learns them)"
        lam = Table(title=title)
        lam.add_column("layer")
        for s in plan.sources:
            lam.add_column(escape(s.name))
        shown = ([None] + layers) if len(layers) <= 12 else [None] + layers[:6] + layers[-6:]
        for layer in shown:
            row = [_shown_lambda(comps.policy, _tensor_of(plan, layer), layer, i, values)
                   for i in range(len(plan.sources))]
            lam.add_row("no layer" if layer is None else str(layer), *row)
        console.print(lam)
        per_tensor = [(len(plan.sources) + 3) * t.numel * 4 for t in merged] or [0]
        peak = 2 * max(per_tensor)
        out_bytes = sum(t.numel for t in merged + copied) * (2 if spec.output.dtype in ("float16", "bfloat16") else 4)
        console.print(f"estimated peak memory for tensors: {_human(peak)} (two tensors in flight); "
                      f"output size: about {_human(out_bytes)}")
        return {"merged": len(merged), "copied": len(copied), "dropped": len(dropped),
                "estimated_peak_bytes": peak}
    finally:
        plan.close()


def _tensor_of(plan: Any, layer: int | None) -> str:
    """A merged tensor of ``layer`` (the dry run's lambda table resolves for it), else ""."""
    return next((t.name for t in plan.tensors if t.layer == layer and t.action == "merge"), "")


def _shown_lambda(policy: Any, name: str, layer: int | None, source: int, values: Any) -> str:
    from mergekit_core.errors import MergekitError

    try:
        return f"{policy.resolve(name, layer, source, values):g}"
    except MergekitError:
        return "-"


def _evaluate_result(setup: Any, host: PluginHost, spec: Any, result: Any) -> dict[str, Any]:
    from mergekit_core.config import SourceSpec
    from mergekit_core.evaluation.evaluate import evaluate_result, source_model

    model: Any = str(result.output_path)
    if result.output_kind == "adapter":
        if spec.base_model is None:
            raise UsageError("evaluating an adapter merge needs base_model")
        model = source_model(host, SourceSpec("merged", result.output_path), spec.base_model)
    return evaluate_result(setup, host, spec, result, model=model)


def register(app: typer.Typer, host: PluginHost) -> None:
    @app.command("merge", epilog=EPILOG)
    def merge(
        inputs: list[str] = typer.Argument(None, help="A YAML config, and/or more source paths.",
                                           show_default=False),
        method: str = typer.Option(None, "--method", "-m", help="Merge method, e.g. task_arithmetic."),
        sources: list[str] = typer.Option(None, "--sources", "--adapters", "--models", "-s",
                                          help="Source model or adapter paths (space separated)."),
        base: str = typer.Option(None, "--base", "--base-model", help="Base model directory."),
        lam: float = typer.Option(None, "--lambda", help="The method's lambda (scaling of task vectors)."),
        param: list[str] = typer.Option(None, "--param", "-p", help="Method parameter KEY=VALUE (repeat)."),
        policy: str = typer.Option(None, "--policy", help="Lambda policy: scalar, per_layer, per_task, ..."),
        out: str = typer.Option(None, "--out", "-o", help="Write the merged model or adapter here (a new or empty "
                                "directory, or a previous output of mk, which is replaced)."),
        force: bool = typer.Option(False, "--force", help="Replace --out even if it is a non-empty directory mk "
                                   "did not write (never a source or the base)."),
        kind: str = typer.Option(None, "--kind", help="Output kind: auto, model or adapter."),
        dtype: str = typer.Option(None, "--dtype", help="Output dtype: fp32, fp16 or bf16."),
        adapter_rank: int = typer.Option(None, "--adapter-rank", help="Rank of an adapter output."),
        mode: str = typer.Option(None, "--mode", help="merge_mode: common, strict or union."),
        exclude: list[str] = typer.Option(None, "--exclude", help="Tensor-name glob not to merge (repeat)."),
        untie: bool = typer.Option(False, "--untie-embeddings",
                                   help="Base ties lm_head to the embeddings: write an untied output that keeps "
                                        "the sources' heads."),
        seed: int = typer.Option(None, "--seed", help="Seed of random transforms."),
        device: str = typer.Option(None, "--device", help="Where the arithmetic runs: auto (a GPU when torch sees "
                                   "one), cpu, cuda or cuda:N; tensors are read and written on the host."),
        output_dir: str = typer.Option(None, "--output-dir", help="Root of run bundles (default artifacts)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Check everything and print the plan; read no tensor."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or report."),
        allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Warn on NaN/Inf instead of failing."),
        hash_inputs: bool = typer.Option(False, "--hash-inputs", help="Full sha256 of large input files too."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
        eval_tasks: list[str] = typer.Option(None, "--eval-tasks", help="Evaluate the merge on these tasks."),
        evaluator: str = typer.Option(None, "--evaluator", help="Evaluator for --eval-tasks (e.g. digits)."),
        eval_param: list[str] = typer.Option(None, "--eval-param", help="Evaluator parameter KEY=VALUE."),
        split: str = typer.Option(None, "--split", help="Split for --eval-tasks (default: the config's split, "
                                  "else test).", show_default=False),
    ) -> None:
        """Merge sources (fine-tuned models or PEFT adapters) into one model or adapter."""
        if out is not None and not out.strip():
            raise UsageError("--out is empty; give the directory to write the merge to", hint="see 'mk merge --help'")
        inputs = list(inputs or [])
        configs = [p for p in inputs if p.endswith((".yaml", ".yml"))]
        if len(configs) > 1:
            raise UsageError(f"give one config file, got {len(configs)}: {', '.join(configs)}")
        extra = [p for p in inputs if p not in configs]
        # `--adapters A B` and `--eval-tasks x y` leave B and y as positional words: paths are more
        # sources, other words more evaluation tasks.
        extra_sources = [p for p in extra if Path(p).exists() or not eval_tasks]
        if eval_tasks:
            eval_tasks = list(eval_tasks) + [p for p in extra if p not in extra_sources]
        # paths on the command line are relative to the working directory, not to the config file
        all_sources = [command_line_path(p) for p in list(sources or []) + extra_sources]
        overrides: dict[str, Any] = {
            "method": method, "base_model": command_line_path(base), "lambda_policy": policy, "merge_mode": mode,
            "seed": seed, "output_dir": _absolute(output_dir), "output.path": _absolute(out),
            "output.kind": kind, "output.dtype": dtype,
            "output.adapter_rank": adapter_rank, "untie_word_embeddings": True if untie else None,
            "device": device,
        }
        if all_sources:
            overrides["sources"] = all_sources
        if exclude:
            overrides["exclude"] = list(exclude)
        method_params = parse_key_values(list(param or []))
        if lam is not None:
            method_params["lambda"] = lam
        config_path = Path(configs[0]) if configs else None
        translation = None
        if config_path is not None:  # a mergekit config is translated (mergekit_core.mergekit_compat)
            from mergekit_core.cli.config_cmd import load_config, translation_yaml

            translation = load_config(config_path)[1]
            if translation is not None:
                if dry_run and not as_json:
                    typer.echo(translation_yaml(translation, config_path))
                elif not quiet and not as_json:
                    for note in translation.notes:
                        typer.echo(f"note: {note}", err=True)
        if method_params:
            from mergekit_core.cli.config_cmd import load_config

            overrides["method_params"] = (load_config(config_path)[0].method_params_with(method_params)
                                          if config_path else method_params)
        if config_path is None and not all_sources:
            raise UsageError("nothing to merge: give a config file or --sources", hint="see 'mk merge --help'")
        spec = build_spec(config_path, overrides)
        from mergekit_core.engine.write import check_outputs

        doomed = check_outputs(spec, force=force)  # before any reading; with --force, said even with --quiet
        if doomed:
            typer.echo(f"warning: --force: {len(doomed)} {'entry' if len(doomed) == 1 else 'entries'} of "
                       f"{spec.output.path} {'would' if dry_run else 'will'} be replaced: " + ", ".join(doomed[:5])
                       + (", ..." if len(doomed) > 5 else ""), err=True)
        if dry_run:
            info = print_plan(spec, host)
            if as_json:
                if translation is not None:
                    info["mergekit_translation"] = {"config": translation.config, "notes": translation.notes}
                typer.echo(json.dumps(info))
            return
        from mergekit_core.evaluation.optimize import optimize_and_merge

        setup = None
        if eval_tasks:  # checked before merging, like everything else
            from mergekit_core.evaluation.scoring import setup_from_spec

            setup = setup_from_spec(host, spec, evaluator=evaluator, params=eval_params(eval_param),
                                    tasks=list(eval_tasks), split=split or spec.sweep.get("split") or "test")
        show = not quiet and not as_json and sys.stderr.isatty()
        bar = RichProgress() if show else None
        steps = OptimizerProgress() if show else None
        try:
            result = optimize_and_merge(spec, host, progress=bar, optimizer_progress=steps,
                                        allow_nonfinite=allow_nonfinite, hash_inputs=hash_inputs, force=force)
        finally:
            for shown in (steps, bar):
                if shown is not None:
                    shown.close()
        evaluation = _evaluate_result(setup, host, spec, result) if setup is not None else None
        summary = {
            "method": result.method, "output_kind": result.output_kind,
            "output": str(result.output_path) if result.output_path else None,
            "run_dir": str(result.run_dir) if result.run_dir else None,
            "merged": result.report.get("merged"), "copied": result.report.get("copied"),
            "dropped": result.report.get("dropped"),
            "relative_delta_norm": result.report.get("relative_delta_norm"),
            "energy_kept": result.report.get("energy_kept"),
            "wall_time_s": result.metadata["wall_time_s"], "warnings": result.metadata["warnings"],
            "evaluation": evaluation,
        }
        if spec.optimizer.name != "none":
            summary["optimizer"] = result.metadata["optimizer"]
        for w in summary["warnings"]:  # on stderr in every mode: what was written needs a look
            typer.echo(f"warning: {w}", err=True)
        if as_json:
            typer.echo(json.dumps(summary, indent=2))
            return
        if quiet:
            return
        lines = [f"merged {summary['merged']} tensors, copied {summary['copied']}, left out {summary['dropped']} "
                 f"in {summary['wall_time_s']:.1f} s"]
        if summary["relative_delta_norm"] is not None:
            lines.append(f"the merge moved the weights by {summary['relative_delta_norm']:.4f} of the base's norm")
        if summary["energy_kept"] is not None:
            exact = result.report.get("exact_modules") or 0
            truncated = len(result.report.get("energy_kept_per_module") or {}) - exact
            if truncated == 0:
                lines.append(f"adapter: exact, the LoRA factors of {exact} modules concatenated (nothing truncated)")
            else:
                lines.append(f"adapter: {exact} modules exact (factors concatenated), {truncated} truncated by SVD "
                             f"keeping {summary['energy_kept']:.4%} of their energy")
        learned = (summary.get("optimizer") or {}).get("report") or {}
        if learned.get("summary"):
            lines.append(f"optimizer {spec.optimizer.name}: {learned['summary']}")
        lines.append(f"{result.output_kind}: {summary['output']}")
        lines.append(f"run bundle: {summary['run_dir']}")
        typer.echo("\n".join(lines))
        if evaluation is not None:
            print_eval(evaluation)
