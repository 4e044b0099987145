"""`mk plugins`: list the installed plugins and show one component."""

from __future__ import annotations

import json

import typer

from mergekit_core.components import COMPONENT_KINDS, KIND_HOOKS
from mergekit_core.errors import UsageError
from mergekit_core.plugins import PluginHost, PluginRecord, debug_enabled

KIND_TITLES = {
    "merge_method": "methods",
    "transform": "transforms",
    "lambda_policy": "lambda policies",
    "optimizer": "optimizers",
    "evaluator": "evaluators",
    "search_strategy": "search strategies",
    "executor": "executors",
    "format": "formats",
    "architecture": "architectures",
    "command": "commands",
}


def make_app(host: PluginHost) -> typer.Typer:
    app = typer.Typer(help="List installed plugins and describe their components.", no_args_is_help=True)

    @app.command("list")
    def list_plugins(
        as_json: bool = typer.Option(False, "--json", help="Print JSON for machines instead of a table."),
    ) -> None:
        """One row per plugin: what it provides and whether it loaded."""
        entries = host.listing()
        debug = debug_enabled()
        if debug:
            for entry, record in zip(entries, host.records):
                entry["traceback"] = record.traceback
        if as_json:
            typer.echo(json.dumps(entries, indent=2))
            return
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        table = Table(title="mergekit-core plugins", show_lines=True)
        table.add_column("plugin", style="bold", overflow="fold")
        table.add_column("distribution", overflow="fold")
        table.add_column("provides", overflow="fold")
        table.add_column("status", overflow="fold")
        for e in entries:
            dist = f"{e['distribution'] or '-'} {e['version'] or ''}".strip()
            provides = "\n".join(
                f"{KIND_TITLES.get(kind, kind)}: {', '.join(names)}" for kind, names in e["provides"].items()
            )
            if e["status"] == "ok":
                status = "[green]ok[/]"
            else:
                status = f"[red]{e['status']}[/]: {escape(e['error'] or '')}"
            table.add_row(escape(e["name"]), escape(dist), escape(provides) or "-", status)
        Console().print(table)
        if debug:
            for record in host.records:
                _print_traceback(record)

    @app.command("show")
    def show(
        name: str = typer.Argument(..., help="Component or plugin name, e.g. task_arithmetic or ties."),
        kind: str = typer.Option(None, "--kind", help=f"Component kind when a name is ambiguous: "
                                                      f"{', '.join(KIND_HOOKS)}."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
    ) -> None:
        """Describe one component (what it does, its parameters with defaults) or one plugin (its
        status, its error and what it provides)."""
        if kind is not None and kind not in KIND_HOOKS:
            raise UsageError(f"unknown kind '{kind}'; kinds: {', '.join(KIND_HOOKS)}")
        plugins: list[PluginRecord] = []
        if kind is not None:
            components = [host.get(kind, name)]
        else:
            components = host.find(name)
            plugins = host.plugins_named(name)
            if any(r.rivals for r in plugins):
                raise host.contested(next(r.name for r in plugins if r.rivals))
            if not components and not plugins:
                raise host.unknown(name)
            for comp in components:  # surfaces conflicts as errors naming both packages
                host.get(comp.kind, name)
        listed = dict(zip((r.key for r in host.records), host.listing())) if plugins else {}
        if as_json:
            out = [c.describe() for c in components]
            for record in plugins:
                entry = {"kind": "plugin", **listed[record.key]}
                if debug_enabled():
                    entry["traceback"] = record.traceback
                out.append(entry)
            typer.echo(json.dumps(out, indent=2, default=str))
            return
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        console = Console()
        for comp in components:
            info = comp.describe()
            label = COMPONENT_KINDS[comp.kind].kind_label
            console.print(f"[bold]{escape(comp.name)}[/] ({label})  {escape(comp.description)}")
            if comp.aliases:
                console.print(f"aliases: {', '.join(comp.aliases)}")
            if comp.kind == "merge_method":
                top = info["max_sources"] if info["max_sources"] is not None else "any"
                console.print(
                    f"space: {info['space']}, sources: {info['min_sources']} to {top}, "
                    f"linear: {'yes' if info['linear'] else 'no'}"
                )
            if not info["params"]:
                console.print("no parameters")
                continue
            table = Table(show_header=True)
            table.add_column("parameter", style="bold", overflow="fold")
            table.add_column("default")
            table.add_column("allowed")
            table.add_column("meaning")
            for p in info["params"]:
                default = "required" if p["required"] else repr(p["default"])
                allowed = []
                if "choices" in p:
                    allowed.append(" | ".join(map(str, p["choices"])))
                if "min" in p:
                    allowed.append(f">= {p['min']}")
                if "max" in p:
                    allowed.append(f"<= {p['max']}")
                table.add_row(p["name"], escape(default), escape(", ".join(allowed)), escape(p["help"]))
            console.print(table)
        for record in plugins:
            entry = listed[record.key]
            dist = f"{record.distribution or 'no distribution'} {record.version or ''}".strip()
            console.print(f"[bold]{escape(record.name)}[/] (plugin, {escape(dist)}, module {escape(record.module)})")
            status = "[green]ok[/]" if record.status == "ok" else f"[red]{record.status}[/]"
            console.print(f"status: {status}")
            if record.error:
                console.print(f"error: {escape(record.error)}")
            for k, names in entry["provides"].items():
                console.print(f"{KIND_TITLES.get(k, k)}: {escape(', '.join(names))}")
            if debug_enabled():
                _print_traceback(record)
            elif record.traceback:
                console.print("MK_DEBUG=1 shows the traceback")

    return app


def _print_traceback(record: PluginRecord) -> None:
    if record.traceback:
        typer.echo(f"traceback of plugin '{record.name}' ({record.distribution or 'no distribution'}):\n"
                   f"{record.traceback}", nl=False)
