"""TIES' disjoint ``max`` aggregation and SCE's merge (imports torch; loaded only when they run).

``elect_and_max`` elects signs exactly as ``kernels.elect_and_merge`` (``sign_method``,
``sign_tie``, ``weighted_election``) and keeps, per coordinate, the largest ``|c_t tau_t|``
among the sources that agree with the elected sign, with that sign: the original TIES code's and
FusionBench's ``merge_func: max`` (``disjoint_merge``), where ``c_t`` is lambda.

``sce`` is mergekit's SCE (FuseChat, Wan et al. 2024, arXiv 2408.07990): Select the entries
whose variance across the task vectors is in the top ``select_topk`` fraction (of the entries
with non-zero variance), Calculate each task's weight as its mean squared (selected) delta over
the sum of them, Erase the entries whose sign disagrees with the elected one (sign of the sum,
0 counted as +), and take the weighted mean of the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

CHUNK = 1 << 20


def _stack(flats: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] | None, s: int, e: int) -> torch.Tensor:
    if masks is None:
        return torch.stack([f[s:e] for f in flats])
    return torch.stack([f[s:e] * m[s:e] for f, m in zip(flats, masks)])


def elect_and_max(flats: Sequence[torch.Tensor], coefficients: Sequence[float], params: dict[str, Any],
                  masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Disjoint max of the (masked) 1-D tensors ``flats`` (float, equal lengths): a 1-D tensor."""
    n = flats[0].numel()
    weights = torch.tensor(list(coefficients), dtype=flats[0].dtype).view(-1, 1)
    weighted = bool(params.get("weighted_election", False))
    elected = torch.empty(n, dtype=flats[0].dtype)
    for s in range(0, n, CHUNK):
        stack = _stack(flats, masks, s, s + CHUNK)
        if weighted:
            stack = stack * weights
        elected[s:s + CHUNK] = torch.sign(stack.sum(0) if params["sign_method"] == "mass"
                                          else torch.sign(stack).sum(0))
    if params["sign_tie"] != "zero":
        total = float(elected.sum())
        fill = 1.0 if params["sign_tie"] == "positive" else float((total > 0) - (total < 0))
        elected[elected == 0] = fill
    out = torch.empty(n, dtype=flats[0].dtype)
    for s in range(0, n, CHUNK):
        stack = _stack(flats, masks, s, s + CHUNK)
        scaled = stack * weights
        if weighted:
            stack = scaled
        e = elected[s:s + CHUNK]
        agree = (torch.sign(stack) == e) & (e != 0)
        out[s:s + CHUNK] = (scaled.abs() * agree).amax(0) * e
    return out


def sce(deltas: Sequence[torch.Tensor], coefficients: Sequence[float], select_topk: float) -> torch.Tensor:
    """SCE's merged task vector of ``deltas`` (float, equal shapes), shape of ``deltas[0]``;
    ``coefficients`` (the lambdas) multiply each task's term (mergekit: all 1)."""
    stack = torch.stack(list(deltas))
    if select_topk < 1:
        if select_topk <= 0:
            stack = torch.zeros_like(stack)
        else:
            var = torch.var(stack, dim=0, unbiased=False).reshape(-1)
            k = int(int(torch.count_nonzero(var)) * select_topk)
            mask = torch.zeros_like(var)
            mask[torch.argsort(var, descending=True, stable=True)[:k]] = 1  # exact in any dtype; ties: lowest index
            stack = stack * mask.reshape(stack.shape[1:])
    majority = (stack.sum(0) >= 0).to(stack.dtype) * 2 - 1
    agree = (torch.sign(stack) == majority).to(stack.dtype)
    energy = stack.square().reshape(stack.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    tv_weights = torch.full_like(energy, 1.0 / energy.numel()) if abs(total) < 1e-6 else energy / total
    tv_weights = tv_weights.view(-1, *[1] * (stack.dim() - 1))
    c = torch.tensor(list(coefficients), dtype=stack.dtype).view_as(tv_weights)
    erased = tv_weights * agree
    return (stack * erased * c).sum(0) / erased.sum(0).clamp(min=1e-6)


def ram(deltas: Sequence[torch.Tensor], coefficients: Sequence[float], epsilon: float,
        plus: tuple[float, float] | None = None) -> torch.Tensor:
    """RAM's merged task vector (Reinforced Agent Merging, arXiv 2601.13572; mergekit's ``ram``
    and ``ramplus_tl``) of ``deltas`` (float, equal shapes), shape of ``deltas[0]``.

    An entry contributes where ``|tau_t| > epsilon``; each coordinate is the mean of its
    contributing entries (an entry only one task touches is taken whole), each times its
    coefficient ``c_t``. ``plus = (r, alpha)`` (RAM+, tensor-local): task t's unique entries are
    scaled by ``1 + r * clamp(shared_t / max(unique_t, epsilon), 0, alpha)``, ``shared_t`` and
    ``unique_t`` counting its contributing entries that other tasks touch too, or do not.
    """
    stack = torch.stack(list(deltas)).reshape(len(deltas), -1)
    touched = stack.abs() > epsilon
    counts = touched.sum(0, keepdim=True)
    c = torch.tensor(list(coefficients), dtype=stack.dtype).view(-1, 1)
    kept = stack * touched
    overlap = counts > 1
    unique = counts == 1
    if plus is None:
        scale = torch.ones_like(c)
    else:
        r, alpha = plus
        shared_t = (touched & overlap).sum(dim=1).to(stack.dtype)
        unique_t = (touched & unique).sum(dim=1).to(stack.dtype)
        scale = (1 + r * (shared_t / unique_t.clamp(min=epsilon)).clamp(min=0, max=alpha)).view(-1, 1)
    merged = (kept * unique * scale + kept * overlap / counts.clamp(min=1)) * c
    return merged.sum(0).reshape(deltas[0].shape)
