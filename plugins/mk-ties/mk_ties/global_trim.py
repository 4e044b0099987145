"""TIES trimming over the whole task vector (``trim_scope: model``) in one streaming pass (two
where pass 1 could not keep what the threshold needs).

Pass 1 histograms every source's magnitudes into 32768 exact buckets (the top bits of the
float32 pattern); the bucket holding the k-th largest magnitude follows from the counts. Only
that bucket's values are needed to select the threshold inside it with ``kthvalue``: pass 1 keeps
the values near the running estimate of that bucket, and a second pass re-reads only the tensors
whose kept values missed it. The result equals sorting the whole concatenated task vector,
without ever holding it: memory is one tensor plus the kept values (at most ``KEEP_BYTES``) and
each tensor's histogram over its occupied buckets. Entries equal to the threshold are kept in plan order, lowest index first,
so exactly k% of the entries survive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mergekit_core import PrepareContext
from mergekit_core.api import map_slices
from mk_ties.select import (
    BUCKETS,
    SELECT_CHUNK,
    keep_count,
    kth_in,
    locate,
    magnitude_bucket,
)


@dataclass
class GlobalTrim:
    """Per source: keep entries with magnitude above ``thresholds[i]``, plus ``ties[i][tensor]``
    entries equal to it (lowest indices first)."""

    thresholds: list[float] = field(default_factory=list)
    ties: list[dict[str, int]] = field(default_factory=list)

    def mask(self, source: int, name: str, a: torch.Tensor) -> torch.Tensor:
        """The kept entries of the magnitudes ``a`` (1-D) of tensor ``name`` of ``source``."""
        return self.magnitude_mask(source, name, a)

    def magnitude_mask(self, source: int, name: str, x: torch.Tensor) -> torch.Tensor:
        """``mask(source, name, x.abs())`` without the full-size ``abs``: slice by slice, on worker
        threads (the same mask)."""
        threshold = self.thresholds[source]
        flat = x.reshape(-1)
        mask = torch.empty(flat.numel(), dtype=torch.bool, device=flat.device)

        def above(span: tuple[int, int]) -> torch.Tensor | None:
            s, e = span
            a = flat[s:e].abs()
            torch.gt(a, threshold, out=mask[s:e])
            return torch.nonzero(a == threshold).flatten().add_(s) if self.ties[source].get(name, 0) else None

        tied = map_slices(above, spans(flat.numel()), flat.device, name="mk-ties-trim")
        take = self.ties[source].get(name, 0)
        if take:
            mask[torch.cat(tied)[:take]] = True
        return mask


def spans(n: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + SELECT_CHUNK)) for s in range(0, n, SELECT_CHUNK)]


def _abs_slice(flat: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    return flat[span[0]:span[1]].abs().float()


@dataclass
class _Source:
    """Pass-1 statistics of one source: its histogram, size, and per tensor the histogram and
    the values kept in a window of buckets around the running estimate of the threshold's."""

    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(BUCKETS, dtype=torch.int64))
    total: int = 0
    hists: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)
    """Per tensor: its first occupied bucket and the counts from there to its last one."""
    windows: dict[str, tuple[int, int, torch.Tensor]] = field(default_factory=dict)

    def count_in(self, name: str, bucket: int) -> int:
        """How many of tensor ``name``'s magnitudes lie in ``bucket``."""
        if name not in self.hists:
            return 0
        first, counts = self.hists[name]
        return int(counts[bucket - first]) if first <= bucket < first + counts.numel() else 0


WINDOW = 6
"""Buckets kept on either side of the running estimate (a bucket is 1/128 of an octave)."""

KEEP_BYTES = 1 << 30
"""At most this many bytes of windowed values are kept in pass 1; tensors past it are re-read."""


def global_trim(context: PrepareContext, k: float) -> GlobalTrim:
    """Per-source thresholds keeping the top ``k`` percent of magnitudes over the whole model.

    Pass 1 reads every tensor once: per tensor it keeps its histogram and the values within
    ``WINDOW`` buckets of where the threshold's bucket lies given what has been read so far.
    The threshold's bucket is then known exactly; a tensor needs a second read only if it has
    values in that bucket that its window missed (a threshold that moved far late in the pass,
    or the ``KEEP_BYTES`` budget spent), so the merge usually reads the sources twice in all.
    """
    stats: list[_Source] = []
    names: list[str] = []
    kept_bytes = 0
    for group in context.groups():
        names.append(group.name)
        for i, x in enumerate(group.tensors):
            if i == len(stats):
                stats.append(_Source())
            src = stats[i]
            flat = x.detach().reshape(-1)
            parts = spans(flat.numel())
            hist = torch.zeros(BUCKETS, dtype=torch.int64, device=flat.device)
            for part in map_slices(lambda span: torch.bincount(magnitude_bucket(_abs_slice(flat, span)),
                                                               minlength=BUCKETS), parts, flat.device, name="mk-ties-trim"):
                hist += part
            hist = hist.cpu()
            src.counts += hist
            src.total += x.numel()
            occupied = torch.nonzero(hist).flatten()
            first = int(occupied[0]) if occupied.numel() else 0
            last = int(occupied[-1]) if occupied.numel() else -1
            src.hists[group.name] = (first, hist[first:last + 1].to(torch.int32))
            m = keep_count(k / 100.0, src.total)
            if 0 < m < src.total and kept_bytes < KEEP_BYTES:
                guess = locate(src.counts, m)[0]
                lo, hi = guess - WINDOW, guess + WINDOW

                def window(span: tuple[int, int]) -> torch.Tensor:
                    a = _abs_slice(flat, span)
                    b = magnitude_bucket(a)
                    return a[(b >= lo) & (b <= hi)]

                values = torch.cat(map_slices(window, parts, flat.device, name="mk-ties-trim")).cpu()
                kept_bytes += values.numel() * values.element_size()
                src.windows[group.name] = (lo, hi, values)
    result = GlobalTrim()
    plans = []  # per source: (bucket, how many to take inside it) or None
    for src in stats:
        m = keep_count(k / 100.0, src.total)
        if m == 0:
            result.thresholds.append(float("inf"))
            plans.append(None)
        elif m == src.total:
            result.thresholds.append(-1.0)
            plans.append(None)
        else:
            plans.append(locate(src.counts, m))
            result.thresholds.append(0.0)
        result.ties.append({})
    if all(p is None for p in plans):
        return result
    members: list[dict[str, torch.Tensor]] = [{} for _ in plans]
    reread: set[str] = set()
    for i, (src, plan) in enumerate(zip(stats, plans)):
        if plan is None:
            continue
        bucket = plan[0]
        for name in names:
            if not src.count_in(name, bucket):
                continue
            window = src.windows.get(name)
            if window is not None and window[0] <= bucket <= window[1]:
                v = window[2]
                members[i][name] = v[magnitude_bucket(v) == bucket]
            else:
                reread.add(name)
        src.windows.clear()
    if reread:
        for group in context.groups_of(reread):
            for i, x in enumerate(group.tensors):
                if plans[i] is None or group.name in members[i] or not stats[i].count_in(group.name, plans[i][0]):
                    continue
                a = x.detach().abs().reshape(-1).float()
                members[i][group.name] = a[magnitude_bucket(a) == plans[i][0]].cpu()
    for i, plan in enumerate(plans):
        if plan is None:
            continue
        ordered = [(name, members[i][name]) for name in names if name in members[i]]
        values = torch.cat([v for _, v in ordered])
        need = plan[1]
        threshold = kth_in(values, need)
        budget = need - int((values > threshold).sum())
        result.thresholds[i] = threshold
        for name, v in ordered:
            take = min(budget, int((v == threshold).sum()))
            if take:
                result.ties[i][name] = take
                budget -= take
        members[i].clear()
    return result
