"""DELLA, DELLA-linear, SCE, RAM and TIES' disjoint max against float64 references written here from
the papers' equations (DELLA: Deep et al. 2024 section 3; SCE: Wan et al. 2024; TIES' dis-max:
the TIES code's and FusionBench's ``disjoint_merge``), their edge cases, and mergekit 0.1.5's own
kernels where it is installed: DELLA's masks bit for bit from the same seeds, SCE within float32
rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mk_ties.della_sce import METHODS, Della, DellaLinear, Ram, RamPlus, Sce
from mk_ties.magprune import keep_probabilities, magprune
from mk_ties.methods import BreadcrumbsTies, DareTies, Layout, Ties

from mergekit_core import ParameterError, TensorGroup
from mergekit_core.testing import check_merge_method


def group(deltas, weights=None, name="model.layers.1.mlp.up_proj.weight", seed=0):
    weights = [1.0] * len(deltas) if weights is None else weights
    return TensorGroup(name, 1, None, [d.clone() for d in deltas], list(weights),
                       [f"s{i}" for i in range(len(deltas))], seed)


def deltas(n=3, shape=(9, 11), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_contract(method):
    check_merge_method(method)


@pytest.mark.parametrize("method", [Ties(), DareTies(), BreadcrumbsTies(), Della()], ids=lambda m: m.name)
def test_contract_with_disjoint_max(method):
    check_merge_method(method, {"aggregate": "max", **({"trim_scope": "tensor"} if method.name == "ties" else {})})


# ---------------------------------------------------------------- DELLA


def probs_ref(x, density, eps):
    """DELLA's keep probabilities, per row, from the magnitude rank r = 1..n (ascending):
    p_keep = (density - eps) + 2 eps (r - 1) / (n - 1) (numpy float64)."""
    rows = np.atleast_2d(np.asarray(x, dtype=np.float64))
    out = np.empty_like(rows)
    n = rows.shape[1]
    for i, row in enumerate(rows):
        ranks = np.empty(n)
        ranks[np.argsort(np.abs(row), kind="stable")] = np.arange(1, n + 1)
        out[i] = (density - eps) + 2 * eps * ((ranks - 1) / (n - 1) if n > 1 else 0.5)
    return out.reshape(np.asarray(x).shape)


@pytest.mark.parametrize("shape", [(6, 9), (15,), (4, 1)])
def test_keep_probabilities_are_the_rank_formula(shape):
    x = deltas(1, shape, dtype=torch.float64)[0]
    np.testing.assert_allclose(keep_probabilities(x, 0.4, 0.1).reshape(shape).numpy(), probs_ref(x.numpy(), 0.4, 0.1),
                               rtol=1e-12)
    p = keep_probabilities(x, 0.4, 0.1)
    assert float(p.min()) == pytest.approx(0.3 if shape[-1] > 1 else 0.4) and float(p.max()) <= 0.5 + 1e-12


def test_magprune_keeps_large_entries_more_often_and_inverse_rescale_is_unbiased():
    x = torch.linspace(-1, 1, 41, dtype=torch.float64)
    draws = torch.stack([magprune(x, 0.5, 0.3, "inverse", torch.Generator().manual_seed(s)) for s in range(3000)])
    kept = (draws != 0).double().mean(0)
    expected = torch.from_numpy(probs_ref(x.numpy(), 0.5, 0.3))
    assert float((kept - expected).abs().max()) < 0.04  # 3000 Bernoulli draws: sd <= 0.009
    assert float(kept[0]) > 0.7 and float(kept[20]) < 0.3  # |x| largest at the ends, 0 in the middle
    torch.testing.assert_close(draws.mean(0), x, atol=0.08, rtol=0)  # E[m x / p] = x


def test_magprune_edge_cases():
    x = deltas(1, (5, 7))[0]
    g = torch.Generator().manual_seed(0)
    assert torch.equal(magprune(x, 1.0, 0.15, "l1", g), x)
    assert torch.equal(magprune(x, 0.0, 0.15, "l1", g), torch.zeros_like(x))
    assert torch.equal(magprune(torch.zeros(3, 4), 0.5, 0.15, "inverse", g), torch.zeros(3, 4))  # all-zero delta
    with pytest.raises(ParameterError, match=r"^della: density 0.1 \+/- epsilon 0.15 must lie inside \(0, 1\)"):
        magprune(x, 0.1, 0.15, "l1", g)
    with pytest.raises(ParameterError, match="lower epsilon"):
        Della().resolve_params({"p": 0.9})
    with pytest.raises(ParameterError, match="'della': density 0.95 "):
        Della().resolve_params({"density": 0.95})
    per_source = Della().resolve_params({"density": [{"values": [0.5, 0.95]}]})
    with pytest.raises(ParameterError, match=r"della': tensor model.layers.1.mlp.up_proj.weight, source 1: density"):
        Della().merge(group(deltas(2, (4, 4))), per_source, Layout([1], ["s0", "s1"]))
    one = magprune(torch.tensor([[2.0], [3.0]]), 0.5, 0.2, "none", torch.Generator().manual_seed(1))
    assert torch.isfinite(one).all()  # rows of one entry: probability density (mergekit: 0/0)


def elect_mean_ref(pruned, weights):
    """TIES' election (sign of the sum; 0 -> the sign of the summed elected signs) and disjoint
    mean of c_t * tau_t over the agreeing non-zero entries (numpy float64)."""
    s = np.stack([np.asarray(p, dtype=np.float64).reshape(-1) for p in pruned])
    gamma = np.sign(s.sum(0))
    gamma[gamma == 0] = np.sign(gamma.sum())
    agree = (np.sign(s) == gamma) & (s != 0)
    c = np.asarray(weights).reshape(-1, 1)
    return (c * s * agree).sum(0) / np.maximum(agree.sum(0), 1)


@pytest.mark.parametrize("n, shape", [(2, (8, 10)), (4, (8, 10)), (3, (25,))])
def test_della_is_magprune_then_election(n, shape):
    ds = deltas(n, shape, seed=n, dtype=torch.float64)
    weights = [0.5 + 0.25 * i for i in range(n)]
    p, eps = 0.6, 0.2
    out = Della().merge(group(ds, weights, seed=7), Della().resolve_params({"p": p, "epsilon": eps}))
    pruned = []
    for i, d in enumerate(ds):
        probs = torch.from_numpy(probs_ref(d.numpy(), 1 - p, eps)).reshape(d.shape if d.dim() > 1 else (1, -1))
        mask = torch.bernoulli(probs, generator=torch.Generator().manual_seed(7 + i)).reshape(d.shape)
        pruned.append(d.numpy() * mask.numpy() / probs.reshape(d.shape).numpy())
    np.testing.assert_allclose(out.reshape(-1).numpy(), elect_mean_ref(pruned, weights), rtol=1e-12, atol=1e-14)
    linear = DellaLinear().merge(group(ds, weights, seed=7), DellaLinear().resolve_params({"p": p, "epsilon": eps}))
    np.testing.assert_allclose(linear.numpy(), sum(w * q for w, q in zip(weights, pruned)), rtol=1e-12, atol=1e-14)


def test_della_all_zero_deltas_and_density_rules():
    zeros = [torch.zeros(4, 5)] * 3
    assert torch.equal(Della().merge(group(zeros), Della().resolve_params({})), torch.zeros(4, 5))
    ds = deltas(2, (6, 6))
    m = Della()
    p = m.resolve_params({"density": [{"values": [1.0, 0.0]}]})
    out = m.merge(group(ds), p, Layout([1], ["s0", "s1"]))
    torch.testing.assert_close(out, ds[0])  # source 0 kept whole, source 1 dropped


@pytest.fixture(scope="module")
def mk_sparsify():
    return pytest.importorskip("mergekit.sparsify", reason="mergekit is in the plugin's test extra")


@pytest.mark.parametrize("shape", [(12, 20), (30,)])
@pytest.mark.parametrize("rescale", ["l1", "none"])
def test_magprune_masks_equal_mergekits_from_the_same_seed(mk_sparsify, shape, rescale):
    x = deltas(1, shape, seed=3)[0]
    torch.manual_seed(11)
    ref = mk_sparsify.della_magprune(x, 0.4, 0.15, mk_sparsify.RescaleNorm.l1 if rescale == "l1" else None)
    ours = magprune(x, 0.4, 0.15, rescale, torch.Generator().manual_seed(11))
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_merge_equals_mergekits(mk_sparsify, monkeypatch, name):
    """mergekit draws from torch's global generator, source after source; the test hands its
    ``torch.bernoulli`` the generators mk uses (seed + source index), so both draw the same masks."""
    from mergekit.merge_methods import base as mb
    from mergekit.merge_methods import registry

    base = torch.randn(10, 14, generator=torch.Generator().manual_seed(1))
    ds = deltas(3, (10, 14), seed=4)
    weights, density, eps = [0.7, 0.3, 0.5], 0.45, 0.12
    gens = iter([torch.Generator().manual_seed(5 + i) for i in range(3)])
    real = torch.bernoulli
    monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **k: real(p, generator=next(gens)))
    grp = mb.TensorGroup.from_tensors([base] + [base + d for d in ds], ids=["b", "m0", "m1", "m2"], base_index=0)
    per = lambda v: mb.PerInputValues([(f"m{i}", x) for i, x in enumerate(v)])  # noqa: E731
    ref = registry.get(name).merge_group(grp, int8_mask=False, normalize=name == "della", rescale=True,
                                         **{"lambda": 1.3}, weight=per(weights), density=per([density] * 3),
                                         epsilon=per([eps] * 3))
    monkeypatch.setattr(torch, "bernoulli", real)
    m = Della() if name == "della" else DellaLinear()
    given = {"density": density, "epsilon": eps, "rescale": "l1", "scale": 1.3}
    if name == "della":
        given.update(sign_method="mass", sign_tie="positive", weighted_election=True, aggregate="weighted_mean")
    ours = base + m.merge(group([(base + d) - base for d in ds], weights, seed=5), m.resolve_params(given),
                          Layout([1], ["s0", "s1", "s2"]))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- SCE


def sce_ref(ds, topk):
    """SCE (Wan et al. 2024): select the top-k fraction of entries by variance across tasks, weight
    each task by its mean squared (selected) delta over their sum, erase entries whose sign is not
    the sign of the sum (0 -> +), weighted mean of the rest (numpy float64)."""
    s = np.stack([np.asarray(d, dtype=np.float64).reshape(-1) for d in ds])
    if topk < 1:
        var = s.var(0)
        k = int(np.count_nonzero(var) * topk)
        keep = np.zeros(s.shape[1], bool)
        keep[np.argsort(-var, kind="stable")[:k]] = True
        s = s * keep
    gamma = np.where(s.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(s) == gamma
    energy = (s ** 2).mean(1)
    w = energy / energy.sum() if energy.sum() >= 1e-6 else np.full(len(s), 1 / len(s))
    ew = w[:, None] * agree
    return (s * ew).sum(0) / np.maximum(ew.sum(0), 1e-6)


@pytest.mark.parametrize("n, shape", [(2, (7, 9)), (5, (7, 9)), (3, (40,))])
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1])
def test_sce_is_select_calculate_erase(n, shape, topk):
    ds = deltas(n, shape, seed=n, dtype=torch.float64)
    out = Sce().merge(group(ds), Sce().resolve_params({"select_topk": topk}))
    np.testing.assert_allclose(out.reshape(-1).numpy(), sce_ref(ds, topk), rtol=1e-12, atol=1e-14)
    doubled = Sce().merge(group(ds, [2.0] * n), Sce().resolve_params({"select_topk": topk}))
    torch.testing.assert_close(doubled, 2 * out)  # lambda scales the merged task vector


def test_sce_edge_cases():
    zeros = [torch.zeros(3, 4)] * 3
    assert torch.equal(Sce().merge(group(zeros), Sce().resolve_params({"select_topk": 0.3})), torch.zeros(3, 4))
    x = deltas(1, (3, 4))[0]
    torch.testing.assert_close(Sce().merge(group([x, x]), Sce().resolve_params({})), x)  # identical sources
    assert torch.equal(Sce().merge(group([x, -x]), Sce().resolve_params({"select_topk": 0.0})), torch.zeros(3, 4))


@pytest.mark.parametrize("topk", [1.0, 0.3])
def test_sce_equals_mergekit(topk):
    sce = pytest.importorskip("mergekit.merge_methods.sce", reason="mergekit is in the plugin's test extra")
    from mergekit.merge_methods import base as mb

    base = torch.randn(16, 12, generator=torch.Generator().manual_seed(2))
    ds = [0.02 * d for d in deltas(4, (16, 12), seed=6)]
    grp = mb.TensorGroup.from_tensors([base] + [base + d for d in ds], ids=["b", "a", "c", "d", "e"], base_index=0)
    ref = sce.sce_merge.merge_group(grp, int8_mask=False, select_topk=topk)
    ours = base + Sce().merge(group([(base + d) - base for d in ds]), Sce().resolve_params({"select_topk": topk}))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- TIES' disjoint max


def dis_max_ref(trimmed, lam):
    """The TIES code's ``disjoint_merge(..., 'dis-max')``: elected sign (sum; 0 -> majority), the
    largest agreeing magnitude with that sign, times lambda (numpy float64)."""
    s = np.stack([np.asarray(t, dtype=np.float64).reshape(-1) for t in trimmed])
    gamma = np.sign(s.sum(0))
    gamma[gamma == 0] = np.sign(gamma.sum())
    keep = np.where(gamma > 0, s > 0, s < 0)
    return lam * np.abs(s * keep).max(0) * gamma


@pytest.mark.parametrize("n, k", [(2, 100.0), (4, 30.0)])
def test_ties_disjoint_max_is_the_reference(n, k):
    ds = deltas(n, (12, 10), seed=n)  # float32, the compute dtype (the trim's threshold is found in float32)
    m = Ties()
    out = m.merge(group(ds, [0.8] * n), m.resolve_params({"trim_scope": "tensor", "k": k, "aggregate": "max"}))
    trimmed = []
    for d in ds:
        flat = d.reshape(-1)
        keep = torch.zeros_like(flat)
        keep[torch.argsort(flat.abs(), descending=True, stable=True)[:int(k / 100 * flat.numel())]] = 1
        trimmed.append((flat * keep).numpy())
    np.testing.assert_allclose(out.reshape(-1).numpy(), dis_max_ref(trimmed, 0.8), rtol=1e-6)
    x = ds[0]
    torch.testing.assert_close(m.merge(group([x, x]), m.resolve_params({"trim_scope": "tensor", "k": 100,
                                                                        "aggregate": "max"})), x)
    zero = m.merge(group([torch.zeros(5), torch.zeros(5)]), m.resolve_params({"trim_scope": "tensor", "k": 100,
                                                                              "aggregate": "max"}))
    assert torch.equal(zero, torch.zeros(5))


# ---------------------------------------------------------------- RAM


def ram_ref(ds, eps, weights, plus=None):
    """RAM: per coordinate, the mean of the task vectors with |tau| > eps (a lone one whole), each
    times its weight; RAM+: task t's lone entries times 1 + r clamp(shared_t / unique_t, 0, alpha)
    (numpy float64)."""
    s = np.stack([np.asarray(d, dtype=np.float64).reshape(-1) for d in ds])
    touched = np.abs(s) > eps
    count = touched.sum(0)
    out = np.zeros(s.shape[1])
    for t in range(len(s)):
        factor = 1.0
        if plus is not None:
            shared, lone = np.sum(touched[t] & (count > 1)), np.sum(touched[t] & (count == 1))
            factor = 1 + plus[0] * np.clip(shared / max(lone, eps), 0, plus[1])
        lone_part = np.where(touched[t] & (count == 1), s[t] * factor, 0.0)
        shared_part = np.where(touched[t] & (count > 1), s[t] / np.maximum(count, 1), 0.0)
        out += weights[t] * (lone_part + shared_part)
    return out


@pytest.mark.parametrize("n, shape", [(2, (8, 9)), (5, (8, 9)), (3, (30,))])
@pytest.mark.parametrize("plus", [None, (0.5, 0.8)])
def test_ram_is_the_mean_of_the_touching_tasks(n, shape, plus):
    ds = [d * (torch.rand(d.shape, generator=torch.Generator().manual_seed(i)) > 0.5)
          for i, d in enumerate(deltas(n, shape, seed=n, dtype=torch.float64))]  # sparse: lone and shared entries
    weights = [1.0 + 0.5 * i for i in range(n)]
    m = Ram() if plus is None else RamPlus()
    given = {"epsilon": 0.1} if plus is None else {"epsilon": 0.1, "r": plus[0], "alpha": plus[1]}
    out = m.merge(group(ds, weights), m.resolve_params(given))
    np.testing.assert_allclose(out.reshape(-1).numpy(), ram_ref(ds, 0.1, weights, plus), rtol=1e-12, atol=1e-14)


def test_ram_edge_cases():
    zeros = [torch.zeros(3, 4)] * 3
    assert torch.equal(Ram().merge(group(zeros), Ram().resolve_params({})), torch.zeros(3, 4))
    x = deltas(1, (3, 4))[0]
    torch.testing.assert_close(Ram().merge(group([x, x]), Ram().resolve_params({"epsilon": 0.0})), x)


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
def test_ram_equals_mergekit(name):
    ram_module = pytest.importorskip("mergekit.merge_methods.ram", reason="mergekit is in the plugin's test extra")
    from mergekit.merge_methods import base as mb

    base = torch.randn(16, 12, generator=torch.Generator().manual_seed(2))
    ds = [0.02 * d for d in deltas(3, (16, 12), seed=8)]
    grp = mb.TensorGroup.from_tensors([base] + [base + d for d in ds], ids=["b", "a", "c", "d"], base_index=0)
    if name == "ram":
        ref = ram_module.ram_merge.merge_group(grp, epsilon=0.02)
        ours = base + Ram().merge(group([(base + d) - base for d in ds]), Ram().resolve_params({"epsilon": 0.02}))
    else:
        ref = ram_module.ramplus_tl_merge.merge_group(grp, r=0.5, alpha=0.8, epsilon=0.02)
        ours = base + RamPlus().merge(group([(base + d) - base for d in ds]),
                                      RamPlus().resolve_params({"epsilon": 0.02, "r": 0.5, "alpha": 0.8}))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
