"""Search spaces: what the config's ``space:`` block declares, mapped onto the unit cube the GP sees.

Each entry of ``space`` is one point key (a method or lambda-policy parameter)::

    lambda:  {type: float, min: 0.0, max: 1.0}            # log: true for a log scale (min > 0)
    k:       {type: int, min: 5, max: 50}
    aggregate: {type: categorical, choices: [sum, mean]}
    lambdas: {type: float, min: 0.0, max: 1.0, size: tasks}         # a list, one value per source
    values:  {type: float, min: 0.0, max: 1.0, size: task_layer}    # {'task.<t>.layer.<i>': value}

A float or int is one dimension of [0, 1] (ints by bins of equal width, decoded by rounding
down); a categorical with k choices is k one-hot dimensions, decoded by argmax (as
scikit-optimize's ``CategoricalSpace`` with its one-hot transform); a vector is one dimension per
entry. Decoding snaps a point to what it stands for, so the GP is always trained on points that
were actually evaluated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mergekit_core import ConfigError

VECTOR_SIZES = ("tasks", "task_layer")


@dataclass(frozen=True)
class Dim:
    """One scalar dimension: ``float`` / ``int`` on [lo, hi] (``log`` scale for floats), or a
    ``categorical`` over ``choices`` (``width`` one-hot columns)."""

    kind: str
    lo: float = 0.0
    hi: float = 1.0
    log: bool = False
    choices: tuple[Any, ...] = ()

    @property
    def width(self) -> int:
        return len(self.choices) if self.kind == "categorical" else 1

    def encode(self, value: Any) -> list[float]:
        if self.kind == "categorical":
            return [1.0 if c == value else 0.0 for c in self.choices]
        if self.kind == "int":
            return [(int(value) - self.lo + 0.5) / (self.hi - self.lo + 1)]
        if self.hi == self.lo:
            return [0.5]
        if self.log:
            return [(math.log(value) - math.log(self.lo)) / (math.log(self.hi) - math.log(self.lo))]
        return [(float(value) - self.lo) / (self.hi - self.lo)]

    def decode(self, u: Sequence[float]) -> Any:
        if self.kind == "categorical":
            return self.choices[int(np.argmax(u))]
        x = min(max(float(u[0]), 0.0), 1.0)
        if self.kind == "int":
            return int(min(self.lo + math.floor(x * (self.hi - self.lo + 1)), self.hi))
        if self.log:
            value = math.exp(math.log(self.lo) + x * (math.log(self.hi) - math.log(self.lo)))
        else:
            value = self.lo + x * (self.hi - self.lo)
        return min(max(float(f"{value:.6g}"), self.lo), self.hi)  # readable keys, inside the box

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        return self.lo - 1e-12 <= value <= self.hi + 1e-12 and (self.kind != "int" or float(value).is_integer())


@dataclass(frozen=True)
class Entry:
    """One point key: a scalar (``shape`` None), a list (``shape`` 'list', one dim per source) or
    a per-task-and-layer dict (``shape`` 'dict', ``names`` its keys)."""

    key: str
    dim: Dim
    shape: str | None = None
    names: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        return 1 if self.shape is None else len(self.names)


class Space:
    """A box of named entries, encoded into ``[0, 1]^width``."""

    def __init__(self, entries: Sequence[Entry]) -> None:
        self.entries = list(entries)
        self.width = sum(e.dim.width * e.count for e in self.entries)

    @property
    def keys(self) -> list[str]:
        return [e.key for e in self.entries]

    @property
    def numeric_1d(self) -> bool:
        """One float or int dimension (what the 1-D plot of the GP draws)."""
        return len(self.entries) == 1 and self.entries[0].count == 1 and self.entries[0].dim.kind != "categorical"

    def _values(self, entry: Entry, value: Any) -> list[Any]:
        if entry.shape is None:
            return [value]
        if entry.shape == "list":
            return list(value)
        return [value[n] for n in entry.names]

    def encode(self, point: Mapping[str, Any]) -> np.ndarray:
        out: list[float] = []
        for e in self.entries:
            for v in self._values(e, point[e.key]):
                out.extend(e.dim.encode(v))
        return np.asarray(out, dtype=float)

    def decode(self, u: np.ndarray) -> dict[str, Any]:
        point: dict[str, Any] = {}
        i = 0
        for e in self.entries:
            values = []
            for _ in range(e.count):
                values.append(e.dim.decode(u[i:i + e.dim.width]))
                i += e.dim.width
            if e.shape is None:
                point[e.key] = values[0]
            elif e.shape == "list":
                point[e.key] = values
            else:
                point[e.key] = dict(zip(e.names, values))
        return point

    def contains(self, point: Mapping[str, Any]) -> bool:
        """Whether ``point`` has exactly this space's keys, each inside its box."""
        if set(point) != set(self.keys):
            return False
        for e in self.entries:
            value = point[e.key]
            if e.shape == "list" and (not isinstance(value, list) or len(value) != e.count):
                return False
            if e.shape == "dict" and (not isinstance(value, dict) or set(value) != set(e.names)):
                return False
            if not all(e.dim.contains(v) for v in self._values(e, value)):
                return False
        return True


def point_key(point: Mapping[str, Any]) -> str:
    """The identity of a point (the sweep journal's, so resumed and reused points match)."""
    return json.dumps(point, sort_keys=True, default=str)


def _number(where: str, spec: Mapping[str, Any], name: str) -> float:
    value = spec.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{where}: '{name}' must be a finite number, got {value!r}")
    return float(value)


def parse_dim(where: str, spec: Any, nonnegative: bool) -> Dim:
    """One entry's scalar dimension, checked (the message names ``where``)."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: give {{type: float, min: ..., max: ...}}, {{type: int, ...}} or "
                          f"{{type: categorical, choices: [...]}}, got {spec!r}")
    kind = spec.get("type", "categorical" if "choices" in spec else "float")
    known = {"float": {"type", "min", "max", "log", "size"}, "int": {"type", "min", "max", "size"},
             "categorical": {"type", "choices", "size"}}
    if kind not in known:
        raise ConfigError(f"{where}: type must be float, int or categorical, got {kind!r}")
    unknown = sorted(set(spec) - known[kind])
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' for type {kind} (keys: {', '.join(sorted(known[kind]))})")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: a categorical needs a non-empty list of choices")
        return Dim("categorical", choices=tuple(choices))
    lo, hi = _number(where, spec, "min"), _number(where, spec, "max")
    if lo > hi:
        raise ConfigError(f"{where}: min {lo:g} is greater than max {hi:g}")
    if nonnegative and hi < 0:
        raise ConfigError(f"{where}: the whole range [{lo:g}, {hi:g}] is negative but constraint_nonnegative is "
                          "true; search values >= 0 or drop the constraint")
    if nonnegative:
        lo = max(lo, 0.0)
    log = bool(spec.get("log", False))
    if log and lo <= 0:
        raise ConfigError(f"{where}: a log scale needs min > 0, got {lo:g}")
    if kind == "int":
        if not (lo.is_integer() and hi.is_integer()):
            raise ConfigError(f"{where}: an int range needs whole-number min and max, got {lo:g} and {hi:g}")
        return Dim("int", lo, hi)
    return Dim("float", lo, hi, log=log)


def parse_space(space: Any, *, num_sources: int, layers: Callable[[], Sequence[int]],
                nonnegative: bool = False, where: str = "search.space") -> Space:
    """The ``space:`` block as a :class:`Space`; every problem is a one-line ``ConfigError``.

    ``num_sources``: the merge's sources (what ``size: tasks`` means); ``layers()``: the layer
    indices, called only for ``size: task_layer``.
    """
    if not isinstance(space, Mapping) or not space:
        raise ConfigError(f"{where}: the space is empty; give at least one entry, "
                          "e.g. lambda: {type: float, min: 0.0, max: 1.0}")
    entries = []
    for key, spec in space.items():
        at = f"{where}.{key}"
        dim = parse_dim(at, spec, nonnegative)
        size = spec.get("size")
        if size is None:
            entries.append(Entry(str(key), dim))
        elif size == "tasks" or (isinstance(size, int) and not isinstance(size, bool)):
            if size != "tasks" and size != num_sources:
                raise ConfigError(f"{at}: size {size} does not match the {num_sources} sources (one value per "
                                  "task); write size: tasks")
            entries.append(Entry(str(key), dim, "list", tuple(str(t) for t in range(num_sources))))
        elif size == "task_layer":
            names = tuple(f"task.{t}.layer.{i}" for t in range(num_sources) for i in layers())
            if not names:
                raise ConfigError(f"{at}: size task_layer, but the merge has no layers")
            entries.append(Entry(str(key), dim, "dict", names))
        else:
            raise ConfigError(f"{at}: size must be tasks, task_layer or the number of sources, got {size!r}")
    return Space(entries)
