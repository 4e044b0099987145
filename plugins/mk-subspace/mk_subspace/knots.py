"""KnOTS (Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025): TIES or DARE-TIES in
a basis shared by the tasks' LoRA updates.

Official code: ``task_merger.py::SVDMerger`` and ``masking_ops.py`` (gstoica27/KnOTS baa35e85);
FusionBench ``knots/knots_utils.py::subspace_alignment``. Per 2-D tensor:

    [dW_1 ... dW_T] = U diag(s) [Vh_1 ... Vh_T]             (float64, O x T*I, components s > eps)
    rep_t = diag(s) Vh_t                                     (k x I: task t in the shared basis)
    rep_t <- DARE(rep_t, p)                                  (KnOTS-DARE-TIES only)
    merged = TIES(rep_1 .. rep_T; c_1 .. c_T)                (top-k% per task, elect, disjoint mean of c_t rep_t)
    dW = U merged                                            (O x I, rank <= k)

The top-k% selection ranks each task's entries over every tensor of the merge (``trim_scope:
model``, the official code flattens the whole model) or within each tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Aligned:
    """One tensor in the shared basis: ``basis`` U ``[O, k]`` and one representation per task ``[k, I]``."""

    basis: torch.Tensor
    reps: list[torch.Tensor]


@dataclass
class KnotsState:
    """What ``prepare`` computed: each 2-D tensor's alignment and, per task, its kept entries."""

    aligned: dict[str, Aligned] = field(default_factory=dict)
    keep: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def align(tasks: list[torch.Tensor], eps: float) -> Aligned:
    """The shared basis of the task matrices ``[O, I]`` (float64 SVD) and each task's coordinates."""
    inputs = tasks[0].shape[1]
    concat = torch.cat([t.to(torch.float64) for t in tasks], 1)
    u, s, vh = torch.linalg.svd(concat, full_matrices=False)
    del concat
    keep = s > eps
    u, s, vh = u[:, keep], s[keep], vh[keep]
    return Aligned(u, [s[:, None] * v for v in torch.split(vh, inputs, 1)])


def dare(reps: list[torch.Tensor], p: float, seed: int) -> list[torch.Tensor]:
    """Drop each entry with probability ``p`` and rescale the survivors by ``1 / (1 - p)``."""
    if p <= 0.0:
        return reps
    out = []
    for t, r in enumerate(reps):
        g = torch.Generator().manual_seed(seed + t)
        keep = torch.rand(r.shape, generator=g, dtype=torch.float64) >= p
        out.append(r * keep / (1.0 - p))
    return out


def top_masks(values: list[torch.Tensor], fraction: float) -> list[torch.Tensor]:
    """Boolean masks keeping exactly ``int(fraction * n)`` largest ``|values|`` over all given
    tensors (ties broken by position), split back into the tensors' shapes."""
    flat = torch.cat([v.reshape(-1).abs() for v in values])
    count = int(fraction * flat.numel())
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if count:
        order = torch.sort(flat, descending=True, stable=True).indices
        mask[order[:count]] = True
    return [m.reshape(v.shape) for m, v in zip(torch.split(mask, [v.numel() for v in values]), values)]


def ties(reps: list[torch.Tensor], masks: list[torch.Tensor], coefficients: list[float]) -> torch.Tensor:
    """Sign election by the sum of the kept values (zero: the sign of the summed elected signs, the
    official ``majority``, here per tensor), then the mean over the agreeing tasks of ``c_t`` times
    their kept values (disjoint mean; the official code multiplies by one scalar here)."""
    kept = torch.stack([r * m for r, m in zip(reps, masks)])
    elected = torch.sign(kept.sum(0))
    elected[elected == 0] = torch.sign(elected.sum())
    agree = (torch.sign(kept) == elected) & (kept != 0)
    weights = torch.tensor(coefficients, dtype=kept.dtype).reshape(-1, *[1] * (kept.dim() - 1))
    return (kept * agree * weights).sum(0) / agree.sum(0).clamp(min=1)
