"""Per-task TIES vectors: each task vector as TIES leaves it before the disjoint merge (what
AdaMerging++ learns coefficients for).

Source: Yang et al., AdaMerging (ICLR 2024), AdaMerging++ = the task vectors through
``ties_merging_split`` of the official code (``src/ties_merging_utils.py``): keep each task's top
k% by magnitude (over the whole task vector there; ``trim_scope`` here), elect the sign of the
summed trimmed vectors, keep each task's entries whose sign agrees. Exact cancellations (a sum of
0) take the majority sign of the tensor, as ``resolve_sign`` does; this equals the ``ties`` method's
masks with ``sign_method: mass, sign_tie: majority``, so ``ties`` with ``aggregate: sum`` merges
these vectors with any coefficients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from mergekit_core import PrepareContext
from mk_ties.global_trim import GlobalTrim, global_trim
from mk_ties.select import keep_count, top_mask


@dataclass
class _Group:
    name: str
    tensors: list[torch.Tensor]


class _Groups(PrepareContext):
    """A prepare context over ``groups()`` (its ``groups_of`` filters a full pass)."""

    def __init__(self, groups: Callable[[], Iterable[tuple[str, Sequence[torch.Tensor]]]]) -> None:
        self.plan = None
        self._groups = groups

    def groups(self) -> Iterator[_Group]:  # type: ignore[override]
        for name, tensors in self._groups():
            yield _Group(name, list(tensors))


def model_trim(groups: Callable[[], Iterable[tuple[str, Sequence[torch.Tensor]]]], k: float) -> GlobalTrim:
    """The per-task magnitude thresholds of a top-``k``% trim over whole task vectors.

    ``groups()``: yields ``(tensor name, one task vector per source)`` for every tensor; it is
    called twice (two streaming passes, memory one tensor plus one histogram bucket).
    """
    return global_trim(_Groups(groups), k)  # type: ignore[arg-type]


def ties_split(name: str, deltas: Sequence[torch.Tensor], k: float, trim: GlobalTrim | None = None) -> list[torch.Tensor]:
    """Each source's TIES-processed task vector for one tensor.

    ``deltas``: one task vector per source (same shape, float); ``k``: percent kept by magnitude,
    within this tensor, or by ``trim`` (from :func:`model_trim`) over the whole task vector.
    Returns new tensors of the same shape and dtype: trimmed, and zero where the entry's sign is
    not the elected one.
    """
    flats = [d.reshape(-1) for d in deltas]
    kept = []
    for i, f in enumerate(flats):
        a = f.abs()
        mask = trim.mask(i, name, a) if trim is not None else top_mask(a, keep_count(k / 100.0, a.numel()))
        kept.append(f * mask)
    total = torch.stack(kept).sum(0)
    elected = torch.sign(total)
    majority = torch.sign(elected.sum())
    elected[elected == 0] = majority  # 0 when the tensor's signs cancel: those entries are dropped, as ties does
    return [torch.where(torch.sign(x) == elected, x, torch.zeros_like(x)).reshape(d.shape)
            for x, d in zip(kept, deltas)]
