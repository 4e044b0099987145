"""TALL masks (Wang et al. 2024), their combination, and one-bit packing.

m_t = |tau_t| > lambda_t * |tau_MTL - tau_t|, with tau_MTL = sum_t tau_t (unscaled), strict ``>``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

STRATEGIES = ("union", "intersection", "majority")


def tall_masks(deltas: Sequence[torch.Tensor], lambdas: Sequence[float]) -> torch.Tensor:
    """Per-task masks, stacked: bool ``[T, *shape]``."""
    return tall_masks_stacked(torch.stack([d.float() for d in deltas]), lambdas)


def tall_masks_stacked(stacked: torch.Tensor, lambdas: Sequence[float]) -> torch.Tensor:
    """:func:`tall_masks` of ``stacked`` (float32 ``[T, ...]``, any slice of the task vectors: the
    masks are entrywise)."""
    total = stacked.sum(0)
    lam = torch.tensor(list(lambdas), dtype=torch.float32).reshape(-1, *([1] * total.dim()))
    return stacked.abs() > lam * (total.unsqueeze(0) - stacked).abs()


def combine(masks: torch.Tensor, strategy: str) -> torch.Tensor:
    """One mask from ``[T, ...]`` task masks: any task, every task, or more than half of them."""
    if strategy == "union":
        return masks.any(0)
    if strategy == "intersection":
        return masks.all(0)
    if strategy == "majority":
        return masks.sum(0, dtype=torch.int32) * 2 > masks.shape[0]
    raise ValueError(f"unknown mask strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")


def pack(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8, one bit per entry (numpy's big-endian bit order, as tall_masks stores)."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy()))


def unpack(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    count = int(np.prod(shape)) if len(shape) else 1
    bits = np.unpackbits(packed.numpy(), count=count)
    return torch.from_numpy(bits.astype(bool)).reshape(tuple(shape))
