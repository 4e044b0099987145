"""The tensor arithmetic of mk-ties (imports torch; loaded only when a component runs).

The sign election and the disjoint aggregation are per coordinate, so they run over chunks of
coordinates: memory beyond the inputs is one bool mask per source and one int8 sign per entry,
not stacks of float copies (a 262 MB embedding no longer costs gigabytes).
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
    """Sign election and disjoint aggregation of the (masked) 1-D tensors ``flats``.

    Pass 1 elects a sign per entry (int8); entries whose elected sign is 0 are resolved by
    ``sign_tie`` (majority: the sign of all elected signs of the tensor). Pass 2 aggregates the
    entries that agree with it, weighted by ``coefficients``.
    """
    n = flats[0].numel()
    elected = torch.empty(n, dtype=torch.int8)
    for s in range(0, n, CHUNK):
        stack = _chunk(flats, masks, s, s + CHUNK)
        total = stack.sum(0) if params["sign_method"] == "mass" else torch.sign(stack).sum(0)
        elected[s:s + CHUNK] = torch.sign(total).to(torch.int8)
    if params["sign_tie"] != "zero":
        zero = elected == 0
        if bool(zero.any()):
            fill = 1 if params["sign_tie"] == "positive" else int(torch.sign(elected.sum(dtype=torch.int64)))
            elected[zero] = fill
    weights = torch.tensor(list(coefficients), dtype=flats[0].dtype).view(-1, 1)
    out = torch.empty(n, dtype=flats[0].dtype)
    for s in range(0, n, CHUNK):
        stack = _chunk(flats, masks, s, s + CHUNK)
        agree = (torch.sign(stack) == elected[s:s + CHUNK]) & (stack != 0)
        summed = (stack * weights * agree).sum(0)
        out[s:s + CHUNK] = summed if params["aggregate"] == "sum" else summed / agree.sum(0).clamp(min=1)
    return out


def weighted_sum(flats: Sequence[torch.Tensor], coefficients: Sequence[float],
                 masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    out = torch.zeros_like(flats[0])
    for i, (f, c) in enumerate(zip(flats, coefficients)):
        out.add_(f * masks[i] if masks is not None else f, alpha=c)
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
