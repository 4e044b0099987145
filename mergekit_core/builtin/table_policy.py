"""The ``per_tensor`` lambda policy: one lambda per source and tensor, from a table file or from an
optimizer (what layer-wise AdaMerging learns: "layer" there is every parameter tensor).

Values: ``task.<t>`` (the source's default, for tensors the table does not list) and
``task.<t>.tensor.<name>``. Source names in a table are not checked against the merge's (the
policy sees only their number); AdaMerging's ``weights:`` file is checked by name. The table file is JSON, written by ``write_lambda_table``::

    {"format": "mergekit-core/lambda-table", "version": 1,
     "sources": ["math", "code"], "default": [0.3, 0.3],
     "tensors": {"model.layers.0.mlp.up_proj.weight": [0.21, 0.35], ...}}
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_core.builtin.policies import PerTask, _task_lambdas
from mergekit_core.components import LambdaPolicy, Param
from mergekit_core.errors import ConfigError

TABLE_FORMAT = "mergekit-core/lambda-table"


@dataclass
class LambdaTable:
    """Per-source lambdas: ``tensors[name][t]`` for source ``t``; ``default[t]`` elsewhere (or None:
    every merged tensor must be listed)."""

    sources: list[str]
    tensors: dict[str, list[float]]
    default: list[float] | None = None

    def values(self) -> dict[str, float]:
        """The ``per_tensor`` policy's values for this table."""
        out: dict[str, float] = {}
        if self.default is not None:
            out.update({f"task.{t}": v for t, v in enumerate(self.default)})
        for name, row in self.tensors.items():
            out.update({f"task.{t}.tensor.{name}": v for t, v in enumerate(row)})
        return out

    def to_json(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, "version": 1, "sources": self.sources, "default": self.default,
                "tensors": self.tensors}


def _numbers(row: Any, size: int, where: str) -> list[float]:
    if not isinstance(row, list) or len(row) != size or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in row):
        raise ConfigError(f"{where}: expected a list of {size} finite numbers (one per source), got {row!r}")
    return [float(v) for v in row]


def read_lambda_table(path: str | Path) -> LambdaTable:
    """Read and check a lambda table file.

    Raises:
        ConfigError: the file is missing, not JSON, not a lambda table, or a row has the wrong
            length or a non-finite value (the message names the file and the entry).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the lambda table ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not a JSON lambda table ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        raise ConfigError(f"{path}: not a lambda table (no \"format\": \"{TABLE_FORMAT}\"); "
                          "mk writes one as lambdas.json in the run bundle of an AdaMerging merge")
    sources = data.get("sources")
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) for s in sources):
        raise ConfigError(f"{path}: 'sources' must be the list of source names")
    tensors = data.get("tensors")
    if not isinstance(tensors, dict):
        raise ConfigError(f"{path}: 'tensors' must map tensor names to one lambda per source")
    default = data.get("default")
    return LambdaTable(
        list(sources),
        {str(k): _numbers(v, len(sources), f"{path}: tensor {k!r}") for k, v in tensors.items()},
        None if default is None else _numbers(default, len(sources), f"{path}: 'default'"),
    )


def write_lambda_table(table: LambdaTable) -> bytes:
    """The table as the bytes of its JSON file. Floats are written as Python's shortest repr, so
    reading the file back gives the very same float64 values (a merge from it is bit for bit)."""
    return (json.dumps(table.to_json(), indent=1) + "\n").encode()


class PerTensor(LambdaPolicy):
    name = "per_tensor"
    description = ("One lambda per source and tensor, from a table file (what layer-wise AdaMerging "
                   "writes) or an optimizer.")
    params = (
        Param("table", None, "a lambda table JSON file (lambdas.json from an AdaMerging run bundle)", type=str),
        *PerTask.params,
        Param("fallback", None, "with a table: the value of every tensor it does not list (default: none, "
              "such a tensor is an error); 'lambdas' gives one per source instead", type=float),
    )

    def validate(self, params: dict[str, Any]) -> None:
        PerTask.validate(self, params)  # type: ignore[arg-type]

    def initial_values(self, params: dict[str, Any], num_sources: int, layers: Sequence[int]) -> dict[str, float]:
        """Without a table: one value per source (``lambdas``, else ``lambda``, the method's lambda
        by default). With one: its entries, its own default, and ``lambdas`` or ``fallback`` for the
        tensors it does not list; ``lambda`` is not used then, so a table that misses a tensor is
        an error rather than a silent default.

        Raises:
            ConfigError: the table is unreadable or for another number of sources.
        """
        if params["table"] is None:
            return {f"task.{t}": v for t, v in enumerate(_task_lambdas(params, num_sources, self.label))}
        table = read_lambda_table(params["table"])
        if len(table.sources) != num_sources:
            raise ConfigError(f"{params['table']}: the lambda table is for {len(table.sources)} sources "
                              f"({', '.join(table.sources)}), this merge has {num_sources}")
        defaults: dict[str, float] = {}
        if params["lambdas"] is not None:
            defaults = {f"task.{t}": v for t, v in enumerate(_task_lambdas(params, num_sources, self.label))}
        elif params["fallback"] is not None:
            defaults = {f"task.{t}": float(params["fallback"]) for t in range(num_sources)}
        return {**table.values(), **defaults}

    def space(self, params: dict[str, Any], num_sources: int, layers: Sequence[int]) -> list[str]:
        return [f"task.{t}" for t in range(num_sources)]

    def resolve(self, tensor_name: str, layer: int | None, source_index: int,
                values: Mapping[str, float]) -> float:
        value = values.get(f"task.{source_index}.tensor.{tensor_name}")
        if value is None:
            value = values.get(f"task.{source_index}")
        if value is None:
            raise ConfigError(f"lambda policy per_tensor: no lambda for tensor {tensor_name!r} of source "
                              f"{source_index}: the table does not list it and gives no default",
                              hint="was the table learned for this merge? Add the tensor to it, or give "
                                   "'fallback' (or 'lambdas') for the tensors it does not list")
        return value


TABLE_POLICIES = [PerTensor()]
