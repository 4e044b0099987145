"""Exact magnitude selection without sorting.

``top_mask(a, m)`` keeps exactly ``m`` entries: those above the m-th largest value (found by
``torch.kthvalue``, a linear-time selection), then, among entries equal to it, the lowest
indices. A ``>=`` threshold would keep every tied entry (too many; with many zeros, everything).
"""

from __future__ import annotations

import torch


def keep_count(fraction: float, n: int) -> int:
    """How many of ``n`` entries a keep fraction means: ``int(fraction * n)`` (as PEFT and mergekit)."""
    return min(n, max(0, int(fraction * n + 1e-9)))


def top_mask(a: torch.Tensor, m: int) -> torch.Tensor:
    """Boolean mask of the ``m`` largest entries of the 1-D tensor ``a`` (ties: lowest index first)."""
    n = a.numel()
    if m <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if m >= n:
        return torch.ones(n, dtype=torch.bool)
    threshold = torch.kthvalue(a, n - m + 1).values
    mask = a > threshold
    need = m - int(mask.sum())
    if need > 0:
        mask[torch.nonzero(a == threshold).flatten()[:need]] = True
    return mask


def rank_band_mask(a: torch.Tensor, drop_top: int, drop_bottom: int) -> torch.Tensor:
    """Keep the entries whose magnitude rank is neither among the ``drop_top`` largest nor the
    ``drop_bottom`` smallest (Model Breadcrumbs; no empty-slice bug when ``drop_top`` is 0)."""
    n = a.numel()
    return top_mask(a, n - drop_bottom) & ~top_mask(a, drop_top)


def magnitude_bucket(a: torch.Tensor) -> torch.Tensor:
    """Bucket of each non-negative float32 value: its top 15 bits, in magnitude order (32768 buckets).

    The bit patterns of non-negative floats sort like their values, so a histogram of buckets
    locates the k-th largest value exactly, and only one bucket must be searched.
    """
    return a.float().contiguous().view(torch.int32) >> 16


BUCKETS = 1 << 15
