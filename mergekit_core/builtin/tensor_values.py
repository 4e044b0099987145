"""Per-source, per-tensor values written as rules keyed by tensor-name patterns: what the
``per_pattern`` lambda policy holds, what ``slerp`` reads for ``t`` and mk-ties for ``density``
(through ``mergekit_core.api``).

A value is a number (every source, every tensor) or a list of rules, checked in order; the first
rule whose ``match`` (a glob over the tensor name; absent: every tensor) fits and that has a value
for the source gives it::

    - {match: "*self_attn*", values: [0.3, null]}   # source 0 only; source 1 keeps looking
    - {value: [0.2, 0.5, 0.8]}                      # every source: a gradient across layers

A list of numbers is a gradient, interpolated across the layers as mergekit does
(``mergekit.config.evaluate_setting``): layer ``i`` of ``L`` sits at ``t = i / (L - 1)``
(``t = 1`` for a single layer), ``t * (len - 1)`` is split into an index and a fraction, and the
two neighbouring entries are mixed linearly. Tensors outside any layer (embeddings, final norm,
head) sit at ``t = 0``, mergekit's choice, and take the first entry.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Any

from mergekit_core.errors import ParameterError


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_value(v: Any, where: str, lo: float, hi: float) -> None:
    entries = v if isinstance(v, list) else [v]
    if isinstance(v, list) and not v:
        raise ParameterError(f"{where}: an empty list; give a number or a list of numbers across the layers")
    for x in entries:
        if not _number(x):
            raise ParameterError(f"{where}: must be a number or a list of numbers across the layers, got {x!r}")
        if not lo <= x <= hi:
            raise ParameterError(f"{where}: {x!r} is outside {lo:g}..{hi:g}")


def check_rules(value: Any, owner: str, lo: float = 0.0, hi: float = 1.0) -> None:
    """Raise ParameterError unless ``value`` is a number in ``lo..hi`` or a list of rules."""
    if value is None:
        return
    if _number(value):
        _check_value(value, owner, lo, hi)
        return
    if not isinstance(value, list):
        raise ParameterError(f"{owner}: must be a number or a list of rules ({{match, value}} or {{match, values}}), "
                             f"got {value!r}")
    for i, rule in enumerate(value):
        where = f"{owner}[{i}]"
        if not isinstance(rule, Mapping):
            raise ParameterError(f"{where}: a rule is a mapping with 'match' and 'value' (or 'values', one per source)")
        unknown = sorted(set(map(str, rule)) - {"match", "value", "values"})
        if unknown:
            raise ParameterError(f"{where}: unknown key '{unknown[0]}' (a rule has match, value or values)")
        if ("value" in rule) == ("values" in rule):
            raise ParameterError(f"{where}: give exactly one of 'value' (every source) or 'values' (one per source)")
        if "match" in rule and not isinstance(rule["match"], str):
            raise ParameterError(f"{where}: 'match' must be a tensor-name glob such as '*self_attn*'")
        if "value" in rule:
            _check_value(rule["value"], f"{where}.value", lo, hi)
        elif not isinstance(rule["values"], list):
            raise ParameterError(f"{where}.values: must be a list with one entry per source (null: none)")
        else:
            for t, v in enumerate(rule["values"]):
                if v is not None:
                    _check_value(v, f"{where}.values[{t}]", lo, hi)


def check_sources(value: Any, num_sources: int, owner: str) -> None:
    """Raise ParameterError when a rule's ``values`` does not hold one entry per source."""
    for i, rule in enumerate(value if isinstance(value, list) else []):
        if "values" in rule and len(rule["values"]) != num_sources:
            raise ParameterError(f"{owner}[{i}].values has {len(rule['values'])} entries but there are "
                                 f"{num_sources} sources; give one per source (null: none), in source order")


def needs_layers(value: Any) -> bool:
    """Whether some rule holds a gradient (a list across layers), so the layer count matters."""
    if not isinstance(value, list):
        return False
    return any(isinstance(v, list) for rule in value
               for v in ([rule.get("value")] if "value" in rule else rule.get("values") or []))


def gradient_at(values: Sequence[float], layer: int | None, layers: Sequence[int]) -> float:
    """mergekit's interpolation of a gradient list at ``layer`` (None: outside any layer, t = 0)."""
    if layer is None:
        t = 0.0
    else:
        if layer not in layers:
            raise ParameterError(f"layer {layer} is not among the merge's layers; a gradient needs them")
        i, n = list(layers).index(layer), len(layers)
        t = i / (n - 1) if n > 1 else 1.0
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def value_for(value: Any, tensor_name: str, layer: int | None, source: int, layers: Sequence[int]) -> float | None:
    """The value for one source and tensor; None when no rule gives one (the caller's default)."""
    if value is None:
        return None
    if _number(value):
        return float(value)
    for rule in value:
        pattern = rule.get("match")
        if pattern is not None and not fnmatch.fnmatchcase(tensor_name, pattern):
            continue
        if "value" in rule:
            v = rule["value"]
        else:
            given = rule["values"]
            v = given[source] if source < len(given) else None
        if v is None:
            continue
        return float(gradient_at(v, layer, layers)) if isinstance(v, list) else float(v)
    return None
