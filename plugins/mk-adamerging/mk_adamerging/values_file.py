"""The learned coefficients on disk: ``adamerging_values.json`` (the lambda policy's values, which
``weights: PATH`` reuses bit for bit) and ``lambdas.json`` (the same coefficients per tensor, a
lambda table the core's ``per_tensor`` policy reads without this plugin)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergekit_core import ConfigError
from mergekit_core.api import LambdaTable, write_lambda_table

VALUES_FORMAT = "mk-adamerging/values"


def values_bytes(values: dict[str, float], granularity: str, sources: Sequence[str], tensors: Sequence[str],
                 tasks: Sequence[str]) -> bytes:
    data = {"format": VALUES_FORMAT, "version": 1, "granularity": granularity, "sources": list(sources),
            "tasks": list(tasks), "tensors": list(tensors), "values": values}
    return (json.dumps(data, indent=1) + "\n").encode()


def table_bytes(values: dict[str, float], resolve: Any, sources: Sequence[str], tensors: dict[str, int | None]
                ) -> bytes:
    """``resolve(name, layer, t, values)``: the policy's coefficient of source ``t`` for a tensor."""
    rows = {name: [float(resolve(name, layer, t, values)) for t in range(len(sources))]
            for name, layer in tensors.items()}
    return write_lambda_table(LambdaTable(list(sources), rows, None))


def _difference(given: Sequence[str], expected: Sequence[str]) -> str:
    parts = []
    for names, what in ((sorted(set(expected) - set(given)), "it lacks"),
                        (sorted(set(given) - set(expected)), "it has, and this merge does not,")):
        if names:
            parts.append(f"{what} {names[0]!r}" + (f" and {len(names) - 1} more" if len(names) > 1 else ""))
    return "; ".join(parts)


def read_values(path: str | Path, granularity: str, sources: Sequence[str], tensors: Sequence[str]
                ) -> dict[str, float]:
    """The values saved by an earlier AdaMerging run, checked against this merge.

    Raises:
        ConfigError: the file is unreadable or not an AdaMerging values file, or it was learned
            with another granularity, for other sources (by name, in order) or other tensors.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "adamerging_values.json"
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the AdaMerging weights ({exc.strerror or exc}); give the "
                          "adamerging_values.json of a run bundle (or the bundle's directory)") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not a JSON file of AdaMerging weights ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != VALUES_FORMAT:
        raise ConfigError(f"{path}: not an AdaMerging weights file (adamerging_values.json from a run bundle)")
    if data.get("granularity") != granularity:
        raise ConfigError(f"{path}: these weights are {data.get('granularity')}-wise, the config asks for "
                          f"granularity {granularity}; set granularity: {data.get('granularity')}")
    if list(data.get("sources") or []) != list(sources):
        raise ConfigError(f"{path}: the weights were learned for sources {data.get('sources')}, this merge has "
                          f"{list(sources)} (same names, same order)")
    if sorted(data.get("tensors") or []) != sorted(tensors):
        raise ConfigError(f"{path}: the weights are for other tensors than this merge changes: "
                          + _difference(data.get("tensors") or [], tensors))
    values = data.get("values")
    if not isinstance(values, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               and math.isfinite(v) for v in values.values()):
        raise ConfigError(f"{path}: 'values' must map lambda keys to finite numbers; the file is damaged, learn "
                          "the coefficients again")
    return {str(k): float(v) for k, v in values.items()}
