"""The Gaussian process and the log expected improvement (maximisation), on the unit cube.

The standard GP-EI recipe (shared/reference/merging-algorithms.md section 10; scikit-optimize's
``gp_minimize`` defaults): a constant times an ARD Matern-5/2 kernel plus a white-noise term,
fitted by maximising the marginal likelihood on standardised scores, plus a prior on the length
scales (``LENGTH_PRIOR``). Log-EI follows Ament et al.,
"Unexpected Improvements to Expected Improvement for Bayesian Optimization" (NeurIPS 2023, eq. 9):
``log h(z)`` with ``h(z) = phi(z) + z Phi(z)``, computed without cancellation for very negative z,
so that the acquisition still ranks candidates where plain EI underflows to 0.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import erfcx, log_ndtr
from scipy.stats import qmc

LENGTH_BOUNDS = (1e-2, 1e2)
"""Length scales on the unit cube (scikit-optimize's bounds)."""
NOISE_BOUNDS = (1e-9, 1e-1)
"""White-noise variance, in standardised score units."""
_C1 = math.log(2 * math.pi) / 2
_C2 = math.log(math.pi / 2) / 2


@dataclass
class GPModel:
    """A fitted GP: ``predict(X)`` gives the mean and the deviation of the latent objective
    (white noise left out) in the scores' own units; X has shape (n, d), values in [0, 1]."""

    regressor: object
    y_mean: float
    y_scale: float
    noise: float

    def predict_standardised(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, sd = self.regressor.predict(np.atleast_2d(X), return_std=True)  # type: ignore[attr-defined]
        var = np.maximum(np.asarray(sd) ** 2 - self.noise, 0.0)
        return np.asarray(mean, dtype=float), np.sqrt(var)

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, sd = self.predict_standardised(X)
        return mean * self.y_scale + self.y_mean, sd * self.y_scale

    def standardise(self, y: float) -> float:
        return (y - self.y_mean) / self.y_scale


LENGTH_PRIOR = (0.0, 1.0)
"""Mean and deviation of the normal prior on each log length scale (inputs in [0, 1]), or None
for a plain maximum-likelihood fit. Centred on the unit cube's width as Optuna's GPSampler's
heuristic prior, ``-(0.1 / r + 0.1 r)`` on ``r = 1 / l^2`` (optuna/_gp/prior.py), which is
``log l ~ N(0, 1.1^2)`` near its mode. On the digits benchmark's 8-dimensional search it found
better points than the maximum-likelihood fit and than the dimension-scaled prior of Hvarfner et
al. (ICML 2024), ``N(sqrt(2) + log(d) / 2, 3)`` (docs/plugins/mk-bayes-sweep.md)."""


@functools.cache
def _regressor_class() -> type:
    from sklearn.gaussian_process import GaussianProcessRegressor

    class Regressor(GaussianProcessRegressor):
        """The log marginal likelihood plus the log prior of the length scales (a MAP fit)."""

        length_prior: tuple[float, float, np.ndarray] | None = None

        def log_marginal_likelihood(self, theta=None, eval_gradient=False, clone_kernel=True):  # noqa: ANN001
            out = super().log_marginal_likelihood(theta, eval_gradient, clone_kernel)
            if theta is None or self.length_prior is None:
                return out
            mu, sigma, idx = self.length_prior
            t = np.asarray(theta)[idx]
            prior = -0.5 * float(np.sum((t - mu) ** 2)) / sigma**2
            if not eval_gradient:
                return out + prior
            grad = np.zeros_like(theta)
            grad[idx] = -(t - mu) / sigma**2
            return out[0] + prior, out[1] + grad

    return Regressor


def fit_gp(X: np.ndarray, y: np.ndarray, seed: int, *, restarts: int = 2,
           kernel: object | None = None) -> GPModel:
    """Fit ``ConstantKernel * Matern(nu=2.5, one length scale per dimension) + WhiteKernel`` to
    ``(X, y)`` (X: (n, d) in [0, 1], y: (n,) scores, higher is better), y standardised.

    ``kernel``: a fitted kernel to keep as it is (no hyperparameter search; what batch proposals
    use when they add a lie).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    X = np.atleast_2d(np.asarray(X, dtype=float))
    y = np.asarray(y, dtype=float)
    y_mean = float(y.mean())
    y_scale = float(y.std())
    if not np.isfinite(y_scale) or y_scale < 1e-12:
        y_scale = 1.0
    d = X.shape[1]
    if kernel is None:
        start = float(np.clip(np.exp(LENGTH_PRIOR[0]), *LENGTH_BOUNDS)) if LENGTH_PRIOR else 1.0
        kernel = (ConstantKernel(1.0, (1e-2, 1e3)) * Matern(np.full(d, start), LENGTH_BOUNDS, nu=2.5)
                  + WhiteKernel(1e-4, NOISE_BOUNDS))
        gp = _regressor_class()(kernel, alpha=1e-10, normalize_y=False, n_restarts_optimizer=restarts,
                                random_state=seed)
        if LENGTH_PRIOR:  # theta: log constant, d log length scales, log noise
            gp.length_prior = (*LENGTH_PRIOR, 1 + np.arange(d))
    else:
        gp = _regressor_class()(kernel, alpha=1e-10, normalize_y=False, optimizer=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a length scale at its bound is an answer too
        gp.fit(X, (y - y_mean) / y_scale)
    noise = float(gp.kernel_.k2.noise_level) if hasattr(gp.kernel_, "k2") else 0.0
    return GPModel(gp, y_mean, y_scale, noise)


def log_h(z: np.ndarray) -> np.ndarray:
    """``log(phi(z) + z Phi(z))``, accurate for every z (Ament et al. 2023, eq. 9)."""
    z = np.asarray(z, dtype=float)
    out = np.empty_like(z)
    big = z > -1
    zb = z[big]
    out[big] = np.log(np.exp(-zb**2 / 2 - _C1) + zb * np.exp(log_ndtr(zb)))
    mid = (~big) & (z > -1 / math.sqrt(np.finfo(float).eps))
    zm = z[mid]
    inner = np.log(erfcx(-zm / math.sqrt(2)) * np.abs(zm)) + _C2
    out[mid] = -zm**2 / 2 - _C1 + np.log(-np.expm1(inner))  # log(1 - exp(inner)), inner < 0
    low = ~(big | mid)
    out[low] = -z[low] ** 2 / 2 - _C1 - 2 * np.log(np.abs(z[low]))
    return out


def log_expected_improvement(mean: np.ndarray, sd: np.ndarray, best: float, xi: float = 0.01) -> np.ndarray:
    """``log EI`` of a maximisation: ``EI = sd * h((mean - best - xi) / sd)``; ``-inf`` (EI = 0)
    where ``sd`` is 0 (the reference's convention: no uncertainty, nothing to gain).

    mean, sd: shape (n,), in the units of ``best``; xi >= 0: the exploration margin.
    """
    mean, sd = np.asarray(mean, dtype=float), np.asarray(sd, dtype=float)
    out = np.full(mean.shape, -np.inf)
    ok = sd > 0
    out[ok] = np.log(sd[ok]) + log_h((mean[ok] - best - xi) / sd[ok])
    return out


def expected_improvement(mean: np.ndarray, sd: np.ndarray, best: float, xi: float = 0.01) -> np.ndarray:
    return np.exp(log_expected_improvement(mean, sd, best, xi))


def maximise(acquisition: Callable[[np.ndarray], np.ndarray], dim: int, rng: np.random.Generator, *,
             anchors: np.ndarray | None = None, candidates: int = 1024, polish: int = 3) -> list[np.ndarray]:
    """Points of [0, 1]^dim, best acquisition first: a scrambled Sobol set (and ``anchors``,
    e.g. jitter around the best points seen) ranked by ``acquisition`` (vectorised, (n, dim) ->
    (n,)), the ``polish`` best refined by L-BFGS-B within the box.

    The caller takes the first point that is new once snapped to the space, so every candidate
    is returned, not only the winner.
    """
    sobol = qmc.Sobol(dim, scramble=True, seed=rng)
    X = sobol.random_base2(int(math.ceil(math.log2(max(candidates, 2)))))
    if anchors is not None and len(anchors):
        X = np.vstack([X, np.clip(anchors, 0.0, 1.0)])
    values = acquisition(X)
    order = np.argsort(-values, kind="stable")
    polished = []
    floor = -1e12  # L-BFGS-B needs finite values

    def negative(x: np.ndarray) -> float:
        v = float(acquisition(x[None, :])[0])
        return -max(v, floor)

    for i in order[:polish]:
        res = minimize(negative, X[i], method="L-BFGS-B", bounds=[(0.0, 1.0)] * dim,
                       options={"maxiter": 30})
        if np.isfinite(res.fun) and -res.fun >= values[i]:
            polished.append((-float(res.fun), np.clip(res.x, 0.0, 1.0)))
    polished.sort(key=lambda t: -t[0])
    return [x for _, x in polished] + [X[i] for i in order]


def sobol_design(n: int, dim: int, seed: int) -> np.ndarray:
    """``n`` scrambled Sobol points of [0, 1]^dim (the first ``n`` of a balanced 2^m set)."""
    if n <= 0:
        return np.zeros((0, dim))
    return qmc.Sobol(dim, scramble=True, seed=seed).random_base2(int(math.ceil(math.log2(max(n, 2)))))[:n]


def lhs_design(n: int, dim: int, seed: int) -> np.ndarray:
    """``n`` Latin-hypercube points of [0, 1]^dim (one per row and column of an n-grid)."""
    if n <= 0:
        return np.zeros((0, dim))
    return qmc.LatinHypercube(dim, seed=seed).random(n)
