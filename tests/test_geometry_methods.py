"""Model Stock, multislerp, Karcher, NuSLERP and NearSwap (mergekit_core/builtin/geometry.py)
against float64 references written here from the papers' equations, their edge cases (identical,
opposite and all-zero vectors, 1-D tensors, two and several sources), and mergekit 0.1.5's own
kernels on the same tensors where it is installed (the `parity` extra): equal within float32
rounding, except where a test names the convention that differs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergekit_core import MergeError, ParameterError, TensorGroup
from mergekit_core.builtin.geometry import (
    Karcher,
    ModelStock,
    MultiSlerp,
    NearSwap,
    NuSlerp,
)
from mergekit_core.testing import check_merge_method


def group(tensors, coefficients=None, base=None, name="model.layers.0.mlp.up_proj.weight"):
    coefficients = [1.0] * len(tensors) if coefficients is None else list(coefficients)
    if base is None:
        base = torch.zeros_like(tensors[0])
    return TensorGroup(name, 0, base, [t.clone() for t in tensors], coefficients,
                       [f"s{i}" for i in range(len(tensors))], 0)


def rand(n, shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]


def merge(method, tensors, params=None, **kw):
    return method.merge(group(tensors, **kw), method.resolve_params(params or {}))


def slerp_ref(t, a, b):
    """Shoemake's SLERP of two vectors (float64 numpy): sin((1-t)w)/sin w a + sin(t w)/sin w b."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    cos = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
    w = math.acos(max(-1.0, min(1.0, cos)))
    return math.sin((1 - t) * w) / math.sin(w) * a + math.sin(t * w) / math.sin(w) * b


@pytest.mark.parametrize("method", [ModelStock(), MultiSlerp(), Karcher(), NuSlerp(), NearSwap()],
                         ids=lambda m: m.name)
def test_contract(method):
    check_merge_method(method, follows_coefficients=True)


def test_lambdas_weight_model_stocks_average_and_scale_nearswap():
    deltas = [x + 0.5 for x in rand(3, (4, 5))]
    plain = merge(ModelStock(), deltas)
    weighted = merge(ModelStock(), deltas, coefficients=[1.0, 2.0, 1.0])
    ratio = plain.reshape(-1) / (sum(deltas) / 3).reshape(-1)  # t, the same for both
    torch.testing.assert_close(weighted, ratio[0] * (deltas[0] + 2 * deltas[1] + deltas[2]) / 4)
    d = rand(1, (6,))[0] * 0.01
    torch.testing.assert_close(NearSwap().merge(group([d], [0.5]), NearSwap().resolve_params({"t": 0.005})),
                               0.5 * merge(NearSwap(), [d], {"t": 0.005}))


# ---------------------------------------------------------------- Model Stock


def model_stock_ref(deltas):
    """Jang et al. 2024, eq. 3: t = N cos / (1 + (N - 1) cos), merged = t * mean(delta), with cos
    the mean pairwise cosine of the fine-tunes' offsets (numpy float64)."""
    d = [np.asarray(x, dtype=np.float64).reshape(-1) for x in deltas]
    n = len(d)
    cos = np.mean([np.dot(d[i], d[j]) / (np.linalg.norm(d[i]) * np.linalg.norm(d[j]))
                   for i in range(n) for j in range(i + 1, n)])
    t = n * cos / (1 + (n - 1) * cos)
    return t * np.mean(d, axis=0)


@pytest.mark.parametrize("n, shape", [(2, (6, 5)), (4, (6, 5)), (3, (11,))])
def test_model_stock_is_the_papers_ratio(n, shape):
    common = rand(1, shape, seed=9)[0]
    deltas = [common + 0.7 * x for x in rand(n, shape)]  # correlated fine-tunes: 0 < cos < 1
    out = merge(ModelStock(), deltas)
    np.testing.assert_allclose(out.reshape(-1).numpy(), model_stock_ref(deltas), rtol=1e-12, atol=1e-14)


def test_model_stock_edge_cases():
    x = rand(1, (5, 4))[0]
    torch.testing.assert_close(merge(ModelStock(), [x, x, x]), x)  # identical: cos 1, t 1
    a, b = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    a[0], b[1] = 1.0, 2.0
    assert torch.equal(merge(ModelStock(), [a, b]), torch.zeros(4, dtype=torch.float64))  # orthogonal: t 0
    zeros = [torch.zeros(3, 4, dtype=torch.float64)] * 3
    assert torch.equal(merge(ModelStock(), zeros), zeros[0])  # all-zero deltas: the base
    assert torch.equal(merge(ModelStock(), [x, -x]), torch.zeros_like(x))  # 1 + cos = 0: the base (mergekit)


def test_model_stock_filter_wise_is_one_ratio_per_row():
    deltas = [x + 0.5 for x in rand(3, (4, 6))]
    out = merge(ModelStock(), deltas, {"filter_wise": True})
    for r in range(4):
        np.testing.assert_allclose(out[r].numpy(), model_stock_ref([d[r] for d in deltas]), rtol=1e-12)


def test_model_stock_needs_a_base():
    with pytest.raises(ParameterError, match="give base_model"):
        ModelStock().merge(TensorGroup("w", 0, None, rand(2, (3,)), [1.0, 1.0]), ModelStock().resolve_params({}))


# ---------------------------------------------------------------- multislerp


def multislerp_ref(xs, w):
    """One tangent step at the normalised weighted mean of the directions (Goddard's multislerp):
    log-map-free projection, weighted tangent, exponential map, times the weighted mean norm."""
    x = [np.asarray(v, dtype=np.float64).reshape(-1) for v in xs]
    w = np.asarray(w, dtype=np.float64) / np.sum(w)
    r = np.array([np.linalg.norm(v) for v in x])
    u = [v / r_ for v, r_ in zip(x, r)]
    m = sum(wi * ui for wi, ui in zip(w, u))
    m /= np.linalg.norm(m)
    v = sum(wi * (ui - np.dot(ui, m) * m) for wi, ui in zip(w, u))
    s = np.linalg.norm(v)
    return (m * math.cos(s) + v * math.sin(s) / s) * np.dot(w, r)


@pytest.mark.parametrize("n, shape", [(2, (6, 5)), (5, (6, 5)), (3, (13,))])
def test_multislerp_is_the_tangent_step(n, shape):
    xs = rand(n, shape, seed=n)
    w = [0.5 + i for i in range(n)]
    out = merge(MultiSlerp(), xs, coefficients=w)
    np.testing.assert_allclose(out.reshape(-1).numpy(), multislerp_ref(xs, w), rtol=1e-7, atol=1e-9)  # eps 1e-8


def test_multislerp_of_two_equal_norm_vectors_is_the_slerp_midpoint():
    a, b = rand(2, (40,), seed=3)
    b = b * (a.norm() / b.norm())
    out = merge(MultiSlerp(), [a, b])
    np.testing.assert_allclose(out.numpy(), slerp_ref(0.5, a.numpy(), b.numpy()), rtol=1e-7, atol=1e-9)


def test_multislerp_edge_cases():
    x = rand(1, (4, 3))[0]
    torch.testing.assert_close(merge(MultiSlerp(), [x, x, x]), x)  # identical
    torch.testing.assert_close(merge(MultiSlerp(), [x, -x], coefficients=[1.0, 1.0]), torch.zeros_like(x))  # lerp
    torch.testing.assert_close(merge(MultiSlerp(), [x, -2 * x], coefficients=[0.5, 0.5]), -0.5 * x)
    assert torch.equal(merge(MultiSlerp(), [x]), x)  # one source: itself
    zeros = [torch.zeros(5, dtype=torch.float64)] * 3
    assert torch.equal(merge(MultiSlerp(), zeros), zeros[0])  # mergekit raises here
    with pytest.raises(MergeError, match="directions is zero"):
        e = torch.eye(2, dtype=torch.float64)
        merge(MultiSlerp(), [e[0], -e[0], e[0] * 0 + torch.tensor([0.0, 0.0], dtype=torch.float64)])
    with pytest.raises(ParameterError, match="sum to 0"):
        merge(MultiSlerp(), rand(2, (3,)), coefficients=[1.0, -1.0])


# ---------------------------------------------------------------- Karcher


def karcher_ref(xs, a, iters=500):
    """Riemannian gradient descent to the Karcher mean on the sphere (float64, to convergence):
    m <- Exp_m(sum a_i Log_m(u_i)), Log_m(u) = theta / sin(theta) (u - cos(theta) m)."""
    x = [np.asarray(v, dtype=np.float64).reshape(-1) for v in xs]
    a = np.asarray(a) / np.sum(a)
    r = [np.linalg.norm(v) for v in x]
    u = [v / n for v, n in zip(x, r)]
    m = sum(ai * ui for ai, ui in zip(a, u))
    m /= np.linalg.norm(m)
    for _ in range(iters):
        g = np.zeros_like(m)
        for ai, ui in zip(a, u):
            c = np.clip(np.dot(m, ui), -1, 1)
            th = math.acos(c)
            if th > 1e-15:
                g += ai * th / math.sin(th) * (ui - c * m)
        s = np.linalg.norm(g)
        if s < 1e-15:
            break
        m = math.cos(s) * m + math.sin(s) * g / s
        m /= np.linalg.norm(m)
    return np.dot(a, r) * m


@pytest.mark.parametrize("n, shape", [(2, (5, 4)), (4, (5, 4)), (3, (9,))])
def test_karcher_is_the_riemannian_mean(n, shape):
    xs = rand(n, shape, seed=10 + n)
    w = [1.0 + 0.5 * i for i in range(n)]
    out = merge(Karcher(), xs, {"max_iter": 200, "tol": 1e-12}, coefficients=w)
    np.testing.assert_allclose(out.reshape(-1).numpy(), karcher_ref(xs, w), rtol=1e-9, atol=1e-11)


def test_karcher_of_two_is_the_geodesic_midpoint():
    a, b = rand(2, (30,), seed=2)
    out = merge(Karcher(), [a, b], {"max_iter": 100, "tol": 1e-12})
    mid = slerp_ref(0.5, (a / a.norm()).numpy(), (b / b.norm()).numpy())
    np.testing.assert_allclose(out.numpy(), mid * float(a.norm() + b.norm()) / 2, rtol=1e-9)


def test_karcher_edge_cases():
    x = rand(1, (6,))[0]
    torch.testing.assert_close(merge(Karcher(), [x, 3 * x]), 2 * x)  # identical directions
    zeros = [torch.zeros(2, 3, dtype=torch.float64)] * 3
    assert torch.equal(merge(Karcher(), zeros), zeros[0])  # all zero
    out = merge(Karcher(), [x, -x])  # opposite: the mean is undefined; it stays at the first direction
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x)
    one_zero = merge(Karcher(), [x, torch.zeros_like(x)])  # a zero source: no direction, half the norm
    torch.testing.assert_close(one_zero, x / 2)


# ---------------------------------------------------------------- NuSLERP


@pytest.mark.parametrize("shape", [(7, 5), (12,)])
def test_nuslerp_flattened_is_slerp_at_t_from_the_weights(shape):
    a, b = rand(2, shape, seed=4)
    out = merge(NuSlerp(), [a, b], coefficients=[1.0, 3.0])
    np.testing.assert_allclose(out.reshape(-1).numpy(), slerp_ref(0.75, a.reshape(-1).numpy(), b.reshape(-1).numpy()),
                               rtol=1e-12, atol=1e-14)
    half = merge(NuSlerp(), [a, b], coefficients=[1.0, -1.0])  # weights summing to 0: t = 0.5 (mergekit)
    np.testing.assert_allclose(half.reshape(-1).numpy(), slerp_ref(0.5, a.reshape(-1).numpy(), b.reshape(-1).numpy()),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("row_wise", [False, True])
def test_nuslerp_per_row_and_per_column(row_wise):
    a, b = rand(2, (4, 6), seed=5)
    out = merge(NuSlerp(), [a, b], {"flatten": False, "row_wise": row_wise}, coefficients=[2.0, 1.0])
    if row_wise:
        for c in range(6):
            ref = slerp_ref(1 / 3, a[:, c].numpy(), b[:, c].numpy())
            np.testing.assert_allclose(out[:, c].numpy(), ref, rtol=1e-12)
    else:
        for r in range(4):
            np.testing.assert_allclose(out[r].numpy(), slerp_ref(1 / 3, a[r].numpy(), b[r].numpy()), rtol=1e-12)


def test_nuslerp_edge_cases():
    x = rand(1, (3, 4))[0]
    torch.testing.assert_close(merge(NuSlerp(), [x, 2 * x], coefficients=[1.0, 1.0]), 1.5 * x)  # parallel: lerp
    torch.testing.assert_close(merge(NuSlerp(), [x, -x], coefficients=[3.0, 1.0]), 0.5 * x)  # opposite: lerp
    zeros = [torch.zeros(3, dtype=torch.float64)] * 2
    assert torch.equal(merge(NuSlerp(), zeros), zeros[0])


# ---------------------------------------------------------------- NearSwap


def test_nearswap_is_the_clamped_inverse_distance():
    base = rand(1, (5, 6), seed=7)[0]
    delta = rand(1, (5, 6), seed=8)[0] * 0.01
    delta[0, 0] = 0.0
    t = 0.004
    out = NearSwap().merge(group([delta], base=base), NearSwap().resolve_params({"t": t}))
    d = delta.numpy()
    w = np.clip(t / np.maximum(np.abs(d), 1e-6), 0, 1)  # near entries taken whole, far ones t/|d| of the way
    np.testing.assert_allclose(out.numpy(), w * d, rtol=1e-15)
    near = np.abs(d) <= t
    np.testing.assert_allclose(out.numpy()[near], d[near])
    np.testing.assert_allclose(np.abs(out.numpy()[~near]), t)
    assert torch.equal(merge(NearSwap(), [torch.zeros(4, dtype=torch.float64)]), torch.zeros(4, dtype=torch.float64))


# ---------------------------------------------------------------- mergekit's own kernels


@pytest.fixture(scope="module")
def mk_registry():
    return pytest.importorskip("mergekit.merge_methods.registry", reason="mergekit is not installed: "
                               "pip install -e \".[parity]\"")


def theirs(registry, name, base, sources, weights=None, **params):
    from mergekit.merge_methods import base as mb

    ids = [f"m{i}" for i in range(len(sources))]
    tensors = ([base] if base is not None else []) + list(sources)
    grp = mb.TensorGroup.from_tensors(tensors, ids=(["b"] if base is not None else []) + ids,
                                      base_index=0 if base is not None else None)
    if weights is not None:
        params["weight"] = mb.PerInputValues(list(zip(ids, weights)))
    return registry.get(name).merge_group(grp, **params)


def float32_case(n, shape, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    common = 0.02 * torch.randn(shape, generator=g)
    return base, [base + common + 0.02 * torch.randn(shape, generator=g) for _ in range(n)]


CLOSE = {"rtol": 1e-5, "atol": 1e-6}  # float32 rounding of differently ordered sums


@pytest.mark.parametrize("n, shape, filter_wise", [(2, (16, 12), False), (4, (16, 12), False),
                                                   (3, (16, 12), True), (3, (16,), True), (3, (16,), False)])
def test_model_stock_equals_mergekit(mk_registry, n, shape, filter_wise):
    base, sources = float32_case(n, shape, seed=n)
    ref = theirs(mk_registry, "model_stock", base, sources, filter_wise=filter_wise)
    ours = base + ModelStock().merge(group([s - base for s in sources], base=base),
                                     ModelStock().resolve_params({"filter_wise": filter_wise}))
    torch.testing.assert_close(ours, ref, **CLOSE)


@pytest.mark.parametrize("n, with_base", [(2, True), (4, True), (3, False)])
def test_multislerp_equals_mergekit(mk_registry, n, with_base):
    base, sources = float32_case(n, (10, 8), seed=20 + n)
    w = [0.2 + 0.3 * i for i in range(n)]
    ref = theirs(mk_registry, "multislerp", base if with_base else None, sources, w, normalize_weights=True, eps=1e-8)
    if with_base:  # a weights-space method: it takes the task vectors itself
        ours = MultiSlerp().merge(group(sources, w, base=base), MultiSlerp().resolve_params({}))
    else:
        ours = MultiSlerp().merge(TensorGroup("w", 0, None, [s.clone() for s in sources], w),
                                  MultiSlerp().resolve_params({}))
    torch.testing.assert_close(ours, ref, **CLOSE)


@pytest.mark.parametrize("n, shape", [(2, (10, 8)), (4, (10, 8)), (3, (17,))])
def test_karcher_equals_mergekit(mk_registry, n, shape):
    _, sources = float32_case(n, shape, seed=30 + n)
    sources = [s * (1 + i) for i, s in enumerate(sources)]
    ref = theirs(mk_registry, "karcher", None, sources, max_iter=10, tol=1e-5)
    ours = Karcher().merge(TensorGroup("w", 0, None, [s.clone() for s in sources], [1.0] * n),
                           Karcher().resolve_params({}))
    torch.testing.assert_close(ours, ref, **CLOSE)


@pytest.mark.parametrize("flatten, row_wise, with_base", [(True, False, True), (False, False, True),
                                                          (False, True, True), (True, False, False)])
def test_nuslerp_equals_mergekit(mk_registry, flatten, row_wise, with_base):
    base, sources = float32_case(2, (9, 7), seed=40)
    w = [0.3, 0.9]
    ref = theirs(mk_registry, "nuslerp", base if with_base else None, sources, w, nuslerp_flatten=flatten,
                 nuslerp_row_wise=row_wise)
    p = NuSlerp().resolve_params({"flatten": flatten, "row_wise": row_wise})
    if with_base:
        ours = NuSlerp().merge(group(sources, w, base=base), p)
    else:
        ours = NuSlerp().merge(TensorGroup("w", 0, None, [s.clone() for s in sources], w), p)
    torch.testing.assert_close(ours, ref, **CLOSE)


@pytest.mark.parametrize("t", [0.0, 0.01, 0.03, 1.0])
def test_nearswap_equals_mergekit(mk_registry, t):
    base, (source,) = float32_case(1, (12, 10), seed=50)
    ref = theirs(mk_registry, "nearswap", base, [source], t=t)
    ours = base + NearSwap().merge(group([source - base], base=base), NearSwap().resolve_params({"t": t}))
    torch.testing.assert_close(ours, ref, **CLOSE)
