"""The ``bayes`` search strategy for ``mk sweep``: parameters, checks, and the search it starts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mergekit_core import ConfigError, Param, ParameterError, SearchStrategy

PARAMS = (
    Param("budget", 20, "points to evaluate (warm-start points not counted)", type=int, min=1),
    Param("init_points", 6, "points of the initial design before the GP proposes (warm-start points "
          "stand in for as many)", type=int, min=1),
    Param("init_design", "sobol", "initial design: scrambled Sobol or Latin hypercube", type=str,
          choices=("sobol", "lhs")),
    Param("xi", 0.01, "exploration margin of expected improvement, in standard deviations of the scores",
          type=float, min=0.0),
    Param("batch_size", 1, "points proposed at once (q), for executors that run trials in parallel",
          type=int, min=1),
    Param("batch_strategy", "constant_liar", "how a batch is filled: constant_liar (the worst score seen "
          "stands in for pending points) or kriging_believer (the GP's mean does)", type=str,
          choices=("constant_liar", "kriging_believer")),
    Param("candidates", 1024, "quasi-random candidates the acquisition is ranked on before L-BFGS-B",
          type=int, min=16),
    Param("warm_start_sweeps", None, "earlier sweep summaries to reuse: a sweep_*.json, a directory of "
          "them, or a glob (or a list of these)", type=(list, str)),
    Param("warm_start_max_points", None, "at most this many warm-start points (the best)", type=int, min=1),
)


def closest(name: str, known: list[str]) -> str | None:
    """The known name closest to ``name``, for 'did you mean' hints."""
    import difflib

    matches = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return matches[0] if matches else None


def check_budget(params: dict[str, Any], owner: str) -> None:
    if params["budget"] < params["init_points"]:
        raise ParameterError(f"{owner}: budget {params['budget']} is below init_points {params['init_points']}; "
                             "raise the budget or lower init_points")


class BayesStrategy(SearchStrategy):
    name = "bayes"
    description = ("Bayesian optimisation: a GP (Matern 5/2, ARD) with log expected improvement, "
                   "Sobol/LHS start, warm start from earlier sweeps, batches.")
    params = PARAMS

    def validate(self, params: dict[str, Any]) -> None:
        check_budget(params, self.label)

    def start(self, space: dict[str, Any], params: dict[str, Any], seed: int) -> Any:
        return self.start_sweep(space, params, seed, None)

    def start_sweep(self, space: dict[str, Any], params: dict[str, Any], seed: int, sweep: Any) -> Any:
        """The search, checked against the sweep (``mergekit_core``'s ``SweepContext``: sources,
        layers, the fields warm-start files must match, the objective of any record)."""
        from mk_bayes_sweep.search import BayesSearch
        from mk_bayes_sweep.space import parse_space
        from mk_bayes_sweep.warm_start import load_warm_start

        if sweep is None:
            def no_layers() -> list[int]:
                raise ConfigError("search.space: size task_layer needs a sweep (mk sweep) to know the layers")

            parsed = parse_space(space, num_sources=0, layers=no_layers)
            return BayesSearch(parsed, params, seed)
        identity = sweep.identity
        parsed = parse_space(space, num_sources=sweep.num_sources, layers=sweep.layers,
                             nonnegative=bool(identity.get("constraint_nonnegative")))
        base_dir = Path(getattr(sweep, "base_dir", None) or Path.cwd())
        warm = load_warm_start(params["warm_start_sweeps"], identity=identity, score=sweep.score, space=parsed,
                               base_dir=base_dir, max_points=params["warm_start_max_points"])
        for path, why in warm.skipped.items():
            print(f"warning: warm start: skipped {path}: {why}", file=sys.stderr)
        search = BayesSearch(parsed, params, seed, warm=warm.points)
        search.warm_start = warm
        return search
