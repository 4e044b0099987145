"""``mk svd-hybrid compress | reconstruct | diagnose``. Torch is imported inside the commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from mergekit_core import PluginHost, UsageError
from mergekit_core.api import command_line_path




def _spec(config: Path | None, sources: list[str], base: str | None, params: dict[str, Any]) -> Any:
    from mergekit_core.api import MergeConfig, load_merge_config

    cfg = load_merge_config(config) if config is not None else MergeConfig.from_dict({}, None)
    if cfg.data.get("method") not in (None, "svd_hybrid"):
        raise UsageError(f"{config}: method is {cfg.data.get('method')!r}; mk svd-hybrid compresses with svd_hybrid")
    overrides: dict[str, Any] = {"method": "svd_hybrid", "base_model": command_line_path(base)}
    if sources:
        overrides["sources"] = [command_line_path(s) for s in sources]
    if params:
        overrides["method_params"] = cfg.method_params_with(params)
    if config is None and not sources:
        raise UsageError("nothing to compress: give a config file or --sources", hint="see 'mk svd-hybrid compress --help'")
    return cfg.with_overrides(overrides).to_spec()


class _Bar:
    def __init__(self, label: str, total: int, show: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[name]}"),
                                 console=Console(stderr=True), transient=True, disable=not show)
        self.task = self.progress.add_task(label, total=total, name="")

    def __enter__(self) -> _Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, name: str) -> None:
        self.progress.update(self.task, advance=1, name=name[-48:])


def _show(quiet: bool, as_json: bool) -> bool:
    import sys

    return not quiet and not as_json and sys.stderr.isatty()


def _overall_table(diag: dict[str, Any], worst: int) -> None:
    from rich.console import Console
    from rich.table import Table

    o = diag["overall"]
    console = Console()
    table = Table(title="SVD-Hybrid artifact")
    for col in ("tensors", "ratio", "vs fp32", "bits/entry/task", "rel. error",
                "compress s", "rebuild s"):
        table.add_column(col, justify="right")

    def num(x: float | None, spec: str) -> str:  # None: nothing stored (only empty tensors)
        return "-" if x is None else format(x, spec)

    table.add_row(str(o["tensors"]), num(o["compression_ratio"], ".2f") + "x",
                  num(o["compression_ratio_vs_fp32"], ".2f") + "x",
                  num(o["bits_per_entry_per_task"], ".2f"), f"{o['mean_relative_error']:.4f}",
                  f"{o['compress_s']:.2f}", f"{o['reconstruct_s']:.2f}")
    console.print(table)
    rows = sorted(diag["tensors"].items(), key=lambda kv: -kv[1]["mean_relative_error"])[:worst]
    if rows:
        t = Table(title=f"largest reconstruction errors (top {len(rows)})")
        for col in ("tensor", "shape", "rank", "energy kept", "signal", "rel. error", "ratio"):
            t.add_column(col, justify="left" if col == "tensor" else "right", overflow="fold")
        for name, e in rows:
            rank = ",".join(map(str, e.get("rank", []))) or "-"
            energy = ",".join(f"{x:.3f}" for x in e.get("energy_kept", [])) or "-"
            signal = f"{e['signal_fraction']:.2f}" if "signal_fraction" in e else "-"
            ratio = f"{e['compression_ratio']:.1f}x" if e["compression_ratio"] else "-"
            t.add_row(name, "x".join(map(str, e["shape"])) or "scalar", rank, energy, signal,
                      f"{e['mean_relative_error']:.4f}", ratio)
        console.print(t)


def make_app(host: PluginHost) -> typer.Typer:
    app = typer.Typer(help="SVD-Hybrid: compress task vectors into a reusable artifact (TALL masks, shared SVD "
                           "bases, RTVQ), rebuild merged or per-task models from it, inspect it.",
                      no_args_is_help=True)

    @app.command("compress")
    def compress_cmd(
        inputs: list[str] = typer.Argument(None, help="A merge config (YAML; method_params configure SVD-Hybrid) "
                                                     "and/or source paths.", show_default=False),
        out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to write (new, empty, or a previous "
                                 "output of mk)."),
        force: bool = typer.Option(False, "--force", help="Replace --out even if mk did not write it (never an input)."),
        sources: list[str] = typer.Option(None, "--sources", "-s", help="Fine-tuned models or adapters."),
        base: str = typer.Option(None, "--base", help="Base model the task vectors are taken from."),
        param: list[str] = typer.Option(None, "--param", "-p",
                                        help="SVD-Hybrid parameter KEY=VALUE (repeat); 'mk plugins show "
                                             "svd_hybrid' lists them."),
        weighting: str = typer.Option(None, "--weighting", help="uniform, performance or cluster."),
        energy: float = typer.Option(None, "--energy", help="Energy fraction the bases keep (e.g. 0.95)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or table."),
        as_json: bool = typer.Option(False, "--json", help="Print the overall diagnostics as JSON."),
    ) -> None:
        """Compress the sources' task vectors into an artifact directory (no merged model is written).

        Example: mk svd-hybrid compress --base pool/base pool/task_a pool/task_b --out artifact/
        """
        from mergekit_core.api import AtomicDirectory, check_destination, parse_key_values, prepare_context
        from mk_svd_hybrid.pipeline import compress

        params = parse_key_values(list(param or []))
        for key, value in (("weighting", weighting), ("energy", energy)):
            if value is not None:
                params[key] = value
        inputs = list(inputs or [])
        configs = [Path(p) for p in inputs if p.endswith((".yaml", ".yml"))]
        if len(configs) > 1:
            raise UsageError(f"give one config file, got {len(configs)}")
        paths = list(sources or []) + [p for p in inputs if not p.endswith((".yaml", ".yml"))]
        spec = _spec(configs[0] if configs else None, paths, base, params)
        inputs = ([spec.base_model] if spec.base_model else []) + [s.path for s in spec.sources]
        check_destination(out, inputs=inputs, force=force, what="artifact directory", kind="svd_hybrid_artifact")
        with prepare_context(spec, host) as (context, comps):
            total = len(context.plan.by_action("merge"))
            if comps.params["artifact_dir"]:
                raise UsageError("give the artifact directory with --out, not artifact_dir")
            with (_Bar("compressing", total, _show(quiet, as_json)) as bar,
                  AtomicDirectory(out, inputs=inputs, force=force, kind="svd_hybrid_artifact",
                                  what="artifact directory") as tmp):
                manifest = compress(context, comps.params, tmp, progress=bar)
        diag = json.loads((out / "diagnostics.json").read_text())
        if as_json:
            typer.echo(json.dumps({"artifact": str(out), "tasks": manifest["tasks"], "weights": manifest["weights"],
                                   "clusters": manifest["clusters"], **diag["overall"]}, indent=2))
        elif not quiet:
            _overall_table(diag, 5)
            typer.echo(f"artifact written to {out}")

    @app.command("reconstruct")
    def reconstruct_cmd(
        artifact: Path = typer.Argument(..., help="Artifact directory made by 'compress' (or a merge's artifact_dir)."),
        base: Path = typer.Option(..., "--base", help="The base model the artifact was made from."),
        out: Path = typer.Option(..., "--out", "-o", help="Model directory to write (new, empty, or a previous "
                                 "output of mk)."),
        force: bool = typer.Option(False, "--force", help="Replace --out even if mk did not write it (never an input)."),
        task: str = typer.Option(None, "--task", help="Rebuild this task's own model instead of the merge."),
        lam: float = typer.Option(None, "--lambda", help="Merge scale instead of the recorded coefficients."),
        dtype: str = typer.Option(None, "--dtype", help="Output dtype of rebuilt tensors: fp32, fp16, bf16."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Rebuild the merged model (or --task NAME's model) from the artifact and the base model."""
        from mk_svd_hybrid.rebuild import reconstruct

        with _Bar("rebuilding", 0, _show(quiet, as_json)) as bar:
            result = reconstruct(artifact, base, out, host, task=task, lam=lam, dtype=dtype, progress=bar,
                                 force=force)
        if as_json:
            typer.echo(json.dumps(result, indent=2))
        elif not quiet:
            what = f"task {task}'s model" if task else "merged model"
            typer.echo(f"{what}: {result['rebuilt']} tensors rebuilt, {result['tensors']} written to {out}")

    @app.command("diagnose")
    def diagnose_cmd(
        artifact: Path = typer.Argument(..., help="Artifact directory."),
        worst: int = typer.Option(10, "--worst", help="How many tensors to list, largest error first."),
        timing: bool = typer.Option(False, "--timing", help="Rebuild every task vector again and time it."),
        write: Path = typer.Option(None, "--write", help="Also write the diagnostics (JSON) to this file."),
        as_json: bool = typer.Option(False, "--json", help="Print the diagnostics as JSON."),
    ) -> None:
        """Check an artifact (sha256 of every file) and show its reconstruction errors and sizes."""
        from mergekit_core.api import relation
        from mk_svd_hybrid.store import ArtifactReader

        if write is not None and relation(write, artifact) in ("is", "lies inside", "contains"):
            raise UsageError(f"--write {write} {relation(write, artifact)} the artifact {artifact}; writing it "
                             "would change the artifact", hint="write the diagnostics outside the artifact")
        reader = ArtifactReader(artifact)
        diag = reader.json_file("diagnostics.json")
        diag["verified"] = True
        if timing:
            import time

            started = time.perf_counter()
            for _, decoder in reader.records():
                for t in range(decoder.num_tasks):
                    decoder.task(t)
            diag["overall"]["reconstruct_again_s"] = round(time.perf_counter() - started, 4)
        if write is not None:
            from mergekit_core.api import write_json

            write_json(write, diag)
        if as_json:
            typer.echo(json.dumps(diag, indent=2))
            return
        _overall_table(diag, worst)
        typer.echo(f"{artifact}: every file matches its sha256; tasks: {', '.join(reader.tasks)}")

    return app
