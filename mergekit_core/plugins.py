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

import functools
import importlib
import importlib.metadata
import importlib.resources
import os
import sys
import tomllib
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy

from mergekit_core import hookspecs
from mergekit_core.components import COMPONENT_KINDS, KIND_HOOKS, Component, closest
from mergekit_core.errors import ComponentConflictError, UnknownComponentError

ENTRY_POINT_GROUP = "mergekit_core"
BUILTIN_MODULE = "mergekit_core.builtin"

CATALOG_RESOURCE = "plugin_catalog.toml"


@dataclass(frozen=True)
class CatalogEntry:
    """One plugin of this project, from ``plugin_catalog.toml``: where it comes from, what it provides."""

    distribution: str
    source: str
    index: str
    provides: dict[str, tuple[str, ...]]

    def install_hint(self) -> str:
        """How to get this plugin; a ``pip install`` of an index name only when the project publishes it."""
        if self.index:
            return f"pip install {self.index}"
        if self.source:
            return f"pip install -e {self.source} from a checkout"
        return "it is not available yet"


@dataclass(frozen=True)
class Catalog:
    plugins: tuple[CatalogEntry, ...] = ()
    foreign: dict[str, dict[str, str]] = field(default_factory=dict)

    def providers(self, name: str) -> list[tuple[CatalogEntry, str]]:
        """(plugin, kind) for every catalogued plugin that provides ``name``."""
        return [(e, kind) for e in self.plugins for kind, names in e.provides.items() if name in names]


@functools.cache
def load_catalog() -> Catalog:
    """The core's list of this project's plugins and of foreign method names (empty if not shipped)."""
    try:
        text = importlib.resources.files("mergekit_core").joinpath(CATALOG_RESOURCE).read_text("utf-8")
    except OSError:
        return Catalog()
    data = tomllib.loads(text)
    plugins = tuple(
        CatalogEntry(
            dist,
            str(info.get("source", "")),
            str(info.get("index", "")),
            {kind: tuple(info[kind]) for kind in KIND_HOOKS if kind in info},
        )
        for dist, info in data.get("plugins", {}).items()
    )
    return Catalog(plugins, {k: dict(v) for k, v in data.get("foreign", {}).items()})


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
    key: str = ""
    """The name registered with pluggy: ``name``, unless another distribution's entry point has it too."""
    entry_point: str | None = None
    traceback: str | None = None
    """The traceback of the failure, shown under MK_DEBUG=1."""
    rivals: list[str] = field(default_factory=list)
    """The other distributions (``name version``) that registered the same entry-point name."""

    def __post_init__(self) -> None:
        self.key = self.key or self.name

    def fail(self, error: str, exc: BaseException | None = None) -> None:
        self.status = "error"
        self.error = error
        if exc is not None:
            self.traceback = "".join(traceback.format_exception(exc))

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


def debug_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether MK_DEBUG asks for tracebacks."""
    return (os.environ if environ is None else environ).get("MK_DEBUG", "") not in ("", "0")


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
        self.skipped: list[tuple[str, str | None]] = []
        """(entry-point name, distribution) of the plugins MK_LOAD_PLUGINS/MK_DISABLE_PLUGINS left out."""
        self.debug = debug_enabled(environ)
        self._index: dict[str, dict[str, list[Provided]]] | None = None
        self._commands: dict[str, list[str]] | None = None
        from mergekit_core.version import __version__

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
        key: str | None = None,
        entry_point: str | None = None,
    ) -> PluginRecord:
        """Register a plugin object (usually a module); failures are recorded, not raised.

        ``key`` is the name given to pluggy when it must differ from ``name`` (two distributions
        registering the same entry-point name).
        """
        module = getattr(plugin, "__name__", type(plugin).__name__)
        record = PluginRecord(name, module, distribution, version, builtin, key=key or name,
                              entry_point=entry_point)
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
            self.pm.register(plugin, name=record.key)
        except Exception as exc:  # a plugin's bad signature must not break mk
            if self.pm.has_plugin(record.key):
                self.pm.unregister(name=record.key)
            self._fail(record, _one_line(exc), exc)
        return record

    def _fail(self, record: PluginRecord, error: str, exc: BaseException | None = None) -> None:
        record.fail(error, exc)
        if self.debug and record.traceback:
            print(f"mk: plugin '{record.name}' ({record.distribution or 'no distribution'}) failed:\n"
                  f"{record.traceback}", file=sys.stderr, end="")

    def load_entry_points(self, environ: Mapping[str, str]) -> None:
        """Import and register every selected entry point of the group ``mergekit_core``.

        Two distributions registering the same entry-point name are both loaded (under distinct
        pluggy names) and marked ``conflict``: everything either provides is then an error naming
        both. The same distribution seen twice (same name, same entry point) loads once.
        """
        added: list[PluginRecord] = []
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            if not _selected(ep.name, dist, environ):
                self.skipped.append((ep.name, dist))
                continue
            same_name = [r for r in self.records if r.name == ep.name]
            if any(_norm(r.distribution or "") == _norm(dist or "") and r.entry_point == ep.value
                   for r in same_name):
                continue  # the same distribution visible twice on sys.path
            key = ep.name if not same_name else f"{ep.name}@{dist}"
            while any(r.key == key for r in self.records):
                key += "+"
            if any(r.builtin for r in same_name):
                record = PluginRecord(ep.name, ep.value, dist, version, key=key, entry_point=ep.value)
                record.fail(f"the entry-point name '{ep.name}' is reserved for mergekit-core's built-ins; "
                            "the plugin must use another name")
                self.records.append(record)
                continue
            try:
                module = ep.load()
            except Exception as exc:  # import errors of a plugin are its own
                record = PluginRecord(ep.name, ep.value, dist, version, key=key, entry_point=ep.value)
                self.records.append(record)
                self._fail(record, _one_line(exc), exc)
            else:
                record = self.register(module, ep.name, distribution=dist, version=version, key=key,
                                       entry_point=ep.value)
            added.append(record)
        for record in added:
            others = [r for r in self.records if r.name == record.name and r is not record]
            if not others:
                continue
            record.rivals = [_describe_dist(r) for r in others]
            if record.status != "error":
                record.status = "conflict"
                record.error = (f"the entry-point name '{record.name}' is also registered by "
                                f"{', '.join(record.rivals)}")

    # ----------------------------------------------------------------------- components

    def _record(self, key: str) -> PluginRecord:
        return next(r for r in self.records if r.key == key)

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
                    self._fail(record, f"{hook_name}: {_one_line(exc)}", exc)
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
                        if p.plugin.rivals:
                            continue  # its entry-point conflict says more
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
            raise self.unknown(name, kind)
        contested = next((p.plugin for p in providers if p.plugin.rivals), None)
        if contested is not None:
            raise self.contested(contested.name, f"{label} '{name}'")
        if len({id(p.plugin) for p in providers}) > 1:
            who = " and ".join(_describe_plugin(p.plugin) for p in providers)
            raise ComponentConflictError(
                f"{label} '{name}' is provided by both {who}",
                hint="uninstall one of them, or set MK_DISABLE_PLUGINS to the one you do not want",
            )
        return providers[0].component

    def contested(self, plugin: str, subject: str | None = None) -> ComponentConflictError:
        """The error for using the entry-point name ``plugin``, which several distributions register
        (``subject``: the component that was asked for, if it was one)."""
        rivals = [r for r in self.records if r.name == plugin]
        described = [_describe_dist(r) for r in rivals]
        dists = ("both " if len(described) == 2 else "") + ", ".join(described[:-1]) + f" and {described[-1]}"
        what = (f"{subject} comes from plugin '{plugin}', whose name is" if subject
                else f"the plugin name '{plugin}' is")
        names = ", ".join(r.distribution or "?" for r in rivals)
        return ComponentConflictError(
            f"{what} registered by {dists}",
            hint=f"uninstall one of them, or hide one with MK_DISABLE_PLUGINS=DISTRIBUTION (one of: {names})",
        )

    def unknown(self, name: str, kind: str | None = None) -> UnknownComponentError:
        """The error for ``name``, which no loaded plugin provides as ``kind`` (as any kind if None).

        Its hint says what the name is: a component of another kind, a component of one of this
        project's plugins (and how to get it, never a 'pip install' of an unpublished name), a
        mergekit or FusionBench name; 'did you mean' only when none of these applies.
        """
        if kind is not None:
            label = COMPONENT_KINDS[kind].kind_label
            installed = ", ".join(self.names(kind)) or "(none)"
            message = f"unknown {label} '{name}'; installed: {installed}"
            known: set[str] = set(self.index[kind])
        else:
            message = f"no installed component is called '{name}', nor any plugin"
            known = {key for names in self.index.values() for key in names} | {r.name for r in self.records}
        hints = self._name_hints(name, kind)
        guess = None if hints else closest(name, known)
        if guess:
            message += f" (did you mean '{guess}'?)"
        broken = [r.name for r in self.records if r.status == "error"]
        if broken:
            hints.append(f"plugins that failed to load: {', '.join(broken)} (see 'mk plugins list')")
        left_out = sorted({dist or ep for ep, dist in self.skipped})
        if left_out and not any("left out" in h for h in hints):
            hints.append(f"installed plugins left out by MK_LOAD_PLUGINS / MK_DISABLE_PLUGINS: {', '.join(left_out)}")
        return UnknownComponentError(message, hint="; ".join(hints) or None)

    def _name_hints(self, name: str, kind: str | None) -> list[str]:
        hints = []
        catalog = load_catalog()
        for other in KIND_HOOKS:
            if other != kind and name in self.index[other]:
                comp = self.index[other][name][0].component
                hints.append(self._other_kind_hint(name, other, kind, comp))
        loaded = any(name in self.index[k] for k in KIND_HOOKS)
        for entry, provided_kind in [] if loaded else catalog.providers(name):
            prefix = ""
            if kind is not None and provided_kind != kind:
                prefix = self._other_kind_hint(name, provided_kind, kind, None) + "; "
            hints.append(prefix + self._source_hint(name, entry))
        foreign = catalog.foreign.get(name)
        if foreign is not None:
            origin = foreign.get("origin", "another toolkit")
            if foreign.get("use"):
                hints.append(f"'{name}' is {origin}'s name; here use the {foreign['use']}")
            else:
                hints.append(f"'{name}' ({origin}'s method) is not available in mergekit-core yet")
        return hints

    def _other_kind_hint(self, name: str, found: str, wanted: str | None, comp: Component | None) -> str:
        found_label = COMPONENT_KINDS[found].kind_label
        if wanted is None:
            return f"'{name}' is a {found_label}"
        text = f"'{name}' is a {found_label}, not a {COMPONENT_KINDS[wanted].kind_label}"
        if found == "transform" and wanted == "merge_method":
            if comp is None:
                ref = f"{{name: {name}, params: {{...}}}}"
            elif comp.params:
                ref = f"{{name: {name}, params: {{{', '.join(f'{p.name}: {p.default}' for p in comp.params)}}}}}"
            else:
                ref = name
            text += (f": list it under transforms in the config (transforms: [{ref}]) with a linear method "
                     "such as task_arithmetic")
            related = sorted({n for n in self.names("merge_method") if n.startswith(f"{name}_")}
                             | {n for e in load_catalog().plugins for n in e.provides.get("merge_method", ())
                                if n.startswith(f"{name}_")})
            if related:
                text += f", or use the method {' or '.join(related)}"
        else:
            text += f" (see 'mk plugins show {name}')"
        return text

    def _source_hint(self, name: str, entry: CatalogEntry) -> str:
        dist = entry.distribution
        installed = next((r for r in self.records if _norm(r.distribution or "") == _norm(dist)), None)
        if installed is not None and installed.status == "error":
            return (f"'{name}' comes from {dist}, which is installed but failed to load: {installed.error} "
                    f"(MK_DEBUG=1 mk plugins show {installed.name} shows the traceback)")
        if any(_norm(d or "") == _norm(dist) for _, d in self.skipped):
            return f"'{name}' comes from {dist}, which is installed but left out by MK_LOAD_PLUGINS/MK_DISABLE_PLUGINS"
        if entry.index:
            return f"'{name}' comes from the {dist} plugin: {entry.install_hint()}"
        if entry.source:
            folder = entry.source.rsplit("/", 1)[0] + "/" if "/" in entry.source else entry.source
            return (f"'{name}' comes from the {dist} plugin in this project's {folder} folder: "
                    f"{entry.install_hint()}")
        return f"'{name}' is planned for the {dist} plugin, which is not available yet"

    def plugins_named(self, name: str) -> list[PluginRecord]:
        """The plugins whose entry-point name or distribution name is ``name``."""
        return [r for r in self.records if r.name == name or _norm(r.distribution or "") == _norm(name)]

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
                self._fail(record, f"mk_register_commands: {_one_line(exc)}", exc)
                continue
            added = [g.name or "?" for g in app.registered_groups[groups:]]
            added += [c.name or getattr(c.callback, "__name__", "?") for c in app.registered_commands[commands:]]
            self._commands[record.key] = added

    def listing(self) -> list[dict[str, Any]]:
        """One JSON-ready entry per plugin: name, distribution, version, provides, status, error."""
        self.index  # noqa: B018 - fills record.provides and statuses
        if self._commands is None:
            import typer

            self.register_commands(typer.Typer())
        out = []
        for record in self.records:
            entry = record.to_json()
            cmds = self._commands.get(record.key) if self._commands else None
            if cmds:
                entry["provides"]["command"] = cmds
            out.append(entry)
        return out


def _describe_dist(record: PluginRecord) -> str:
    return f"{record.distribution} {record.version}" if record.distribution else "no distribution"


def _describe_plugin(record: PluginRecord) -> str:
    return f"plugin '{record.name}' ({_describe_dist(record)})"
