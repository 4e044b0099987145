"""Built-in lambda policies: scalar, per_layer, per_task, per_task_layer, per_pattern.

A policy's ``values`` are a flat ``{key: float}`` dict, which is what optimizers and sweeps
search over. Keys: ``lambda``; ``default`` and ``layer.<i>``; ``task.<t>``;
``task.<t>`` and ``task.<t>.layer.<i>``; ``rule.<r>.task.<t>[.layer.<i>]@<pattern>`` (per_pattern).
Tensors outside any layer (embeddings, final norms) use the default, or the task's own value.
"""

from __future__ import annotations

import fnmatch
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from mergekit_core.components import LambdaPolicy, Param
from mergekit_core.errors import ParameterError


def parse_layer_overrides(overrides: Mapping[Any, Any], owner: str) -> dict[int, float]:
    """``{3: 0.5, "4-6": 0.2, "7:9": 0.1}`` -> ``{3: 0.5, 4: 0.2, 5: 0.2, 6: 0.2, 7: 0.1, 8: 0.1}``.

    ``a-b`` is inclusive; ``a:b`` excludes ``b`` as Python slices do.
    """
    out: dict[int, float] = {}
    for key, value in overrides.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ParameterError(f"{owner}: override for layer {key!r} must be a number, got {value!r}")
        text = str(key).strip()
        try:
            if "-" in text:
                lo, hi = (int(x) for x in text.split("-", 1))
                layers = range(lo, hi + 1)
            elif ":" in text:
                lo, hi = (int(x) for x in text.split(":", 1))
                layers = range(lo, hi)
            else:
                layers = range(int(text), int(text) + 1)
        except ValueError:
            raise ParameterError(
                f"{owner}: layer override key {key!r} is not a layer index or range "
                "(use 3, '4-6' inclusive, or '4:7')"
            ) from None
        if not layers:
            raise ParameterError(f"{owner}: layer range {key!r} is empty")
        for layer in layers:
            out[layer] = float(value)
    return out


class Scalar(LambdaPolicy):
    name = "scalar"
    description = "One lambda for every tensor and source."
    params = (Param("lambda", None, "the value; defaults to the method's 'lambda' parameter, else 1.0",
                    type=float),)

    def initial_values(self, params: dict[str, Any], num_sources: int, layers: Sequence[int]) -> dict[str, float]:
        value = params["lambda"]
        return {"lambda": 1.0 if value is None else float(value)}

    def resolve(self, tensor_name: str, layer: int | None, source_index: int,
                values: Mapping[str, float]) -> float:
        return values["lambda"]


class PerLayer(LambdaPolicy):
    name = "per_layer"
    description = "A default lambda plus overrides by layer index or range (e.g. {'0-3': 0.5})."
    params = (
        Param("default", None, "lambda of layers without an override; defaults to the method's lambda",
              type=float),
        Param("overrides", {}, "layer index or range -> lambda: 3, '4-6' (inclusive) or '4:7'", type=dict),
    )

    def validate(self, params: dict[str, Any]) -> None:
        parse_layer_overrides(params["overrides"], self.label)

    def initial_values(self, params: dict[str, Any], num_sources: int, layers: Sequence[int]) -> dict[str, float]:
        default = 1.0 if params["default"] is None else float(params["default"])
        values = {"default": default}
        overrides = parse_layer_overrides(params["overrides"], self.label)
        for layer in layers:
            values[f"layer.{layer}"] = overrides.get(layer, default)
        return values

    def resolve(self, tensor_name: str, layer: int | None, source_index: int,
                values: Mapping[str, float]) -> float:
        if layer is None:
            return values["default"]
        return values.get(f"layer.{layer}", values["default"])


def _task_lambdas(params: dict[str, Any], num_sources: int, owner: str) -> list[float]:
    given = params["lambdas"]
    if given is None:
        value = 1.0 if params["lambda"] is None else float(params["lambda"])
        return [value] * num_sources
    if len(given) != num_sources:
        raise ParameterError(
            f"{owner}: 'lambdas' has {len(given)} values but there are {num_sources} sources; "
            "give one value per source, in the order of 'sources'"
        )
    return [float(v) for v in given]


class PerTask(LambdaPolicy):
    name = "per_task"
    description = "One lambda per source (task)."
    params = (
        Param("lambdas", None, "one value per source, in source order", type=list),
        Param("lambda", None, "value of every source when 'lambdas' is not given; "
              "defaults to the method's lambda", type=float),
    )

    def validate(self, params: dict[str, Any]) -> None:
        for v in params["lambdas"] or []:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ParameterError(f"{self.label}: every entry of 'lambdas' must be a number, got {v!r}")

    def initial_values(self, params: dict[str, Any], num_sources: int, layers: Sequence[int]) -> dict[str, float]:
        return {f"task.{t}": v for t, v in enumerate(_task_lambdas(params, num_sources, self.label))}

    def resolve(self, tensor_name: str, layer: int | None, source_index: int,
                values: Mapping[str, float]) -> float:
        return values[f"task.{source_index}"]


class PerTaskLayer(LambdaPolicy):
    name = "per_task_layer"
    description = "One lambda per source and layer (what layer-wise AdaMerging learns)."
    params = PerTask.params + (
        Param("values", {}, "explicit entries 'task.<t>.layer.<i>' -> lambda, e.g. from an optimizer",
              type=dict),
    )

    def validate(self, params: dict[str, Any]) -> None:
        PerTask.validate(self, params)  # type: ignore[arg-type]

    def initial_values(self, params: dict[str, Any], num_sources: int, layers: Sequence[int]) -> dict[str, float]:
        values: dict[str, float] = {}
        for t, v in enumerate(_task_lambdas(params, num_sources, self.label)):
            values[f"task.{t}"] = v
            for layer in layers:
                values[f"task.{t}.layer.{layer}"] = v
        for key, v in params["values"].items():
            if key not in values:
                raise ParameterError(f"{self.label}: unknown entry {key!r} in 'values'; "
                                     f"entries look like 'task.0.layer.3'")
            values[key] = float(v)
        return values

    def resolve(self, tensor_name: str, layer: int | None, source_index: int,
                values: Mapping[str, float]) -> float:
        if layer is None:
            return values[f"task.{source_index}"]
        return values.get(f"task.{source_index}.layer.{layer}", values[f"task.{source_index}"])


POLICIES = [Scalar(), PerLayer(), PerTask(), PerTaskLayer()]


class PerPattern(LambdaPolicy):
    """Values keyed by tensor-name patterns, per source, optionally varying across layers: what
    mergekit's ``filter:`` entries and gradient lists express (``mk config convert`` writes it).

    ``rules``: the format of :mod:`mergekit_core.builtin.tensor_values`. Values: ``default`` (when
    given), ``rule.<r>.task.<t>`` (a number, or the value outside the layers of a gradient) and
    ``rule.<r>.task.<t>.layer.<i>`` (a gradient at layer ``i``); a rule's pattern follows ``@``
    in its keys, so that ``resolve`` reads everything from the values.
    """

    name = "per_pattern"
    description = ("Lambdas keyed by tensor-name patterns (globs), per source, optionally a gradient across "
                   "layers (mergekit's filter: and gradient lists).")
    params = (
        Param("rules", [], "list of {match: GLOB, value: V} or {match: GLOB, values: [V or null per source]}; "
              "V is a number or a list interpolated across the layers as mergekit does; the first rule that "
              "matches and has a value for the source wins", type=list),
        Param("default", None, "lambda where no rule gives one; defaults to the method's lambda", type=float),
    )

    def validate(self, params: dict[str, Any]) -> None:
        from mergekit_core.builtin.tensor_values import check_rules

        check_rules(params["rules"], f"{self.label}: rules", lo=-math.inf, hi=math.inf)
        for i, rule in enumerate(params["rules"]):
            if "@" in str(rule.get("match", "")):
                raise ParameterError(f"{self.label}: rules[{i}].match may not contain '@'")

    def initial_values(self, params: dict[str, Any], num_sources: int, layers: Sequence[int]) -> dict[str, float]:
        from mergekit_core.builtin.tensor_values import gradient_at

        values: dict[str, float] = {}
        if params["default"] is not None:
            values["default"] = float(params["default"])
        for r, rule in enumerate(params["rules"]):
            if "values" in rule and len(rule["values"]) != num_sources:
                raise ParameterError(f"{self.label}: rules[{r}].values has {len(rule['values'])} entries but there "
                                     f"are {num_sources} sources; give one per source (null: none), in source order")
            suffix = f"@{rule['match']}" if "match" in rule else ""
            for t in range(num_sources):
                v = rule["value"] if "value" in rule else rule["values"][t]
                if v is None:
                    continue
                values[f"rule.{r}.task.{t}{suffix}"] = float(gradient_at(v, None, layers) if isinstance(v, list) else v)
                if isinstance(v, list):
                    for layer in layers:
                        values[f"rule.{r}.task.{t}.layer.{layer}{suffix}"] = float(gradient_at(v, layer, layers))
        return values

    def resolve(self, tensor_name: str, layer: int | None, source_index: int,
                values: Mapping[str, float]) -> float:
        for pattern, entries in _pattern_index(tuple(values)):
            if pattern is not None and not fnmatch.fnmatchcase(tensor_name, pattern):
                continue
            keys = entries.get(source_index)
            if keys is None:
                continue
            base_key, by_layer = keys
            return values[by_layer.get(layer, base_key)] if layer is not None else values[base_key]
        if "default" in values:
            return values["default"]
        raise ParameterError(f"{self.label}: no rule gives source {source_index} a lambda for tensor "
                             f"{tensor_name or '(any)'}, and there is no default",
                             hint="add a rule without 'match', or give 'default' (or the method's lambda)")


@functools.lru_cache(maxsize=16)
def _pattern_index(keys: tuple[str, ...]) -> list[tuple[str | None, dict[int, tuple[str, dict[int, str]]]]]:
    """The ``per_pattern`` values' keys, by rule in order: (pattern, source -> (key, layer -> key))."""
    rules: dict[int, tuple[str | None, dict[int, tuple[str, dict[int, str]]]]] = {}
    for key in keys:
        head, _, pattern = key.partition("@")
        parts = head.split(".")
        if parts[0] != "rule" or len(parts) not in (4, 6):
            continue
        r, t = int(parts[1]), int(parts[3])
        _, entries = rules.setdefault(r, (pattern if "@" in key else None, {}))
        base, by_layer = entries.setdefault(t, (f"rule.{r}.task.{t}" + (f"@{pattern}" if "@" in key else ""), {}))
        if len(parts) == 6:
            by_layer[int(parts[5])] = key
    return [rules[r] for r in sorted(rules)]


POLICIES.append(PerPattern())
