"""Low-rank algebra for adapter outputs: exact factor concatenation and truncated SVD.

Deltas here are in "B @ A" orientation: (out, in), convs flattened to (out, in * k...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class Truncation:
    """``B @ A`` approximates the delta; ``energy_kept`` = sum of kept sigma^2 / sum of all sigma^2."""

    B: torch.Tensor
    A: torch.Tensor
    energy_kept: float
    singular_values: torch.Tensor


def concat_factors(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]], coefficients: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact: ``B' @ A' == sum_t c_t * B_t @ A_t`` with A' = [c_t A_t] stacked, B' = [B_t] side by side."""
    import torch

    A = torch.cat([c * a for (_, a), c in zip(factors, coefficients)], dim=0)
    B = torch.cat([b for b, _ in factors], dim=1)
    return B, A


def _truncate(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int) -> Truncation:
    import torch

    total = float(torch.sum(S.double() ** 2))
    r = max(0, min(rank, S.numel()))
    kept = float(torch.sum(S[:r].double() ** 2))
    energy = kept / total if total > 0 else 1.0
    B = U[:, :r] * S[:r]
    A = Vh[:r, :]
    if r < rank:  # pad with zeros so the output rank is what was asked for
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - r)], dim=1)
        A = torch.cat([A, A.new_zeros(rank - r, A.shape[1])], dim=0)
    return Truncation(B.contiguous(), A.contiguous(), energy, S)


def svd_truncate(delta: torch.Tensor, rank: int) -> Truncation:
    """Best rank-``rank`` approximation of a dense 2-D delta (reduced SVD in float32)."""
    import torch

    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return _truncate(U, S, Vh, rank)


def factored_svd_truncate(B: torch.Tensor, A: torch.Tensor, rank: int) -> Truncation:
    """Truncated SVD of ``B @ A`` without forming it: QR of each factor and an SVD of the R x R core.

    Costs O((out + in) R^2) instead of O(out * in * min(out, in)) for a dense SVD.
    """
    import torch

    Qb, Rb = torch.linalg.qr(B.float())
    Qa, Ra = torch.linalg.qr(A.float().T)
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return _truncate(Qb @ Uc, S, Vch @ Qa.T, rank)
