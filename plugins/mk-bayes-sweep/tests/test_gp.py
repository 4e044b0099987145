"""The GP, the acquisition and the search on known functions, against readable references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mk_bayes_sweep.gp import fit_gp, log_expected_improvement, log_h, sobol_design
from mk_bayes_sweep.search import BayesSearch
from mk_bayes_sweep.space import parse_space
from mk_bayes_sweep.strategy import BayesStrategy
from scipy.stats import norm


def f1(x):
    return np.sin(6 * x) + 0.5 * x


def branin_like(p):  # a smooth 2-D function with its maximum 0 at (0.3, 0.7)
    return -((p["a"] - 0.3) ** 2 + 2 * (p["b"] - 0.7) ** 2)


def params(**kw):
    return BayesStrategy().resolve_params(kw)


def space(entries, n=2):
    return parse_space(entries, num_sources=n, layers=lambda: [0, 1])


def test_gp_reproduces_a_known_1d_function_within_its_band():
    X = sobol_design(12, 1, seed=0)
    gp = fit_gp(X, f1(X[:, 0]), seed=0)
    grid = np.linspace(0, 1, 201)[:, None]
    mean, sd = gp.predict(grid)
    truth = f1(grid[:, 0])
    inside = np.abs(truth - mean) <= 2 * sd + 1e-3
    assert inside.mean() >= 0.95, f"only {inside.mean():.0%} of the function inside mean ± 2 sd"
    assert np.max(np.abs(truth - mean)) < 0.05
    at_data, sd_data = gp.predict(X)
    np.testing.assert_allclose(at_data, f1(X[:, 0]), atol=1e-3)  # interpolates what it saw
    assert sd_data.max() < 0.02 < sd.max()


def test_ei_is_zero_where_the_deviation_is_zero_and_positive_elsewhere():
    mean = np.array([0.5, 2.0, 0.5, 2.0, -3.0, 0.9])
    sd = np.array([0.0, 0.0, 0.2, 0.2, 0.1, 1.0])
    log_ei = log_expected_improvement(mean, sd, best=1.0, xi=0.01)
    assert np.all(np.isneginf(log_ei[:2]))  # no deviation: nothing to gain, even above the best
    assert np.all(np.isfinite(log_ei[2:]))  # EI > 0 everywhere else, even 40 sd below the best
    z = (mean[2:4] - 1.0 - 0.01) / sd[2:4]
    reference = sd[2:4] * (z * norm.cdf(z) + norm.pdf(z))  # the textbook formula where it does not underflow
    np.testing.assert_allclose(np.exp(log_ei[2:4]), reference, rtol=1e-9)


def test_log_h_is_accurate_where_plain_ei_underflows():
    z = np.array([3.0, 0.5, -0.5, -1.0, -5.0, -20.0])
    direct = np.log(norm.pdf(z) + z * norm.cdf(z))
    np.testing.assert_allclose(log_h(z), direct, rtol=1e-7)
    far = log_h(np.array([-60.0, -1e9]))
    assert np.all(np.isfinite(far)) and far[0] > far[1]
    # asymptotics: h(z) ~ phi(z) / z^2 for z -> -inf
    assert log_h(np.array([-60.0]))[0] == pytest.approx(-60**2 / 2 - math.log(math.sqrt(2 * math.pi)) - 2 * math.log(60),
                                                         rel=1e-4)


def run(search, fn):
    seen = []
    while (p := search.ask()) is not None:
        seen.append(p)
        search.tell(p, fn(p))
    return seen


def test_a_seeded_search_is_reproducible_and_finds_the_maximum():
    box = {"a": {"type": "float", "min": 0, "max": 1}, "b": {"type": "float", "min": 0, "max": 1}}
    first = run(BayesSearch(space(box), params(budget=14, init_points=5), seed=3), branin_like)
    again = run(BayesSearch(space(box), params(budget=14, init_points=5), seed=3), branin_like)
    other = run(BayesSearch(space(box), params(budget=14, init_points=5), seed=4), branin_like)
    assert first == again and first != other
    assert len({str(p) for p in first}) == 14
    assert max(branin_like(p) for p in first) > -0.01


def test_batch_proposals_are_distinct_for_both_lies():
    box = {"a": {"type": "float", "min": 0, "max": 1}, "b": {"type": "float", "min": 0, "max": 1}}
    for strategy in ("constant_liar", "kriging_believer"):
        search = BayesSearch(space(box), params(budget=12, init_points=4, batch_size=4, batch_strategy=strategy), 0)
        design = search.ask_batch(4)
        for p in design:
            search.tell(p, branin_like(p))
        batch = search.ask_batch(4)
        assert len(batch) == 4
        encoded = np.array([search.space.encode(p) for p in batch + design])
        gaps = np.linalg.norm(encoded[:, None] - encoded[None], axis=-1) + np.eye(8)
        assert gaps.min() > 1e-3, f"{strategy}: two proposals coincide"
        assert all(search.proposal(p)["phase"] == "gp" and search.proposal(p)["sd"] >= 0 for p in batch)


def test_mixed_spaces_decode_to_valid_points_and_a_small_space_runs_out():
    mixed = space({"k": {"type": "int", "min": 1, "max": 3}, "mode": {"type": "categorical", "choices": ["a", "b"]},
                   "lambdas": {"type": "float", "min": 0.1, "max": 10, "log": True, "size": "tasks"},
                   "values": {"type": "float", "min": 0, "max": 1, "size": "task_layer"}})
    assert mixed.width == 1 + 2 + 2 + 4
    rng = np.random.default_rng(0)
    for u in rng.random((50, mixed.width)):
        p = mixed.decode(u)
        assert mixed.contains(p) and mixed.decode(mixed.encode(p)) == p
        assert set(p["values"]) == {"task.0.layer.0", "task.0.layer.1", "task.1.layer.0", "task.1.layer.1"}
    tiny = space({"k": {"type": "int", "min": 1, "max": 3}})
    seen = run(BayesSearch(tiny, params(budget=10, init_points=2), 0), lambda p: -abs(p["k"] - 2))
    assert sorted(p["k"] for p in seen) == [1, 2, 3]  # every value once, then the search stops
