"""The built-in `grid` search strategy: every combination of the listed values, in order."""

from __future__ import annotations

import itertools
from typing import Any

from mergekit_core.components import Search, SearchStrategy
from mergekit_core.errors import ConfigError


def grid_axis(name: str, spec: Any) -> list[Any]:
    """A list of values, or ``{min, max, steps}`` (inclusive, evenly spaced)."""
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"search grid: '{name}' has no values")
        return spec
    if isinstance(spec, dict) and {"min", "max", "steps"} <= spec.keys():
        lo, hi, steps = float(spec["min"]), float(spec["max"]), int(spec["steps"])
        if steps < 1:
            raise ConfigError(f"search grid: '{name}' needs steps >= 1")
        if steps == 1:
            return [lo]
        return [round(lo + (hi - lo) * i / (steps - 1), 12) for i in range(steps)]
    raise ConfigError(
        f"search grid: '{name}' must be a list of values or {{min, max, steps}}, got {spec!r}"
    )


class GridSearch(Search):
    def __init__(self, space: dict[str, Any]) -> None:
        axes = {name: grid_axis(name, spec) for name, spec in space.items()}
        names = list(axes)
        self._points = iter([dict(zip(names, combo)) for combo in itertools.product(*axes.values())])
        self.size = 1
        for values in axes.values():
            self.size *= len(values)
        self.history: list[tuple[dict[str, Any], float]] = []

    def ask(self) -> dict[str, Any] | None:
        return next(self._points, None)

    def tell(self, point: dict[str, Any], score: float) -> None:
        self.history.append((point, score))


class Grid(SearchStrategy):
    name = "grid"
    description = "Every combination of the values listed for each searched parameter."
    params = ()

    def start(self, space: dict[str, Any], params: dict[str, Any], seed: int) -> GridSearch:
        return GridSearch(space)


STRATEGIES = [Grid()]
