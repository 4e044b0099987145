"""`mk inspect PATH`: what a checkpoint or adapter holds, from headers only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from mergekit_core.plugins import PluginHost


def describe_path(path: Path, host: PluginHost) -> dict[str, Any]:
    """Format, adapter config, tensor counts, parameters, dtypes and sizes of ``path``."""
    from collections import Counter

    from mergekit_core.io.formats import open_checkpoint

    reader = open_checkpoint(path, host)
    infos = reader.infos()
    dtypes = Counter(i.dtype for i in infos.values())
    out: dict[str, Any] = {
        "path": str(path),
        "format": reader.format_name,
        "tensors": len(infos),
        "parameters": sum(i.numel for i in infos.values()),
        "bytes": sum(i.nbytes for i in infos.values()),
        "dtypes": dict(sorted(dtypes.items())),
        "tensor_list": [{"name": i.name, "shape": list(i.shape), "dtype": i.dtype} for i in infos.values()],
    }
    config = getattr(reader, "config", None)
    if config is not None:  # an adapter
        out["adapter"] = {
            "peft_type": config.peft_type,
            "variant": "dora" if config.use_dora else ("rslora" if config.use_rslora else None),
            "r": config.r,
            "alpha": config.alpha,
            "rank_pattern": config.rank_pattern,
            "alpha_pattern": config.alpha_pattern,
            "modules": len(reader.modules),
            "base_tensors_changed": len(reader.targets()),
            "replacements": sorted(reader.replacements),
            "base_layer_copies": sorted(reader.base_copies),
            "base_model_name_or_path": config.base_model_name_or_path,
        }
    elif getattr(reader, "model_config", None):
        cfg = reader.model_config
        out["model_config"] = {k: cfg.get(k) for k in ("model_type", "architectures", "tie_word_embeddings")
                               if k in cfg}
    reader.close()
    return out


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def register(app: typer.Typer, host: PluginHost) -> None:
    @app.command("inspect")
    def inspect(
        path: str = typer.Argument(..., help="Model directory, adapter directory, weights file, or a Hugging "
                                   "Face Hub model ID (org/name[@revision])."),
        show_all: bool = typer.Option(False, "--all", help="List every tensor, not only the first 20."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
    ) -> None:
        """Show what a checkpoint or adapter holds (reads headers only)."""
        from mergekit_core.io.hub import is_repo_id, resolve_hub_model

        info = describe_path(resolve_hub_model(path) if is_repo_id(path) else Path(path), host)
        if as_json:
            typer.echo(json.dumps(info, indent=2))
            return
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        console = Console()
        console.print(f"[bold]{escape(str(path))}[/]: {info['format']}")
        console.print(f"{info['tensors']} tensors, {info['parameters']:,} parameters, {_size(info['bytes'])}, "
                      f"dtypes: {', '.join(f'{k} x{v}' for k, v in info['dtypes'].items())}")
        for key in ("adapter", "model_config"):
            if key in info:
                for k, v in info[key].items():
                    if v not in (None, {}, []):
                        console.print(f"  {k}: {escape(str(v))}")
        rows = info["tensor_list"] if show_all else info["tensor_list"][:20]
        table = Table()
        table.add_column("tensor", overflow="fold")
        table.add_column("shape")
        table.add_column("dtype")
        for t in rows:
            table.add_row(escape(t["name"]), str(t["shape"]), t["dtype"])
        console.print(table)
        if len(rows) < info["tensors"]:
            console.print(f"... {info['tensors'] - len(rows)} more (use --all)")
