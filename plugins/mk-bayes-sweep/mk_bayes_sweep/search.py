"""``BayesSearch``: the ask/tell loop of GP-EI over a :class:`~mk_bayes_sweep.space.Space`.

An initial design (scrambled Sobol or Latin hypercube) first, then each proposal maximises log-EI
under a GP fitted to every score told so far (warm-start points included). Batches of q points
(``batch_size``) are made by adding a lie for each chosen point and refitting with the same
hyperparameters before choosing the next (Ginsbourger et al., "Kriging is well-suited to
parallelize optimization", 2010): the constant liar lies with the worst score seen, the kriging
believer with the GP's own mean. The random numbers of each batch are drawn from a generator
seeded by (seed, points seen), so a search resumed from its journal proposes what the
uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mergekit_core import Search
from mk_bayes_sweep.gp import (
    GPModel,
    fit_gp,
    lhs_design,
    log_expected_improvement,
    maximise,
    sobol_design,
)
from mk_bayes_sweep.space import Space, point_key


class BayesSearch(Search):
    """Proposes ``budget`` new points; ``tell`` scores (higher is better).

    ``warm``: ``(point, score)`` pairs from earlier sweeps, fitted but never proposed again;
    they stand in for as many initial-design points.
    """

    def __init__(self, space: Space, params: Mapping[str, Any], seed: int,
                 warm: Sequence[tuple[dict[str, Any], float]] = ()) -> None:
        self.space = space
        self.seed = int(seed)
        self.budget = int(params["budget"])
        self.size = self.budget  # what the sweep's progress bar counts to
        self.xi = float(params["xi"])
        self.batch_size = int(params["batch_size"])
        self.batch_strategy = str(params["batch_strategy"])
        self.candidates = int(params["candidates"])
        self.X: list[np.ndarray] = []
        self.y: list[float] = []
        self.seen: set[str] = set()
        for point, score in warm:
            self._observe(point, score)
        self.warm_count = len(self.y)
        self.proposed: dict[str, dict[str, Any]] = {}
        self.points: dict[str, dict[str, Any]] = {}
        self.failed: set[str] = set()
        self.queue: list[dict[str, Any]] = []
        self.exhausted = False
        n_init = max(0, int(params["init_points"]) - self.warm_count)
        design = (lhs_design if params["init_design"] == "lhs" else sobol_design)(n_init, space.width, self.seed)
        self.design = []
        for u in design:
            point = space.decode(u)
            if point_key(point) not in self.seen and point not in self.design:
                self.design.append(point)
        self.warm_start: Any = None
        """The strategy's :class:`~mk_bayes_sweep.warm_start.WarmStart` report, when it had one."""

    # ------------------------------------------------------------------ the Search interface

    def ask(self) -> dict[str, Any] | None:
        if not self.queue:
            left = self.budget - len(self.proposed)
            if left <= 0 or self.exhausted:
                return None
            self.queue = self.ask_batch(min(self.batch_size, left))
            if not self.queue:
                return None
        return self.queue.pop(0)

    def ask_batch(self, q: int) -> list[dict[str, Any]]:
        """``q`` distinct new points at once (fewer when the space has no more), for executors
        that evaluate them in parallel; each counts against the budget."""
        q = min(q, self.budget - len(self.proposed))
        batch: list[dict[str, Any]] = []
        while self.design and len(batch) < q:
            point = self.design.pop(0)
            if point_key(point) in self.seen or point_key(point) in self.proposed:
                continue
            self._propose(point, {"phase": "init", "mean": None, "sd": None, "log_ei": None})
            batch.append(point)
        if len(batch) < q:
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=1):  # matrices of a few dozen rows: BLAS threads only cost
                batch.extend(self._gp_batch(q - len(batch)))
        return batch

    def tell(self, point: dict[str, Any], score: float | None) -> None:
        """``score`` None or not finite: the point failed; it is not proposed again."""
        if score is None or not np.isfinite(score):
            self.failed.add(point_key(point))
            return
        self._observe(point, float(score))

    def resume(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Replay an interrupted run's journal: its points count against the budget and its
        scores are fitted; the initial design goes on where it stopped."""
        for record in records:
            point = dict(record["point"])
            key = point_key(point)
            self.proposed.setdefault(key, dict(record.get("proposal") or {"phase": "resumed"}))
            self.points.setdefault(key, point)
            self.tell(point, record.get("score"))
        self.design = [p for p in self.design if point_key(p) not in self.proposed]

    def proposal(self, point: Mapping[str, Any]) -> dict[str, Any] | None:
        """What the search expected of ``point`` when it proposed it: phase (init / gp), and for
        GP proposals the predicted mean and deviation (score units) and the log-EI."""
        return self.proposed.get(point_key(point))

    def finish(self, result: dict[str, Any], stem: Path) -> dict[str, Any]:
        """Summary additions: counts, the warm-start report, and the PNG (best score so far; the
        GP for a one-dimensional space) when matplotlib is installed."""
        extra: dict[str, Any] = {"bayes": {"warm_start_points": self.warm_count,
                                           "proposed": len(self.proposed), "budget": self.budget,
                                           "space_exhausted": self.exhausted}}
        if self.warm_start is not None:
            extra["warm_start"] = self.warm_start.to_json()
        if self.exhausted and len(self.proposed) < self.budget:
            extra["warnings"] = [f"the search stopped after {len(self.proposed)} of its budget of {self.budget} "
                                 "points: the space has no other distinct point (int and categorical "
                                 "dimensions, values rounded to 6 digits)"]
        from mk_bayes_sweep.plot import plot_search

        png = plot_search(self, result, stem.with_suffix(".png"))
        if png is not None:
            extra["plot"] = str(png)
        return extra

    # ------------------------------------------------------------------ internals

    def _observe(self, point: Mapping[str, Any], score: float) -> None:
        key = point_key(point)
        if key in self.seen:
            return
        self.seen.add(key)
        self.X.append(self.space.encode(point))
        self.y.append(float(score))

    def _propose(self, point: dict[str, Any], info: dict[str, Any]) -> None:
        self.proposed[point_key(point)] = info
        self.points[point_key(point)] = point

    def pending(self) -> list[dict[str, Any]]:
        """Points proposed and not yet scored (the batch being built, or still running)."""
        return [p for k, p in self.points.items() if k not in self.seen and k not in self.failed]

    def model(self) -> GPModel | None:
        """The GP fitted to every score told so far (None before the first)."""
        if not self.y:
            return None
        return fit_gp(np.vstack(self.X), np.asarray(self.y), self.seed)

    def _gp_batch(self, q: int) -> list[dict[str, Any]]:
        if not self.y:  # nothing told yet (no design, no warm start): one more design point
            point = self.space.decode(sobol_design(1, self.space.width, self.seed + len(self.proposed))[0])
            if point_key(point) in self.proposed:
                self.exhausted = True
                return []
            self._propose(point, {"phase": "init", "mean": None, "sd": None, "log_ei": None})
            return [point]
        rng = np.random.default_rng([self.seed, len(self.y), len(self.proposed)])
        base = self.model()
        assert base is not None
        X, y = list(self.X), list(self.y)
        model = base
        pending = self.pending()
        if pending:
            for p in pending:
                X.append(self.space.encode(p))
                y.append(self._lie(base, p))
            model = fit_gp(np.vstack(X), np.asarray(y), self.seed, kernel=base.regressor.kernel_)
        out: list[dict[str, Any]] = []
        while len(out) < q:
            point, info = self._best_new(model, base, X, y, rng)
            if point is None:
                self.exhausted = True
                break
            self._propose(point, info)
            out.append(point)
            if len(out) < q:
                X.append(self.space.encode(point))
                y.append(self._lie(base, point))
                model = fit_gp(np.vstack(X), np.asarray(y), self.seed, kernel=base.regressor.kernel_)
        return out

    def _lie(self, base: GPModel, point: Mapping[str, Any]) -> float:
        if self.batch_strategy == "kriging_believer":
            return float(base.predict(self.space.encode(point)[None, :])[0][0])
        return float(min(self.y))

    def _best_new(self, model: GPModel, base: GPModel, X: list[np.ndarray], y: list[float],
                  rng: np.random.Generator) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        best = model.standardise(max(y))

        def acquisition(U: np.ndarray) -> np.ndarray:
            mean, sd = model.predict_standardised(U)
            return log_expected_improvement(mean, sd, best, self.xi)

        top = np.vstack(X)[np.argsort(-np.asarray(y))[:3]]
        anchors = np.vstack([t + rng.normal(0.0, 0.05, (16, len(t))) for t in top])
        for u in maximise(acquisition, self.space.width, rng, anchors=anchors, candidates=self.candidates):
            point = self.space.decode(u)
            key = point_key(point)
            if key in self.seen or key in self.proposed:
                continue
            snapped = self.space.encode(point)[None, :]
            mean, sd = base.predict(snapped)
            return point, {"phase": "gp", "mean": float(mean[0]), "sd": float(sd[0]),
                           "log_ei": float(acquisition(snapped)[0]), "observed": len(self.y)}
        return None, {}
