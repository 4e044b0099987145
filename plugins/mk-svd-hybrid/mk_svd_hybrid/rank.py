"""Shared SVD bases with an energy-threshold rank.

Energy is the fraction of the **squared** singular values kept (the fraction of the squared
Frobenius norm), E(k) = sum_{i<=k} s_i^2 / sum_i s_i^2, and the rank is the smallest k with
E(k) >= threshold, so that the relative error of the truncation is sqrt(1 - E(k)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def energy_rank(singular_values: torch.Tensor, threshold: float, total_energy: float | None = None) -> int:
    """Smallest k with E(k) >= threshold; 0 for an all-zero matrix; clamped to the values given.

    ``total_energy``: sum of all squared singular values when ``singular_values`` holds only the
    leading ones (a randomized SVD); the rank is then capped at what was computed.
    """
    sq = singular_values.double().pow(2)
    total = float(sq.sum()) if total_energy is None else float(total_energy)
    if total <= 0.0 or sq.numel() == 0:
        return 0
    if threshold >= 1.0:  # every component with energy, whatever the rounding of the cumulative sum
        return max(1, int((sq > 0).sum()))
    cumulative = torch.cumsum(sq, 0) / total
    k = int(torch.searchsorted(cumulative, torch.tensor([threshold], dtype=cumulative.dtype))[0]) + 1
    return max(1, min(k, sq.numel()))


@dataclass
class Basis:
    """Orthonormal columns ``vectors`` [rows, k] shared by the tasks, the squared singular values
    of all computed components, and the total energy of the stacked tasks."""

    vectors: torch.Tensor
    sq_singular: torch.Tensor
    total_energy: float

    @property
    def rank(self) -> int:
        return self.vectors.shape[1]

    def energy_kept(self) -> float:
        if self.total_energy <= 0:
            return 1.0
        return float(self.sq_singular[: self.rank].sum() / self.total_energy)


def shared_basis(matrices: Sequence[torch.Tensor], threshold: float, *, max_rank: int = 0,
                 randomized: bool = False, oversample_rank: int = 128, niter: int = 2,
                 seed: int = 0) -> Basis:
    """Left singular vectors of the side-by-side matrix [X_1 ... X_T] (each [rows, cols]).

    Exact: eigen-decomposition of the Gram matrix sum_t X_t X_t^T (rows x rows, float64), whose
    eigenvalues are the squared singular values. Randomized: ``torch.svd_lowrank`` with
    ``oversample_rank`` components, the total energy taken from the Frobenius norms.
    """
    rows = matrices[0].shape[0]
    total = float(sum(float(torch.sum(x.double() ** 2)) for x in matrices))
    if total == 0.0:
        return Basis(torch.zeros(rows, 0), torch.zeros(0, dtype=torch.float64), 0.0)
    if randomized and min(rows, oversample_rank) < rows:
        stacked = torch.cat([x.float() for x in matrices], dim=1)
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            u, s, _ = torch.svd_lowrank(stacked, q=min(oversample_rank, *stacked.shape), niter=niter)
        finally:
            torch.random.set_rng_state(state)
        sq = s.double() ** 2
        vectors = u
    else:
        gram = torch.zeros(rows, rows, dtype=torch.float64)
        for x in matrices:
            add_gram(gram, x)
        return basis_from_gram(gram, total, threshold, max_rank=max_rank)
    k = energy_rank(sq.sqrt(), threshold, total)
    if max_rank > 0:
        k = min(k, max_rank)
    return Basis(vectors[:, :k].contiguous(), sq, total)


def add_gram(gram: torch.Tensor, x: torch.Tensor) -> None:
    """``gram += x x^T`` (``x`` [rows, cols] or a column block of it; the product in float32,
    accumulated in float64), so the Gram matrix can be summed over column blocks."""
    xf = x.float()
    gram += (xf @ xf.T).double()


def basis_from_gram(gram: torch.Tensor, total: float, threshold: float, *, max_rank: int = 0) -> Basis:
    """The exact shared basis from sum_t X_t X_t^T (float64 [rows, rows]) and the total energy
    sum_t ||X_t||_F^2: its eigenvectors by decreasing eigenvalue (the squared singular values)."""
    if total == 0.0:
        return Basis(torch.zeros(gram.shape[0], 0), torch.zeros(0, dtype=torch.float64), 0.0)
    evals, evecs = torch.linalg.eigh(gram)
    sq = evals.flip(0).clamp_min(0.0)
    vectors = evecs.flip(1).float()
    k = energy_rank(sq.sqrt(), threshold, total)
    if max_rank > 0:
        k = min(k, max_rank)
    return Basis(vectors[:, :k].contiguous(), sq, total)
