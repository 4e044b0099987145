"""TIES trimming over the whole task vector (``trim_scope: model``) in two streaming passes.

Pass 1 histograms every source's magnitudes into 32768 exact buckets (the top bits of the
float32 pattern); the bucket holding the k-th largest magnitude follows from the counts. Pass 2
collects only that bucket's values and selects the threshold inside it with ``kthvalue``. The
result equals sorting the whole concatenated task vector, without ever holding it: memory is one
tensor plus one bucket. Entries equal to the threshold are kept in plan order, lowest index first,
so exactly k% of the entries survive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mergekit_core import PrepareContext
from mk_ties.select import BUCKETS, bucket_counts, keep_count, kth_in, locate, magnitude_bucket


@dataclass
class GlobalTrim:
    """Per source: keep entries with magnitude above ``thresholds[i]``, plus ``ties[i][tensor]``
    entries equal to it (lowest indices first)."""

    thresholds: list[float] = field(default_factory=list)
    ties: list[dict[str, int]] = field(default_factory=list)

    def mask(self, source: int, name: str, a: torch.Tensor) -> torch.Tensor:
        threshold = self.thresholds[source]
        mask = a > threshold
        take = self.ties[source].get(name, 0)
        if take:
            mask[torch.nonzero(a == threshold).flatten()[:take]] = True
        return mask


def _flat_abs(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs().reshape(-1).float()


def global_trim(context: PrepareContext, k: float) -> GlobalTrim:
    counts: list[torch.Tensor] = []
    totals: list[int] = []
    for group in context.groups():
        for i, x in enumerate(group.tensors):
            if i == len(counts):
                counts.append(torch.zeros(BUCKETS, dtype=torch.int64))
                totals.append(0)
            counts[i] += bucket_counts(_flat_abs(x))
            totals[i] += x.numel()
    result = GlobalTrim()
    plans = []  # per source: (bucket, how many to take inside it) or None
    for c, n in zip(counts, totals):
        m = keep_count(k / 100.0, n)
        if m == 0:
            result.thresholds.append(float("inf"))
            plans.append(None)
        elif m == n:
            result.thresholds.append(-1.0)
            plans.append(None)
        else:
            plans.append(locate(c, m))
            result.thresholds.append(0.0)
        result.ties.append({})
    if all(p is None for p in plans):
        return result
    members: list[list[tuple[str, torch.Tensor]]] = [[] for _ in plans]
    for group in context.groups():
        for i, x in enumerate(group.tensors):
            if plans[i] is None:
                continue
            a = _flat_abs(x)
            members[i].append((group.name, a[magnitude_bucket(a) == plans[i][0]]))
    for i, plan in enumerate(plans):
        if plan is None:
            continue
        values = torch.cat([v for _, v in members[i]])
        need = plan[1]
        threshold = kth_in(values, need)
        budget = need - int((values > threshold).sum())
        result.thresholds[i] = threshold
        for name, v in members[i]:
            take = min(budget, int((v == threshold).sum()))
            if take:
                result.ties[i][name] = take
                budget -= take
        members[i].clear()
    return result
