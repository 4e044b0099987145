"""TIES, DARE and Breadcrumbs against small numpy references, edge cases, and PEFT's merge_utils."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mk_ties.kernels import dare
from mk_ties.methods import METHODS, BreadcrumbsTies, DareLinear, DareTies, Ties
from mk_ties.select import keep_count, top_mask
from mk_ties.transforms import MagnitudePrune, Trim

from mergekit_core import ParameterError, TensorGroup
from mergekit_core.testing import check_merge_method

# --------------------------------------------------------------------------- numpy references


def np_top_mask(a: np.ndarray, m: int) -> np.ndarray:
    """The m largest magnitudes, ties broken by lower index: a full stable sort, the slow way."""
    order = np.lexsort((np.arange(a.size), -a))
    mask = np.zeros(a.size, dtype=bool)
    mask[order[:m]] = True
    return mask


def np_elect_merge(stack, coefficients, sign_method="mass", sign_tie="majority", aggregate="mean"):
    signs = np.sign(stack)
    total = stack.sum(0) if sign_method == "mass" else signs.sum(0)
    elected = np.sign(total)
    if sign_tie == "majority":
        elected[elected == 0] = np.sign(elected.sum())
    elif sign_tie == "positive":
        elected[elected == 0] = 1
    agree = (signs == elected) & (stack != 0)
    summed = (stack * np.asarray(coefficients)[:, None] * agree).sum(0)
    return summed if aggregate == "sum" else summed / np.maximum(agree.sum(0), 1)


def np_ties(deltas, coefficients, k, **kw):
    flat = [d.reshape(-1).astype(np.float64) for d in deltas]
    trimmed = [f * np_top_mask(np.abs(f), int(k / 100 * f.size)) for f in flat]
    return np_elect_merge(np.stack(trimmed), coefficients, **kw).reshape(deltas[0].shape)


def group_of(deltas, coefficients=None, name="w", seed=0):
    tensors = [torch.as_tensor(d, dtype=torch.float32) for d in deltas]
    return TensorGroup(name, 0, None, tensors, list(coefficients or [1.0] * len(tensors)),
                       [f"s{i}" for i in range(len(tensors))], seed)


def params(method, **given):
    return method.resolve_params(given)


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_contract(method):
    check_merge_method(method, {"trim_scope": "tensor"} if method.name == "ties" else None)


# --------------------------------------------------------------------------- ties


@pytest.mark.parametrize("sign_method", ["mass", "count"])
@pytest.mark.parametrize("sign_tie", ["majority", "positive", "zero"])
@pytest.mark.parametrize("aggregate", ["mean", "sum"])
def test_ties_tensor_scope_matches_numpy(sign_method, sign_tie, aggregate):
    deltas = [rand(9, 13, seed=s) for s in range(3)]
    coefficients = [0.8, 1.2, -0.5]
    m = Ties()
    p = params(m, k=30, trim_scope="tensor", sign_method=sign_method, sign_tie=sign_tie, aggregate=aggregate)
    out = m.merge(group_of(deltas, coefficients), p).numpy()
    ref = np_ties(deltas, coefficients, 30, sign_method=sign_method, sign_tie=sign_tie, aggregate=aggregate)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_ties_edge_cases():
    m = Ties()
    p = params(m, trim_scope="tensor")
    zeros = [np.zeros((4, 5), np.float32)] * 3
    assert torch.count_nonzero(m.merge(group_of(zeros), p)) == 0
    one = [rand(4, 5)]
    np.testing.assert_allclose(m.merge(group_of(one), p).numpy(), np_ties(one, [1.0], 20), atol=1e-7)
    # k = 100 keeps everything; k = 0 keeps nothing
    two = [rand(6, 7, seed=1), rand(6, 7, seed=2)]
    full = m.merge(group_of(two), params(m, k=100, trim_scope="tensor")).numpy()
    np.testing.assert_allclose(full, np_ties(two, [1, 1], 100), atol=1e-7)
    assert torch.count_nonzero(m.merge(group_of(two), params(m, k=0, trim_scope="tensor"))) == 0
    # an entry whose sum is exactly 0: +a and -a
    a = np.array([[1.0, 2.0, 3.0]], np.float32)
    canceled = [a, -a]
    zero_tie = m.merge(group_of(canceled), params(m, k=100, trim_scope="tensor", sign_tie="zero"))
    assert torch.count_nonzero(zero_tie) == 0
    positive = m.merge(group_of(canceled), params(m, k=100, trim_scope="tensor", sign_tie="positive"))
    np.testing.assert_allclose(positive.numpy(), a)


def test_float64_magnitudes_that_float32_cannot_tell_apart_are_ranked_exactly():
    """compute_dtype float64: distinct float64 values in one float32 bucket (or rounding to one
    float32 value) must still be ranked by their float64 value."""
    from mk_ties.select import kth_largest, top_magnitude_mask

    g = torch.Generator().manual_seed(3)
    a = 1.0 + torch.randperm(2000, generator=g).double() * 1e-13  # all round to 1.0 in float32
    a[::7] = torch.rand(a[::7].shape, generator=g, dtype=torch.float64)
    for m in (1, 5, 600, 1999):
        np.testing.assert_array_equal(top_mask(a, m).numpy(), np_top_mask(a.numpy(), m), err_msg=f"m={m}")
        signed = torch.where(torch.arange(a.numel()) % 2 == 0, a, -a)
        np.testing.assert_array_equal(top_magnitude_mask(signed, m).numpy(), np_top_mask(a.numpy(), m))
        assert kth_largest(a, m) == float(np.sort(a.numpy())[::-1][m - 1])


def test_exactly_k_percent_is_kept_when_magnitudes_tie():
    a = torch.tensor([1.0, 2.0, 2.0, 2.0, 2.0, 0.5, 2.0, 3.0, 0.0, 0.0])
    mask = top_mask(a.abs(), keep_count(0.3, a.numel()))
    assert int(mask.sum()) == 3
    assert mask.tolist() == [False, True, True, False, False, False, False, True, False, False]
    np.testing.assert_array_equal(mask.numpy(), np_top_mask(a.numpy(), 3))
    many_zeros = torch.zeros(50)
    many_zeros[:3] = 1.0
    assert int(top_mask(many_zeros, 10).sum()) == 10  # a >= threshold mask would keep all 50


def test_small_tensors_and_half_precision():
    m = Ties()
    p = params(m, trim_scope="tensor", k=50)
    tiny = [rand(3, seed=4), rand(3, seed=5)]
    np.testing.assert_allclose(m.merge(group_of(tiny), p).numpy(), np_ties(tiny, [1, 1], 50), atol=1e-7)
    for dtype in (torch.bfloat16, torch.float16):
        deltas = [torch.as_tensor(rand(8, 8, seed=s)).to(dtype) for s in range(2)]
        group = TensorGroup("w", 0, None, [d.float() for d in deltas], [1.0, 1.0], ["a", "b"])
        ref = np_ties([d.float().numpy() for d in deltas], [1, 1], 50)
        np.testing.assert_allclose(m.merge(group, p).numpy(), ref, atol=1e-6)


def test_ties_matches_peft_where_definitions_agree():
    merge_utils = pytest.importorskip("peft.utils.merge_utils", reason="needs the plugin's test extra")
    # PEFT trims per tensor with topk (k = int(density * n)), elects with 'total' (sum >= 0 -> +1),
    # weighs after the election and takes the disjoint mean: our trim_scope tensor, sign_tie positive.
    deltas = [torch.as_tensor(rand(16, 12, seed=s)) for s in range(3)]
    weights = torch.tensor([0.7, 1.0, 1.3])
    ref = merge_utils.ties(torch.stack(deltas), weights, density=0.25, majority_sign_method="total")
    m = Ties()
    out = m.merge(group_of([d.numpy() for d in deltas], weights.tolist()),
                  params(m, k=25, trim_scope="tensor", sign_tie="positive"))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # 'frequency' is our sign_method count
    ref = merge_utils.ties(torch.stack(deltas), weights, density=0.25, majority_sign_method="frequency")
    out = m.merge(group_of([d.numpy() for d in deltas], weights.tolist()),
                  params(m, k=25, trim_scope="tensor", sign_tie="positive", sign_method="count"))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- dare


def test_dare_is_seeded_and_rescales():
    x = torch.as_tensor(rand(200, 50))
    a = dare(x, 0.9, "inverse", torch.Generator().manual_seed(3))
    b = dare(x, 0.9, "inverse", torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    kept = a != 0
    assert 0.07 < float(kept.float().mean()) < 0.13
    torch.testing.assert_close(a[kept], x[kept] / 0.1)
    l1 = dare(x, 0.9, "l1", torch.Generator().manual_seed(3))
    assert float(l1.abs().sum()) == pytest.approx(float(x.abs().sum()), rel=1e-5)
    assert torch.equal(l1 != 0, kept)  # same mask for the same seed


def test_dare_p_one_is_an_error():
    for m in (DareLinear(), DareTies()):
        with pytest.raises(ParameterError, match="drops every entry"):
            m.resolve_params({"p": 1.0})


def test_dare_linear_and_ties_match_numpy_with_the_same_masks():
    deltas = [rand(10, 10, seed=s) for s in range(3)]
    coefficients = [0.5, 1.0, 0.25]
    group = group_of(deltas, coefficients, seed=11)
    masks = [(torch.rand((10, 10), generator=torch.Generator().manual_seed(11 + i)) >= 0.6).numpy()
             for i in range(3)]
    dropped = [d * m / 0.4 for d, m in zip(deltas, masks)]
    lin = DareLinear()
    np.testing.assert_allclose(lin.merge(group, params(lin, p=0.6)).numpy(),
                               sum(c * d for c, d in zip(coefficients, dropped)), rtol=1e-5, atol=1e-6)
    dt = DareTies()
    ref = np_elect_merge(np.stack([d.reshape(-1) for d in dropped]), coefficients).reshape(10, 10)
    np.testing.assert_allclose(dt.merge(group, params(dt, p=0.6)).numpy(), ref, rtol=1e-5, atol=1e-6)


def test_dare_ties_aggregation_matches_peft_on_the_same_dropped_tensors():
    merge_utils = pytest.importorskip("peft.utils.merge_utils", reason="needs the plugin's test extra")
    deltas = [rand(12, 7, seed=s) for s in range(3)]
    weights = [0.6, 1.0, 1.4]
    group = group_of(deltas, weights, seed=5)
    dropped = DareTies().dropped(group, params(DareTies(), p=0.5))
    stack = torch.stack(dropped)
    # PEFT's dare_ties draws its own masks from the global RNG; its election and disjoint mean,
    # applied to our dropped tensors, must give our result (sign_tie positive = PEFT's >= 0).
    w = torch.tensor(weights).view(-1, 1, 1)
    ref = merge_utils.disjoint_merge(stack * w, merge_utils.calculate_majority_sign_mask(stack, "total"))
    dt = DareTies()
    torch.testing.assert_close(dt.merge(group, params(dt, p=0.5, sign_tie="positive")), ref)


# --------------------------------------------------------------------------- breadcrumbs and transforms


def np_band(a, beta, gamma):
    n = a.size
    order = np.lexsort((np.arange(n), a))  # ascending magnitude, ties by index
    keep = np.zeros(n, bool)
    n_top, n_bot = int(beta * n), int(gamma * n)
    keep[order[n_bot:n - n_top]] = True
    return keep


def test_breadcrumbs_band_and_the_empty_slice_bug():
    from mk_ties.methods import Breadcrumbs

    deltas = [rand(20, 5, seed=s) for s in range(2)]
    m = Breadcrumbs()
    out = m.merge(group_of(deltas, [1.0, 0.5]), params(m, beta=0.05, gamma=0.5)).numpy().reshape(-1)
    ref = sum(c * d.reshape(-1) * np_band(np.abs(d.reshape(-1)), 0.05, 0.5) for c, d in zip([1.0, 0.5], deltas))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
    # beta = 0 (or a tensor under 100 entries at beta 0.01): mergekit's [n_bot:-0] slice zeroed the tensor
    small = [rand(50, seed=9)]
    kept = m.merge(group_of(small), params(m, beta=0.01, gamma=0.5))
    assert int(torch.count_nonzero(kept)) == 25
    with pytest.raises(ParameterError, match="beta \\+ gamma"):
        m.resolve_params({"beta": 0.5, "gamma": 0.5})
    bt = BreadcrumbsTies()
    masked = [d.reshape(-1) * np_band(np.abs(d.reshape(-1)), 0.05, 0.5) for d in deltas]
    np.testing.assert_allclose(bt.merge(group_of(deltas), params(bt, beta=0.05, gamma=0.5)).numpy().reshape(-1),
                               np_elect_merge(np.stack(masked), [1, 1]), rtol=1e-6, atol=1e-7)


def test_transforms():
    x = torch.as_tensor(rand(10, 10))
    trimmed = Trim().apply("w", x, {"k": 10.0}, torch.Generator())
    assert int(torch.count_nonzero(trimmed)) == 10
    np.testing.assert_array_equal((trimmed != 0).numpy().reshape(-1), np_top_mask(np.abs(x.numpy().reshape(-1)), 10))
    pruned = MagnitudePrune().apply("w", x, {"threshold": 0.5, "relative": False}, torch.Generator())
    assert torch.equal(pruned != 0, x.abs() > 0.5)


@pytest.mark.parametrize("sign_tie", ["majority", "positive", "zero"])
def test_chunked_election_equals_the_whole_tensor_reference(monkeypatch, sign_tie):
    from mk_ties import kernels

    monkeypatch.setattr(kernels, "CHUNK", 7)  # many chunks, and a ragged last one
    rng = np.random.default_rng(5)
    deltas = [np.round(rng.standard_normal((9, 11)) * 2).astype(np.float32) for _ in range(4)]  # zero sums happen
    coefficients = [1.0, 0.5, -0.25, 2.0]
    m = Ties()
    p = params(m, k=60, trim_scope="tensor", sign_tie=sign_tie)
    out = m.merge(group_of(deltas, coefficients), p).numpy()
    np.testing.assert_allclose(out, np_ties(deltas, coefficients, 60, sign_tie=sign_tie), rtol=1e-6, atol=1e-6)


def test_bucket_threshold_is_exact():
    from mk_ties.select import kth_largest

    a = torch.rand(100_000) * 3
    a[::7] = 1.5  # many ties
    for m in (1, 17, 50_000, 99_999, 100_000):
        assert kth_largest(a, m) == float(torch.sort(a, descending=True).values[m - 1])
