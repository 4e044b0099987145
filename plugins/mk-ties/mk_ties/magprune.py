"""DELLA's MAGPRUNE (Deep et al. 2024, arXiv 2406.11617, section 3): magnitude-ranked drop
probabilities, then rescale. Imports torch; loaded only when DELLA runs.

Per row (the second axis of the tensor as it is, as mergekit's ``sparsify.della_magprune``; a
1-D or 0-D tensor is one row) the entries are ranked by magnitude, ascending, ``r = 1..n``; the keep
probability of rank ``r`` is ``(density - epsilon) + 2 epsilon (r - 1) / (n - 1)`` (smallest
magnitude: ``density - epsilon``, largest: ``density + epsilon``; a row of one entry keeps it
with probability ``density``, where mergekit divides 0 by 0). Each entry is kept with its
probability (Bernoulli), then the kept entries are rescaled.
"""

from __future__ import annotations

import torch

from mergekit_core import ParameterError


def keep_probabilities(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probability of each entry of ``x`` (float, any shape with >= 1 axis), shape of ``x``
    viewed as rows (1-D: one row of ``x.numel()`` entries)."""
    rows = x.reshape(1, -1) if x.dim() < 2 else x
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(x.dtype) + 1
    n = rows.shape[1]
    if n > 1:
        rank_norm = ((ranks - 1) / (n - 1)).clamp(0, 1)
    else:
        rank_norm = torch.full_like(ranks, 0.5)
    return (density - epsilon) + rank_norm * 2 * epsilon


def magprune(x: torch.Tensor, density: float, epsilon: float, rescale: str, generator: torch.Generator,
             where: str = "della: ") -> torch.Tensor:
    """MAGPRUNE of one task vector ``x`` (float, any shape): a new tensor of ``x``'s shape.

    ``density`` is the mean keep probability; ``rescale``: ``inverse`` divides each kept entry by
    its own keep probability (the paper's 1 / (1 - p_i)), ``l1`` scales the tensor back to its L1
    norm (mergekit, skipped when either norm is under 1e-7), ``none`` leaves it. ``density >= 1``
    returns ``x`` unchanged and ``density <= 0`` zeros, as mergekit. ``where`` starts the error
    message (the method, tensor and source).
    """
    if density >= 1:
        return x.clone()
    if density <= 0:
        return torch.zeros_like(x)
    if density - epsilon <= 0 or density + epsilon >= 1:
        raise ParameterError(f"{where}density {density:g} +/- epsilon {epsilon:g} must lie inside (0, 1); "
                             "lower epsilon or move density away from 0 and 1")
    probs = keep_probabilities(x, density, epsilon)
    mask = torch.bernoulli(probs, generator=generator)
    rows = x.reshape(1, -1) if x.dim() < 2 else x
    kept = rows * mask
    if rescale == "inverse":
        kept = kept / probs
    elif rescale == "l1":
        before, after = rows.abs().sum(), kept.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            kept = kept * (before / after)
    return kept.reshape(x.shape)
