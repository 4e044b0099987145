"""`mk plugins`: list the installed plugins and show one component."""

from __future__ import annotations

import json

import typer

from mergekit_core.components import COMPONENT_KINDS, KIND_HOOKS
from mergekit_core.errors import UnknownComponentError, UsageError
from mergekit_core.plugins import PluginHost

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
        if as_json:
            typer.echo(json.dumps(entries, indent=2))
            return
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        table = Table(title="mergekit-core plugins", show_lines=True)
        table.add_column("plugin", style="bold")
        table.add_column("distribution")
        table.add_column("provides")
        table.add_column("status")
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

    @app.command("show")
    def show(
        name: str = typer.Argument(..., help="Component name, e.g. task_arithmetic."),
        kind: str = typer.Option(None, "--kind", help=f"Component kind when a name is ambiguous: "
                                                      f"{', '.join(KIND_HOOKS)}."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
    ) -> None:
        """Describe one component: what it does and its parameters with defaults."""
        if kind is not None and kind not in KIND_HOOKS:
            raise UsageError(f"unknown kind '{kind}'; kinds: {', '.join(KIND_HOOKS)}")
        if kind is not None:
            components = [host.get(kind, name)]
        else:
            components = host.find(name)
            if not components:
                raise UnknownComponentError(
                    f"no installed component is called '{name}'",
                    hint="'mk plugins list' shows every installed component",
                )
            for comp in components:  # surfaces conflicts as errors naming both packages
                host.get(comp.kind, name)
        if as_json:
            typer.echo(json.dumps([c.describe() for c in components], indent=2, default=str))
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
            table.add_column("parameter", style="bold")
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

    return app
