"""`mk config convert`: a mergekit config written as mk's; and the config loader `mk merge` uses,
which recognises mergekit's YAML and translates it (mergekit_core.mergekit_compat)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mergekit_core.errors import ConfigError, UsageError
from mergekit_core.plugins import PluginHost


def load_config(path: Path) -> tuple[Any, Any]:
    """``(MergeConfig, Translation or None)`` for a config file in mk's schema or mergekit's.

    Raises:
        ConfigError: one line naming the file and the key at fault.
    """
    from mergekit_core.config import MergeConfig, read_config_yaml
    from mergekit_core.mergekit_compat import looks_like_mergekit, translate

    data = read_config_yaml(path)
    if looks_like_mergekit(data):
        translation = translate(data, str(path), base_dir=Path.cwd())
        return MergeConfig.from_dict(translation.config, path), translation
    return MergeConfig.from_dict(data or {}, path), None


def translation_yaml(translation: Any, source: Path) -> str:
    """The translated config as YAML, headed by where it comes from and the notes."""
    import yaml

    head = [f"# mk's config for mergekit's {source.name} (mk config convert); see docs/mergekit-users.md"]
    head += [f"# note: {n}" for n in translation.notes]
    body = yaml.safe_dump(translation.config, sort_keys=False, default_flow_style=None, width=100)
    return "\n".join(head) + "\n" + body


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def _write_text(path: Path, text: str) -> None:
    """``text`` into ``path`` atomically (a temporary file beside it, then renamed), umask mode."""
    import os
    import tempfile

    from mergekit_core.io.destination import default_mode

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, default_mode())
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_app(host: PluginHost) -> typer.Typer:
    app = typer.Typer(help="Config files: convert a mergekit config into mk's.", no_args_is_help=True)

    @app.command("convert", epilog="Example:  mk config convert mergekit.yaml merge.yaml  (then: mk merge merge.yaml)")
    def convert(
        source: Path = typer.Argument(..., help="A mergekit config (YAML: models, merge_method, base_model, ...)."),
        out: Path = typer.Argument(..., help="Where to write mk's config (a new .yaml file)."),
        force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (never the input)."),
    ) -> None:
        """Translate a mergekit config into mk's config; what has no mk equivalent is refused."""
        from mergekit_core.config import read_config_yaml
        from mergekit_core.mergekit_compat import looks_like_mergekit, translate

        if _same_file(source, out) or source.absolute() == out.absolute():
            raise UsageError(f"{out}: is the input config; write the translation to another file")
        data = read_config_yaml(source)
        if not looks_like_mergekit(data):
            raise ConfigError(f"{source}: not a mergekit config (no merge_method, parameters or models with "
                              "'model:'); mk merge reads it as it is")
        translation = translate(data, str(source), base_dir=Path.cwd())
        inputs = [Path(s["path"]) for s in translation.config.get("sources", [])]
        if translation.config.get("base_model"):
            inputs.append(Path(translation.config["base_model"]))
        for p in inputs:
            if _same_file(p, out) or (p.exists() and out.absolute().is_relative_to(p.absolute())):
                raise UsageError(f"{out}: is or lies inside the input model {p}; write the translation elsewhere")
        if out.is_dir():
            raise UsageError(f"{out}: is a directory; give the path of the .yaml file to write")
        if out.exists() and not force:
            raise UsageError(f"{out}: exists; pass --force to replace it, or choose another name")
        _write_text(out, translation_yaml(translation, source))
        count = len(translation.notes)
        typer.echo(f"wrote {out}" + (f" ({count} note{'s' if count > 1 else ''}, as comments at its top)"
                                     if count else ""))

    return app


def register(app: typer.Typer, host: PluginHost) -> None:
    app.add_typer(make_app(host), name="config")
