"""The tensor arithmetic of mk-ties (imports torch; loaded only when a component runs)."""

from __future__ import annotations

from typing import Any

import torch


def elect_and_merge(stack: torch.Tensor, coefficients: list[float], params: dict[str, Any]) -> torch.Tensor:
    """Sign election and disjoint aggregation over ``stack`` (sources x entries)."""
    signs = torch.sign(stack)
    total = stack.sum(0) if params["sign_method"] == "mass" else signs.sum(0)
    elected = torch.sign(total)
    zero = elected == 0
    if bool(zero.any()):
        if params["sign_tie"] == "majority":
            elected[zero] = torch.sign(elected.sum())
        elif params["sign_tie"] == "positive":
            elected[zero] = 1.0
    agree = (signs == elected) & (stack != 0)
    weights = torch.tensor(coefficients, dtype=stack.dtype).view(-1, *([1] * (stack.dim() - 1)))
    summed = (stack * weights * agree).sum(0)
    if params["aggregate"] == "sum":
        return summed
    return summed / agree.sum(0).clamp(min=1)


def dare(x: torch.Tensor, p: float, rescale: str, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability ``p``; rescale the rest by 1/(1-p) or to the same L1 norm."""
    if p == 0.0:
        return x.clone()
    keep = torch.rand(x.shape, generator=generator) >= p
    out = x * keep
    if rescale == "inverse":
        return out / (1.0 - p)
    if rescale == "l1":
        before, after = float(x.abs().sum()), float(out.abs().sum())
        if before > 1e-7 and after > 1e-7:
            out = out * (before / after)
    return out


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)
