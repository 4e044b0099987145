"""The tensor arithmetic of mk-ties (imports torch; loaded only when a component runs).

The sign election and the disjoint aggregation are per coordinate, so they run over chunks of
coordinates: memory beyond the inputs is one bool mask per source, not stacks of float copies
(a 262 MB embedding no longer costs gigabytes). They run on the device of their inputs (the
merge's ``device``); random draws are made on the CPU so that every device drops the same entries.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from mergekit_core.api import map_slices

CHUNK = 1 << 18
"""Most entries per election chunk."""
CHUNK_BYTES = 3 << 18
"""Most bytes of one [sources, chunk] float32 temporary: under the allocator's 1 MiB mmap threshold
(``mergekit_core``'s ``bound_allocator``), so temporaries come from reused heap memory instead of
fresh, zeroed pages, and stay in cache. Measured on 3 x 11.5 M entries: 0.33 s with 256 Ki-entry
chunks, 0.17 s with 64 Ki; the same bits (chunks are independent: tested)."""


def chunk_entries(sources: int) -> int:
    """Entries per election chunk for ``sources`` sources: the largest power of two within
    ``CHUNK_BYTES`` and ``CHUNK`` (at least 4096)."""
    k = CHUNK
    while k > 4096 and sources * k * 4 > CHUNK_BYTES:
        k //= 2
    return k


class _Workspace:
    """Chunk-sized buffers reused across the chunks of one election (no allocation per chunk):
    the (masked) stack, its signs, the agreement as numbers and as booleans, and products."""

    def __init__(self, sources: int, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.stack = torch.empty(sources * size, dtype=dtype, device=device)
        self.signs = torch.empty(sources * size, dtype=dtype, device=device)
        self.agree = torch.empty(sources * size, dtype=dtype, device=device)
        self.product = torch.empty(sources * size, dtype=dtype, device=device)
        self.flags = torch.empty(size, dtype=torch.bool, device=device)

    @staticmethod
    def view(buf: torch.Tensor, sources: int, k: int) -> torch.Tensor:
        return buf[:sources * k].view(sources, k)


def _fill(stack: torch.Tensor, flats: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] | None,
          s: int, e: int) -> torch.Tensor:
    """``stack[i] = flats[i][s:e] * masks[i][s:e]`` (the same products as ``f * m``), in place."""
    for i, f in enumerate(flats):
        if masks is None:
            stack[i].copy_(f[s:e])
        else:
            torch.mul(f[s:e], masks[i][s:e].to(stack.device), out=stack[i])
    return stack


def _any_nonzero(stack: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``(stack != 0).any(0)`` row by row into ``out`` (the reduction over dim 0 of a bool stack
    took 35 ms per 3 x 1 M chunk, the rows about 1 ms)."""
    torch.ne(stack[0], 0, out=out)
    for row in stack[1:]:
        out.logical_or_(row != 0)
    return out


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

    The chunks run in reused buffers (``_Workspace``) with the same operations, in the same
    order and layout, as a fresh stack per chunk: the result is the same bit for bit. On the CPU
    the chunks are spread over ``torch.get_num_threads()`` worker threads, each running its
    operations single-threaded: one chunk's twenty small operations no longer wait for every
    intra-op thread at each step (on two cores shared with other processes the election took 9x
    longer that way). Chunk results do not depend on the thread count (tested).
    """
    n = flats[0].numel()
    dtype, device = flats[0].dtype, flats[0].device
    weights = torch.tensor(list(coefficients), dtype=dtype, device=device).view(-1, 1)
    weighted = bool(params.get("weighted_election", False))
    out = torch.empty(n, dtype=dtype, device=device)
    sources = len(flats)
    size = chunk_entries(sources)
    local = threading.local()

    def chunk(s: int) -> tuple[int, torch.Tensor | None]:
        """Merge the chunk at ``s`` into ``out``; its elected-sign sum and its tied positions."""
        space = getattr(local, "space", None)
        if space is None:
            space = local.space = _Workspace(sources, min(n, size), dtype, device)
        k = min(size, n - s)
        stack = _fill(space.view(space.stack, sources, k), flats, masks, s, s + k)
        if weighted:
            stack.mul_(weights)
        signs = torch.sign(stack, out=space.view(space.signs, sources, k))
        elected = (stack.sum(0) if params["sign_method"] == "mass" else signs.sum(0)).sign_()
        total = int(elected.sum())
        out[s:s + k] = _aggregate(stack, signs, elected, weights, params, space)
        if params["sign_tie"] == "zero":
            return total, None
        tied = torch.nonzero(_any_nonzero(stack, space.flags[:k]).logical_and_(elected == 0)).flatten()
        return total, (tied + s if tied.numel() else None)

    results = map_slices(chunk, list(range(0, n, size)), device, name="mk-ties-elect")
    elected_sum = sum(total for total, _ in results)
    pending = [tied for _, tied in results if tied is not None]
    if pending:
        index = torch.cat(pending)
        fill = 1.0 if params["sign_tie"] == "positive" else float((elected_sum > 0) - (elected_sum < 0))
        stack = torch.stack([f[index] * m.to(device)[index] for f, m in zip(flats, masks)] if masks is not None
                            else [f[index] for f in flats])
        if weighted:
            stack = stack * weights
        elected = torch.full((index.numel(),), fill, dtype=stack.dtype, device=device)
        out[index] = _aggregate(stack, torch.sign(stack), elected, weights, params)
    return out


def _aggregate(stack: torch.Tensor, signs: torch.Tensor, elected: torch.Tensor, weights: torch.Tensor,
               params: dict[str, Any], space: _Workspace | None = None) -> torch.Tensor:
    """Weighted sum (or mean) of the entries whose sign is the elected one.

    Where the elected sign is 0 the matching entries are zeros, so the result there is 0
    whatever the count; elsewhere a match implies a non-zero entry. ``weighted_mean`` divides by
    the sum of the agreeing coefficients (1 where that is 0, as mergekit).
    """
    sources, k = stack.shape
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
    if space is None:
        agree = (signs == elected).to(stack.dtype)
        kept = stack * agree
    else:
        agree = torch.eq(signs, elected, out=space.view(space.agree, sources, k))
        kept = torch.mul(stack, agree, out=space.view(space.product, sources, k))
    summed = (weights.T @ kept).squeeze(0)  # a matrix-vector product over the sources
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
    """Drop each entry with probability ``p``; rescale the rest by 1/(1-p) or to the same L1 norm.

    DARE (Yu et al. 2024, eq. 2): ``keep ~ Bernoulli(1 - p)``, drawn as ``uniform >= p`` on the
    CPU (the same draws on every device). One scratch tensor holds the draws, then the 0/1 keep
    factors, then the absolute values of both L1 sums: the result is the same, bit for bit, as
    ``x * (rand >= p)`` with separate temporaries (``tests/test_fast_kernels.py``).
    """
    import torch

    if p == 0.0:
        return x.clone()
    scratch = torch.rand(x.shape, generator=generator).ge_(p)  # 1.0 kept, 0.0 dropped (x * 0 keeps its sign)
    out = x * scratch.to(x.device)
    if rescale == "inverse":
        return out.div_(1.0 - p)
    if rescale == "l1":
        if scratch.device != x.device:
            scratch = torch.empty_like(x)
        before = float(torch.abs(x, out=scratch).sum())
        after = float(torch.abs(out, out=scratch).sum())
        if before > 1e-7 and after > 1e-7:
            out.mul_(before / after)
    return out
