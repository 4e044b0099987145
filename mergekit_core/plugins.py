"""The plugin host: built-ins, entry-point plugins, load errors, listing and lookup.

There is no global host. The library takes a :class:`PluginHost`; the CLI builds one per run;
tests build a fresh one each time.

Entry-point plugins are selected by two environment variables, matched against the entry-point
name or the distribution name:

- ``MK_LOAD_PLUGINS``: unset loads all; empty loads none; ``a,b`` loads only these.
- ``MK_DISABLE_PLUGINS=a,b``: never load these.

Built-ins always load.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy

from mergekit_core import hookspecs
from mergekit_core.components import COMPONENT_KINDS, KIND_HOOKS, Component, closest
from mergekit_core.errors import ComponentConflictError, UnknownComponentError

ENTRY_POINT_GROUP = "mergekit_core"
BUILTIN_MODULE = "mergekit_core.builtin"

KNOWN_PROVIDERS: dict[str, str] = {
    "ties": "mk-ties",
    "dare_linear": "mk-ties",
    "dare_ties": "mk-ties",
    "breadcrumbs": "mk-ties",
    "breadcrumbs_ties": "mk-ties",
    "trim": "mk-ties",
    "dare": "mk-ties",
    "magnitude_prune": "mk-ties",
    "svd_hybrid": "mk-svd-hybrid",
    "tvq": "mk-svd-hybrid",
    "adamerging": "mk-adamerging",
    "bayes": "mk-bayes-sweep",
    "ray": "mk-bayes-sweep",
    "digits": "mk-digits",
}
"""Component names provided by this project's own plugin packages, for 'pip install' hints."""

HOOK_NAMES = frozenset(
    name for name in dir(hookspecs) if name.startswith("mk_") and callable(getattr(hookspecs, name))
)


@dataclass
class PluginRecord:
    """One loaded (or failed) plugin, as the listing shows it."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False
    status: str = "ok"
    error: str | None = None
    provides: dict[str, list[str]] = field(default_factory=dict)

    def fail(self, error: str) -> None:
        self.status = "error"
        self.error = error

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "builtin": self.builtin,
            "provides": {k: list(v) for k, v in self.provides.items() if v},
            "status": self.status,
            "error": self.error,
        }


@dataclass
class Provided:
    component: Component
    plugin: PluginRecord


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return " ".join(text.split())


def _norm(name: str) -> str:
    return name.strip().replace("-", "_").lower()


def _selected(name: str, dist: str | None, environ: Mapping[str, str]) -> bool:
    names = {_norm(name)} | ({_norm(dist)} if dist else set())
    load = environ.get("MK_LOAD_PLUGINS")
    if load is not None and not names & {_norm(n) for n in load.split(",") if n.strip()}:
        return False
    disabled = environ.get("MK_DISABLE_PLUGINS", "")
    return not names & {_norm(n) for n in disabled.split(",") if n.strip()}


class PluginHost:
    """Holds the pluggy manager, the plugin records and the component index."""

    def __init__(
        self,
        *,
        load_entry_points: bool = True,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.records: list[PluginRecord] = []
        self._index: dict[str, dict[str, list[Provided]]] | None = None
        self._commands: dict[str, list[str]] | None = None
        from mergekit_core import __version__

        builtin = importlib.import_module(BUILTIN_MODULE)
        self.register(
            builtin, "builtin", distribution="mergekit-core", version=__version__, builtin=True
        )
        if load_entry_points:
            self.load_entry_points(os.environ if environ is None else environ)

    # ----------------------------------------------------------------------- registration

    def register(
        self,
        plugin: object,
        name: str,
        *,
        distribution: str | None = None,
        version: str | None = None,
        builtin: bool = False,
    ) -> PluginRecord:
        """Register a plugin object (usually a module); failures are recorded, not raised."""
        module = getattr(plugin, "__name__", type(plugin).__name__)
        record = PluginRecord(name, module, distribution, version, builtin)
        self.records.append(record)
        self._index = None
        self._commands = None
        unknown = sorted(
            attr
            for attr in dir(plugin)
            if attr.startswith("mk_")
            and hasattr(getattr(plugin, attr, None), f"{hookspecs.PROJECT_NAME}_impl")
            and attr not in HOOK_NAMES
        )
        if unknown:
            record.fail(f"unknown hook {unknown[0]}; known hooks: {', '.join(sorted(HOOK_NAMES))}")
            return record
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:  # a plugin's bad signature must not break mk
            if self.pm.has_plugin(name):
                self.pm.unregister(name=name)
            record.fail(_one_line(exc))
        return record

    def load_entry_points(self, environ: Mapping[str, str]) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            if not _selected(ep.name, dist, environ):
                continue
            if any(r.name == ep.name for r in self.records):
                continue  # the same distribution visible twice on sys.path
            try:
                module = ep.load()
            except Exception as exc:  # import errors of a plugin are its own
                record = PluginRecord(ep.name, ep.value, dist, version)
                record.fail(_one_line(exc))
                self.records.append(record)
                continue
            self.register(module, ep.name, distribution=dist, version=version)

    # ----------------------------------------------------------------------- components

    def _record(self, name: str) -> PluginRecord:
        return next(r for r in self.records if r.name == name)

    def _build_index(self) -> dict[str, dict[str, list[Provided]]]:
        index: dict[str, dict[str, list[Provided]]] = {kind: {} for kind in KIND_HOOKS}
        for kind, hook_name in KIND_HOOKS.items():
            base = COMPONENT_KINDS[kind]
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                record = self._record(impl.plugin_name)
                if record.status == "error":
                    continue
                try:
                    result = impl.function()
                    components = list(result or [])
                    for comp in components:
                        if not isinstance(comp, base):
                            raise TypeError(
                                f"{hook_name} returned {comp!r}, which is not a {base.__name__}"
                            )
                        if not comp.name:
                            raise TypeError(f"{hook_name} returned a {base.__name__} with no name")
                except Exception as exc:
                    record.fail(f"{hook_name}: {_one_line(exc)}")
                    continue
                record.provides[kind] = [c.name for c in components]
                for comp in components:
                    for key in (comp.name, *comp.aliases):
                        index[kind].setdefault(key, []).append(Provided(comp, record))
        # Failures found late remove the plugin's components everywhere.
        for kind in index:
            for key in list(index[kind]):
                kept = [p for p in index[kind][key] if p.plugin.status != "error"]
                if kept:
                    index[kind][key] = kept
                else:
                    del index[kind][key]
        for kind, names in index.items():
            for key, providers in names.items():
                if len({id(p.plugin) for p in providers}) > 1:
                    for p in providers:
                        others = ", ".join(
                            _describe_plugin(o.plugin) for o in providers if o.plugin is not p.plugin
                        )
                        p.plugin.status = "conflict"
                        p.plugin.error = (
                            f"{COMPONENT_KINDS[kind].kind_label} '{key}' is also provided by {others}"
                        )
        return index

    @property
    def index(self) -> dict[str, dict[str, list[Provided]]]:
        if self._index is None:
            self._index = self._build_index()
        return self._index

    def names(self, kind: str) -> list[str]:
        """The primary names of the loaded components of one kind, sorted."""
        return sorted({p.component.name for ps in self.index[kind].values() for p in ps})

    def components(self, kind: str) -> list[Component]:
        seen: dict[int, Component] = {}
        for providers in self.index[kind].values():
            for p in providers:
                seen.setdefault(id(p.component), p.component)
        return sorted(seen.values(), key=lambda c: c.name)

    def get(self, kind: str, name: str) -> Any:
        """The component of ``kind`` called ``name`` (or one of its aliases).

        Raises UnknownComponentError (listing what is installed and which package provides the
        name, if it is one of ours) or ComponentConflictError (naming both distributions).
        """
        if kind not in KIND_HOOKS:
            raise KeyError(kind)
        label = COMPONENT_KINDS[kind].kind_label
        providers = self.index[kind].get(name)
        if not providers:
            installed = ", ".join(self.names(kind)) or "(none)"
            guess = closest(name, self.index[kind])
            message = f"unknown {label} '{name}'; installed: {installed}"
            if guess:
                message += f" (did you mean '{guess}'?)"
            hints = []
            if name in KNOWN_PROVIDERS:
                pkg = KNOWN_PROVIDERS[name]
                hints.append(f"'{name}' is provided by the package {pkg}: pip install {pkg}")
            broken = [r.name for r in self.records if r.status == "error"]
            if broken:
                hints.append(
                    f"plugins that failed to load: {', '.join(broken)} (see 'mk plugins list')"
                )
            raise UnknownComponentError(message, hint="; ".join(hints) or None)
        if len({id(p.plugin) for p in providers}) > 1:
            who = " and ".join(_describe_plugin(p.plugin) for p in providers)
            raise ComponentConflictError(
                f"{label} '{name}' is provided by both {who}",
                hint="uninstall one of them, or set MK_DISABLE_PLUGINS to the one you do not want",
            )
        return providers[0].component

    def find(self, name: str) -> list[Component]:
        """Every component of any kind whose name or alias is ``name``."""
        return [p.component for kind in self.index for p in self.index[kind].get(name, [])]

    # ----------------------------------------------------------------------- commands

    def register_commands(self, app: Any) -> None:
        """Let every plugin add sub-apps to ``app``; a plugin that raises is recorded."""
        self._commands = {}
        for impl in self.pm.hook.mk_register_commands.get_hookimpls():
            record = self._record(impl.plugin_name)
            groups, commands = len(app.registered_groups), len(app.registered_commands)
            try:
                offered = {"app": app, "host": self}
                impl.function(**{name: offered[name] for name in impl.argnames if name in offered})
            except Exception as exc:
                del app.registered_groups[groups:]
                del app.registered_commands[commands:]
                record.fail(f"mk_register_commands: {_one_line(exc)}")
                continue
            added = [g.name or "?" for g in app.registered_groups[groups:]]
            added += [c.name or getattr(c.callback, "__name__", "?") for c in app.registered_commands[commands:]]
            self._commands[record.name] = added

    def listing(self) -> list[dict[str, Any]]:
        """One JSON-ready entry per plugin: name, distribution, version, provides, status, error."""
        self.index  # noqa: B018 - fills record.provides and statuses
        if self._commands is None:
            import typer

            self.register_commands(typer.Typer())
        out = []
        for record in self.records:
            entry = record.to_json()
            cmds = self._commands.get(record.name) if self._commands else None
            if cmds:
                entry["provides"]["command"] = cmds
            out.append(entry)
        return out


def _describe_plugin(record: PluginRecord) -> str:
    dist = f"{record.distribution} {record.version}" if record.distribution else "no distribution"
    return f"plugin '{record.name}' ({dist})"
