"""Open the base and the sources lazily, and say which output tensor each source provides, and how.

A full checkpoint provides its tensors as weights. An adapter provides a dense delta for each
base weight it changes (applied to its saved ``base_layer`` copy of that weight, when it has
one), and full replacements for ``modules_to_save`` copies. Adapter module paths are relative to
the class the adapter was trained on; they are matched to the base checkpoint's names by trying
the common prefix rewrites. Those that match no stored base tensor are kept in
``Source.unresolved``: the plan matches them to tied tensors, or reports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mergekit_core.config import MergeSpec, SourceSpec
from mergekit_core.errors import MergeError
from mergekit_core.io.formats import open_checkpoint
from mergekit_core.io.peft_reader import AdapterReader
from mergekit_core.plugins import PluginHost

PREFIX_REWRITES = (("", ""), ("model.", ""), ("", "model."), ("language_model.", ""),
                   ("", "language_model."), ("model.language_model.", "model."))


@dataclass(frozen=True)
class Contribution:
    """How one source provides one output tensor.

    ``kind``: ``weight`` (a full tensor read from the source), ``delta`` (an adapter's dense delta
    of base tensor ``key``), ``replacement`` (a full tensor stored in an adapter under ``key``),
    ``base_copy`` (an adapter's saved ``base_layer`` copy, under ``key``, of a tensor it has no
    delta for: the source's value of that tensor).

    ``copy``: for a ``delta``, the key of the adapter's saved ``base_layer`` copy of the tensor;
    the source's value is then ``copy + delta(copy)``, as peft loads it.
    """

    kind: str
    key: str
    copy: str | None = None


@dataclass
class Source:
    spec: SourceSpec
    reader: Any
    contributions: dict[str, Contribution] = field(default_factory=dict)
    unresolved: dict[str, Contribution] = field(default_factory=dict)
    """Adapter tensors (adapter-relative names) that match no tensor the base stores."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def is_adapter(self) -> bool:
        return isinstance(self.reader, AdapterReader)

    def close(self) -> None:
        self.reader.close()


def resolve_name(name: str, base_names: set[str]) -> str | None:
    """The base tensor that an adapter's tensor name refers to, trying common prefix rewrites."""
    for old, new in PREFIX_REWRITES:
        if name.startswith(old):
            candidate = new + name[len(old):]
            if candidate in base_names:
                return candidate
    return None


def open_sources(spec: MergeSpec, host: PluginHost) -> tuple[Any, list[Source]]:
    """Open base (or None) and every source; headers and configs only."""
    base = open_checkpoint(spec.base_model, host) if spec.base_model else None
    if isinstance(base, AdapterReader):
        raise MergeError(f"base_model {spec.base_model}: is a PEFT adapter; give the base model it was trained on")
    base_names = set(base.infos()) if base is not None else None
    sources = []
    for s in spec.sources:
        reader = open_checkpoint(s.path, host)
        source = Source(s, reader)
        if isinstance(reader, AdapterReader):
            _map_adapter(source, reader, base_names)
        else:
            source.contributions = {n: Contribution("weight", n) for n in reader.infos()}
        sources.append(source)
    return base, sources


def _map_adapter(source: Source, reader: AdapterReader, base_names: set[str] | None) -> None:
    targets = reader.targets()
    entries = [(t, Contribution("delta", t, reader.base_copies.get(t))) for t in targets]
    entries += [(t, Contribution("base_copy", key)) for t, key in reader.base_copies.items() if t not in targets]
    entries += [(t, Contribution("replacement", key)) for t, key in reader.replacements.items()]
    for target, contribution in entries:
        name = target
        if base_names is not None:
            name = resolve_name(target, base_names)
            if name is None:
                role = targets.get(target, (None, "weight"))[1]
                if contribution.kind == "delta" and role == "bias" and reader.peft_type == "IA3":
                    continue  # IA3 scales a bias only where the module has one
                source.unresolved[target] = contribution
                continue
        source.contributions[name] = contribution
