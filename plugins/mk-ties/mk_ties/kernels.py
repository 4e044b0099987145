"""The tensor arithmetic of mk-ties (imports torch; loaded only when a component runs).

The sign election and the disjoint aggregation are per coordinate, so they run over chunks of
coordinates: memory beyond the inputs is one bool mask per source, not stacks of float copies
(a 262 MB embedding no longer costs gigabytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

CHUNK = 1 << 20


def _chunk(flats: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] | None, s: int, e: int) -> torch.Tensor:
    if masks is None:
        return torch.stack([f[s:e] for f in flats])
    return torch.stack([f[s:e] * m[s:e] for f, m in zip(flats, masks)])


def elect_and_merge(flats: Sequence[torch.Tensor], coefficients: Sequence[float], params: dict[str, Any],
                    masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Sign election and disjoint aggregation of the (masked) 1-D tensors ``flats``, in one pass.

    Entries whose elected sign is 0 but that hold non-zero values (exact cancellations) are set
    aside and resolved after the pass by ``sign_tie``: majority (the sign of the sum of every
    elected sign of the tensor), positive (+1) or zero (left at 0).

    ``weighted_election`` (mergekit's convention): the election and the agreement look at
    ``c_t * tau_t``, computed as mergekit does (mask, then multiply by the coefficient), so that
    with ``sign_tie: positive`` and ``aggregate: weighted_mean`` the result equals mergekit's bit
    for bit.
    """
    n = flats[0].numel()
    weights = torch.tensor(list(coefficients), dtype=flats[0].dtype).view(-1, 1)
    weighted = bool(params.get("weighted_election", False))
    out = torch.empty(n, dtype=flats[0].dtype)
    elected_sum = 0
    pending: list[torch.Tensor] = []
    for s in range(0, n, CHUNK):
        stack = _chunk(flats, masks, s, s + CHUNK)
        if weighted:
            stack = stack * weights
        signs = torch.sign(stack)
        elected = torch.sign(stack.sum(0) if params["sign_method"] == "mass" else signs.sum(0))
        elected_sum += int(elected.sum())
        out[s:s + CHUNK] = _aggregate(stack, signs, elected, weights, params)
        if params["sign_tie"] != "zero":
            tied = torch.nonzero((elected == 0) & (stack != 0).any(0)).flatten()
            if tied.numel():
                pending.append(tied + s)
    if pending:
        index = torch.cat(pending)
        fill = 1.0 if params["sign_tie"] == "positive" else float((elected_sum > 0) - (elected_sum < 0))
        stack = torch.stack([f[index] * m[index] for f, m in zip(flats, masks)] if masks is not None
                            else [f[index] for f in flats])
        if weighted:
            stack = stack * weights
        elected = torch.full((index.numel(),), fill, dtype=stack.dtype)
        out[index] = _aggregate(stack, torch.sign(stack), elected, weights, params)
    return out


def _aggregate(stack: torch.Tensor, signs: torch.Tensor, elected: torch.Tensor, weights: torch.Tensor,
               params: dict[str, Any]) -> torch.Tensor:
    """Weighted sum (or mean) of the entries whose sign is the elected one.

    Where the elected sign is 0 the matching entries are zeros, so the result there is 0
    whatever the count; elsewhere a match implies a non-zero entry. ``weighted_mean`` divides by
    the sum of the agreeing coefficients (1 where that is 0, as mergekit).
    """
    if params.get("weighted_election", False):  # the stack holds c_t * tau_t already
        agree_mask = signs == elected
        summed = (stack * agree_mask).sum(0)
        if params["aggregate"] == "sum":
            return summed
        if params["aggregate"] == "mean":
            return summed / agree_mask.sum(0).clamp(min=1)
        divisor = (weights * agree_mask).sum(0)
        divisor[divisor == 0] = 1
        return summed / divisor
    agree = (signs == elected).to(stack.dtype)
    summed = (weights.T @ (stack * agree)).squeeze(0)  # a matrix-vector product over the sources
    if params["aggregate"] == "sum":
        return summed
    if params["aggregate"] == "weighted_mean":
        divisor = (weights.T @ agree).squeeze(0)
        divisor[divisor == 0] = 1
        return summed / divisor
    return summed / agree.sum(0).clamp(min=1)


def weighted_sum(flats: Sequence[torch.Tensor], coefficients: Sequence[float],
                 masks: Sequence[torch.Tensor] | None = None, normalize: bool = False) -> torch.Tensor:
    """``sum_t c_t * (mask_t * x_t)``; ``normalize``: divided by ``sum_t c_t`` unless that is under
    1e-8 in magnitude (mergekit's normalize for methods without sign election)."""
    out = torch.zeros_like(flats[0])
    for i, (f, c) in enumerate(zip(flats, coefficients)):
        out.add_(f * masks[i] if masks is not None else f, alpha=c)
    if normalize:
        total = float(torch.tensor(list(coefficients), dtype=flats[0].dtype).sum())
        if abs(total) >= 1e-8:
            out.div_(total)
    return out


def dare(x: torch.Tensor, p: float, rescale: str, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability ``p``; rescale the rest by 1/(1-p) or to the same L1 norm."""
    if p == 0.0:
        return x.clone()
    keep = torch.rand(x.shape, generator=generator) >= p
    out = x * keep
    if rescale == "inverse":
        return out.div_(1.0 - p)
    if rescale == "l1":
        before, after = float(x.abs().sum()), float(out.abs().sum())
        if before > 1e-7 and after > 1e-7:
            out.mul_(before / after)
    return out
