"""The reused-buffer election and the bucket-only top-k give the same bits as the straightforward
code they replaced (kept here as the reference: a fresh stack per chunk, a full-size count)."""

from __future__ import annotations

import itertools

import pytest
import torch
from mk_ties import global_trim as global_trim_module
from mk_ties import kernels
from mk_ties.select import BUCKETS, keep_count, kth_in, locate, magnitude_bucket, top_mask

from mergekit_core import PrepareContext, TensorGroup


def reference_top_mask(a: torch.Tensor, m: int) -> torch.Tensor:
    n = a.numel()
    if m <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if m >= n:
        return torch.ones(n, dtype=torch.bool)
    buckets = magnitude_bucket(a)
    bucket, rank = locate(torch.bincount(buckets, minlength=BUCKETS), m)
    threshold = kth_in(a.float()[buckets == bucket], rank)
    mask = a > threshold
    need = m - int(mask.sum())
    if need > 0:
        mask[torch.nonzero(a == threshold).flatten()[:need]] = True
    return mask


def reference_elect_and_merge(flats, coefficients, params, masks=None):
    n = flats[0].numel()
    weights = torch.tensor(list(coefficients), dtype=flats[0].dtype).view(-1, 1)
    weighted = bool(params.get("weighted_election", False))
    out = torch.empty(n, dtype=flats[0].dtype)
    elected_sum, pending = 0, []

    def chunk(s, e):
        if masks is None:
            return torch.stack([f[s:e] for f in flats])
        return torch.stack([f[s:e] * m[s:e] for f, m in zip(flats, masks)])

    for s in range(0, n, kernels.CHUNK):
        stack = chunk(s, s + kernels.CHUNK)
        if weighted:
            stack = stack * weights
        signs = torch.sign(stack)
        elected = torch.sign(stack.sum(0) if params["sign_method"] == "mass" else signs.sum(0))
        elected_sum += int(elected.sum())
        out[s:s + kernels.CHUNK] = kernels._aggregate(stack, signs, elected, weights, params)
        if params["sign_tie"] != "zero":
            tied = torch.nonzero((elected == 0) & (stack != 0).any(0)).flatten()
            if tied.numel():
                pending.append(tied + s)
    if pending:
        index = torch.cat(pending)
        fill = 1.0 if params["sign_tie"] == "positive" else float((elected_sum > 0) - (elected_sum < 0))
        stack = torch.stack([f[index] * m[index] for f, m in zip(flats, masks)] if masks is not None
                            else [f[index] for f in flats])
        if weighted:
            stack = stack * weights
        elected = torch.full((index.numel(),), fill, dtype=stack.dtype)
        out[index] = kernels._aggregate(stack, torch.sign(stack), elected, weights, params)
    return out


def bits(x: torch.Tensor) -> torch.Tensor:
    """The bit patterns (so -0.0 and +0.0, and NaN payloads, count as different)."""
    return x.contiguous().view(torch.int32 if x.element_size() == 4 else torch.int64)


def random_deltas(n: int, sources: int, seed: int, quantized: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(n, generator=g) for _ in range(sources)]
    if quantized:  # many exact ties, zeros and cancellations
        out = [(x * 2).round() / 2 for x in out]
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1 << 18, 700])
def test_top_mask_equals_the_reference(seed, dtype, chunk, monkeypatch):
    from mk_ties import select

    monkeypatch.setattr(select, "SELECT_CHUNK", chunk)  # 700: several slices, a short last one
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 5000, (1,), generator=g))
    a = torch.randn(n, generator=g).abs()
    if seed % 2:
        a = (a * 3).round() / 3  # ties at the threshold
    a = a.to(dtype)
    signed = a * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(dtype)
    for m in (0, 1, n // 5, n // 2, n - 1, n):
        assert torch.equal(top_mask(a, m), reference_top_mask(a, m)), (n, m)
        assert torch.equal(select.top_magnitude_mask(signed, m), reference_top_mask(signed.abs(), m)), (n, m)


def test_top_mask_with_nan_and_inf_equals_the_reference(monkeypatch):
    from mk_ties import select

    monkeypatch.setattr(select, "SELECT_CHUNK", 256)
    a = torch.rand(3000, generator=torch.Generator().manual_seed(1))
    a[::97] = float("nan")
    a[5::101] = float("inf")
    for m in (1, 10, 300, 1500, 2999):
        assert torch.equal(top_mask(a, m), reference_top_mask(a, m)), m


@pytest.mark.parametrize("sign_method, sign_tie, aggregate, weighted", [
    combo for combo in itertools.product(("mass", "count"), ("majority", "positive", "zero"),
                                         ("mean", "sum", "weighted_mean"), (False, True))
])
def test_elect_and_merge_is_bit_identical_to_fresh_stacks(monkeypatch, sign_method, sign_tie, aggregate, weighted):
    monkeypatch.setattr(kernels, "CHUNK", 1000)  # several chunks and a short last one
    params = {"sign_method": sign_method, "sign_tie": sign_tie, "aggregate": aggregate,
              "weighted_election": weighted}
    for seed, quantized in ((0, False), (1, True)):
        flats = random_deltas(4321, 3, seed, quantized)
        masks = [top_mask(f.abs(), 1500) for f in flats]
        coefficients = [0.7, -0.2, 1.3] if weighted else [0.3, 0.3, 0.3]
        for m in (masks, None):
            got = kernels.elect_and_merge(flats, coefficients, params, m)
            want = reference_elect_and_merge(flats, coefficients, params, m)
            assert torch.equal(bits(got), bits(want))


@pytest.mark.parametrize("weighted", [False, True])
def test_elect_and_merge_does_not_depend_on_the_chunk_size(monkeypatch, weighted):
    params = {"sign_method": "mass", "sign_tie": "majority", "aggregate": "weighted_mean",
              "weighted_election": weighted}
    flats = random_deltas(20_011, 3, 5, True)
    masks = [top_mask(f.abs(), 6000) for f in flats]
    assert 4096 < kernels.chunk_entries(3) and kernels.chunk_entries(3) * 3 * 4 <= kernels.CHUNK_BYTES < 1 << 20
    results = []
    for chunk in (1 << 18, 4096, 1000, 7):  # one chunk, then more and more
        monkeypatch.setattr(kernels, "CHUNK", chunk)
        results.append(kernels.elect_and_merge(flats, [0.7, -0.2, 1.3], params, masks))
    assert all(torch.equal(bits(r), bits(results[0])) for r in results[1:])


class ListContext(PrepareContext):
    """Groups from a list; counts how many times each tensor is read."""

    def __init__(self, groups):
        self.plan = None
        self._groups = groups
        self.reads = 0

    def groups(self):
        for g in self._groups:
            self.reads += 1
            yield g


def reference_trim(per_source: list[list[torch.Tensor]], names: list[str], k: float):
    """Per source: the boolean keep mask of every tensor from one stable sort of the whole task vector."""
    out = []
    for tensors in per_source:
        flat = torch.cat([t.reshape(-1) for t in tensors]).abs()
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[torch.argsort(flat, descending=True, stable=True)[:keep_count(k / 100.0, flat.numel())]] = True
        masks, start = {}, 0
        for name, t in zip(names, tensors):
            masks[name] = keep[start:start + t.numel()]
            start += t.numel()
        out.append(masks)
    return out


@pytest.mark.parametrize("window, keep_bytes, moving, max_reads", [
    (6, 1 << 30, False, 1),  # the threshold's bucket is where pass 1 expected it: one read
    (6, 1 << 30, True, 2),  # it moved: the tensors whose window missed it are read again
    (0, 0, False, 2),  # nothing kept: a second full read
])
def test_model_scope_trim_reads_once_and_equals_one_sort(monkeypatch, window, keep_bytes, moving, max_reads):
    monkeypatch.setattr(global_trim_module, "WINDOW", window)
    monkeypatch.setattr(global_trim_module, "KEEP_BYTES", keep_bytes)
    g = torch.Generator().manual_seed(3)
    names = [f"t{i}" for i in range(6)]
    scales = [4.0, 0.5, 1.0, 2.0, 0.25, 1.0] if moving else [1.0] * 6
    per_source = [[(torch.randn(40, 30, generator=g) * s * 8).round() / 8 for s in scales] for _ in range(3)]
    if not moving:  # continuous values (no bucket wider than the window by quantization)
        per_source = [[torch.randn(40, 30, generator=g) for _ in scales] for _ in range(3)]
        per_source[0][2][0, :5] = per_source[0][1][0, 0]  # still some exact ties
    groups = [TensorGroup(n, None, None, [per_source[i][j] for i in range(3)], [1.0] * 3, ["a", "b", "c"], 0)
              for j, n in enumerate(names)]
    context = ListContext(groups)
    trim = global_trim_module.global_trim(context, 30.0)
    assert len(names) <= context.reads <= len(names) * max_reads
    if max_reads == 1 or keep_bytes == 0:
        assert context.reads == len(names) * max_reads
    want = reference_trim(per_source, names, 30.0)
    for i in range(3):
        for j, name in enumerate(names):
            got = trim.mask(i, name, per_source[i][j].reshape(-1).abs())
            assert torch.equal(got, want[i][name]), (i, name)


def test_elect_and_merge_does_not_depend_on_the_thread_count(monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK", 4096)
    flats = random_deltas(50_001, 4, 5, quantized=True)
    masks = [top_mask(f.abs(), 20_000) for f in flats]
    params = {"sign_method": "mass", "sign_tie": "majority", "aggregate": "weighted_mean"}
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 3):  # 1: the chunks in turn; 3: on three worker threads
            torch.set_num_threads(n)
            results.append(kernels.elect_and_merge(flats, [0.2, 0.9, 0.4, 1.1], params, masks))
            assert torch.get_num_threads() == n  # restored after the workers
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(bits(results[0]), bits(results[1]))


def reference_dare(x, p, rescale, generator):
    """kernels.dare before its temporaries were shared: a bool mask, a product, two abs copies."""
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


@pytest.mark.parametrize("rescale", ["l1", "inverse", "none"])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
def test_dare_is_bit_identical_to_separate_temporaries(rescale, p):
    for seed, shape in enumerate([(257, 129), (3_000_001,), (0, 4)]):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        if x.numel():
            x[0] = -0.0  # the sign of a dropped negative zero survives both ways
        got = kernels.dare(x, p, rescale, torch.Generator().manual_seed(seed + 10))
        want = reference_dare(x, p, rescale, torch.Generator().manual_seed(seed + 10))
        assert torch.equal(bits(got), bits(want)), (shape, p, rescale)
