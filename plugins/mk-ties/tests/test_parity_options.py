"""mk-ties' options for mergekit's conventions (weighted election, weighted mean, min_kept, density
per source and tensor, normalize, scale) against readable torch references written from
mergekit's definitions, and against mergekit itself where it is installed; the keep count."""

from __future__ import annotations

import pytest
import torch
from mk_ties.methods import (
    METHODS,
    Breadcrumbs,
    BreadcrumbsTies,
    DareLinear,
    DareTies,
    Layout,
    Ties,
)
from mk_ties.select import keep_count

from mergekit_core import ParameterError, TensorGroup
from mergekit_core.api import gradient_at, value_for
from mergekit_core.testing import check_merge_method

MERGEKIT_OPTIONS = {"sign_method": "mass", "sign_tie": "positive", "weighted_election": True}


def group(deltas, weights, name="model.layers.1.mlp.up_proj.weight", layer=1):
    return TensorGroup(name, layer, None, [d.clone() for d in deltas], list(weights),
                       [f"s{i}" for i in range(len(deltas))], 0)


def deltas(n=3, shape=(9, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def ref_top(x, density, at_least_one=True):
    """mergekit's sparsify.magnitude: the top max(1, int(density * n)) magnitudes."""
    if density >= 1:
        return x
    n = x.numel()
    k = max(1, int(density * n)) if at_least_one else int(density * n)
    mask = torch.zeros(n)
    mask[torch.argsort(x.abs().reshape(-1), descending=True)[:k]] = 1
    return x * mask.reshape(x.shape)


def ref_consensus(trimmed, weights, normalize, lam=1.0):
    """mergekit's generalized task arithmetic with sign consensus 'sum': weights multiplied in,
    majority sign of the weighted sum (0 counts as +), sum of the agreeing weighted deltas,
    divided by the sum of the agreeing weights (1 where none) when normalize, times lambda."""
    stack = torch.stack(trimmed)
    w = torch.tensor(weights).view(-1, *[1] * trimmed[0].dim())
    stack = stack * w
    majority = (stack.sum(0) >= 0).float() * 2 - 1
    mask = stack.sign() == majority
    mixed = (stack * mask).sum(0)
    if normalize:
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
    return mixed * lam if lam != 1 else mixed


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_contract_with_the_mergekit_options(method):
    given = {"density": 0.4, "scale": 1.5}
    if method.name == "ties":
        given.update(trim_scope="tensor", min_kept=1)
    if method.name in ("ties", "dare_ties", "breadcrumbs_ties"):
        given.update(MERGEKIT_OPTIONS, aggregate="weighted_mean")
    else:
        given["normalize"] = True
    check_merge_method(method, given)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_with_unequal_weights_is_mergekits_formula(normalize):
    ds, weights, density = deltas(), [0.7, 0.2, -0.4], 0.3
    m = Ties()
    p = m.resolve_params({"trim_scope": "tensor", "density": density, "min_kept": 1, "scale": 1.3,
                          "aggregate": "weighted_mean" if normalize else "sum", **MERGEKIT_OPTIONS})
    ours = m.merge(group(ds, weights), p)
    ref = ref_consensus([ref_top(d, density) for d in ds], weights, normalize, lam=1.3)
    assert torch.equal(ours, ref)


def test_unweighted_election_differs_where_the_weights_disagree():
    ds, weights = deltas(), [3.0, 0.1, 0.1]
    m = Ties()
    common = {"trim_scope": "tensor", "k": 100, "sign_tie": "positive", "aggregate": "weighted_mean"}
    weighted = m.merge(group(ds, weights), m.resolve_params({**common, "weighted_election": True}))
    plain = m.merge(group(ds, weights), m.resolve_params(common))
    assert not torch.equal(weighted, plain)  # one heavy source outvotes two light ones only when weighted
    stack = torch.stack(ds)
    assert torch.equal(torch.sign(plain).ne(0) & (torch.sign(stack.sum(0)) != torch.sign(plain)),
                       torch.zeros_like(plain, dtype=torch.bool))


def test_weighted_mean_of_equal_weights_is_the_disjoint_mean():
    ds = deltas()
    m = Ties()
    base = {"trim_scope": "tensor", "k": 40, "sign_tie": "positive"}
    mean = m.merge(group(ds, [0.5] * 3), m.resolve_params({**base, "aggregate": "mean"}))
    wmean = m.merge(group(ds, [0.5] * 3), m.resolve_params({**base, "aggregate": "weighted_mean"}))
    torch.testing.assert_close(wmean * 0.5, mean)  # weighted mean: sum c tau / sum c; mean: sum c tau / count


@pytest.mark.parametrize("min_kept, expected", [(0, 0), (1, 1), (5, 5)])
def test_min_kept_at_tiny_densities(min_kept, expected):
    x = deltas(1, (10, 10))[0]
    m = Ties()
    out = m.merge(group([x], [1.0]), m.resolve_params({"trim_scope": "tensor", "density": 0.001,
                                                       "min_kept": min_kept}))
    assert int(torch.count_nonzero(out)) == expected
    if expected == 1:
        assert out.abs().max() == x.abs().max()
    zero = m.merge(group([x], [1.0]), m.resolve_params({"trim_scope": "tensor", "density": 0.0, "min_kept": 3}))
    assert int(torch.count_nonzero(zero)) == 0  # density 0 keeps nothing, as mergekit


def test_density_per_source_and_by_pattern_and_across_layers():
    layers = [0, 1, 2, 3]
    rules = [{"match": "*self_attn*", "values": [0.5, None]}, {"values": [[0.1, 0.9], 0.2]}]
    assert value_for(rules, "model.layers.1.self_attn.q_proj.weight", 1, 0, layers) == 0.5
    assert value_for(rules, "model.layers.1.mlp.up_proj.weight", 1, 0, layers) == pytest.approx(0.1 + 0.8 / 3)
    assert value_for(rules, "model.layers.1.self_attn.q_proj.weight", 1, 1, layers) == 0.2
    assert value_for(rules, "model.embed_tokens.weight", None, 0, layers) == 0.1  # outside layers: t = 0
    assert value_for([{"match": "*mlp*", "value": 0.3}], "model.norm.weight", None, 0, layers) is None
    ds = deltas(2, (10, 10))
    m = Ties()
    p = m.resolve_params({"trim_scope": "tensor", "density": rules, "sign_tie": "positive"})
    state = Layout(layers, ["s0", "s1"])
    g = group(ds, [1.0, 1.0], name="model.layers.3.mlp.up_proj.weight", layer=3)
    out = m.merge(g, p, state)
    ref = m.merge(group(ds, [1.0, 1.0]), m.resolve_params({"trim_scope": "tensor", "k": 100, "sign_tie": "positive"}),
                  None)
    trimmed = [ref_top(ds[0], 0.9, False), ref_top(ds[1], 0.2, False)]
    expected = ref_consensus(trimmed, [1.0, 1.0], normalize=False)
    agree = (torch.stack(trimmed).sign() == ((torch.stack(trimmed).sum(0) >= 0).float() * 2 - 1)).sum(0)
    torch.testing.assert_close(out, expected / agree.clamp(min=1))
    assert not torch.equal(out, ref)


def test_gradient_interpolation_is_mergekits():
    config = pytest.importorskip("mergekit.config", reason="mergekit is in the plugin's test extra")
    layers = list(range(7))
    for values in ([0.0, 1.0], [0.2, 0.5, 0.3, 0.7, 1.0], [1.0, 0.0, 0.5]):
        for i in layers:
            ref = config.evaluate_setting("x", values, i / (len(layers) - 1), validate=float)
            assert gradient_at(values, i, layers) == ref
        assert gradient_at(values, None, layers) == config.evaluate_setting("x", values, 0, validate=float)
    assert gradient_at([0.2, 0.8], 0, [0]) == 0.8  # one layer: t = 1, as mergekit


def test_breadcrumbs_density_band_is_mergekits():
    x = deltas(1, (20, 15))[0]
    for density, gamma in ((0.3, 0.01), (0.9, 0.2), (0.5, 0.0), (1.0, 0.1)):
        m = BreadcrumbsTies()
        out = m.merge(group([x], [1.0]), m.resolve_params({"density": density, "beta": gamma, **MERGEKIT_OPTIONS,
                                                            "aggregate": "sum"}))
        n = x.numel()
        if density >= 1:
            ref = x
        else:
            target, n_top = int(density * n), int(gamma * n)
            n_bot = max(0, n - target - n_top)
            mask = torch.zeros(n)
            mask[torch.sort(x.abs().reshape(-1)).indices[n_bot:n_bot + target]] = 1
            ref = x * mask.reshape(x.shape)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("method", [DareLinear(), Breadcrumbs()], ids=lambda m: m.name)
def test_normalize_divides_by_the_summed_weights(method):
    ds, weights = deltas(2), [0.6, 0.9]
    keep_all = {"density": 1.0}
    plain = method.merge(group(ds, weights), method.resolve_params(keep_all))
    normalized = method.merge(group(ds, weights), method.resolve_params({**keep_all, "normalize": True, "scale": 2.0}))
    torch.testing.assert_close(normalized, plain / 1.5 * 2.0)
    torch.testing.assert_close(plain, 0.6 * ds[0] + 0.9 * ds[1])
    cancel = method.merge(group(ds, [1.0, -1.0]), method.resolve_params({**keep_all, "normalize": True}))
    torch.testing.assert_close(cancel, ds[0] - ds[1])  # a sum under 1e-8 is not divided (mergekit)


def test_dare_density_is_one_minus_p_and_zero_keeps_nothing():
    ds = deltas(2, (30, 30))
    m = DareTies()
    kept = m.merge(group(ds, [1.0, 1.0]), m.resolve_params({"density": 1.0, "aggregate": "sum", **MERGEKIT_OPTIONS}))
    assert torch.equal(kept, ref_consensus(ds, [1.0, 1.0], normalize=False))
    none = m.merge(group(ds, [1.0, 1.0]), m.resolve_params({"density": 0.0}))
    assert int(torch.count_nonzero(none)) == 0
    p = m.resolve_params({"density": 0.3, "rescale": "none"})
    share = float(torch.count_nonzero(m.dropped(group(ds, [1.0, 1.0]), p)[0])) / ds[0].numel()
    assert 0.2 < share < 0.4


def test_bad_density_is_one_line_naming_it():
    with pytest.raises(ParameterError, match="density.*outside 0..1"):
        Ties().resolve_params({"trim_scope": "tensor", "density": 1.5})
    with pytest.raises(ParameterError, match=r"density\[0\]: unknown key 'filter'"):
        Ties().resolve_params({"trim_scope": "tensor", "density": [{"filter": "mlp", "value": 0.3}]})
    with pytest.raises(ParameterError, match="set trim_scope: tensor"):
        Ties().resolve_params({"density": 0.3})


def test_defaults_are_unchanged():
    for m in METHODS:
        p = m.resolve_params({"trim_scope": "tensor"} if m.name == "ties" else {})
        assert p.get("weighted_election", False) is False and p["scale"] == 1.0 and p["density"] is None
        assert p.get("normalize", False) is False and p.get("min_kept", 0) == 0


def test_keep_count_is_int_of_the_float_product_as_peft_and_mergekit():
    # 0.29 * 100 is 28.999999999999996 in floating point: int() gives 28, which is what PEFT and
    # mergekit keep; an epsilon would have given 29.
    assert keep_count(0.29, 100) == 28 == int(0.29 * 100)
    assert keep_count(0.3, 10) == 3 and keep_count(1.0, 7) == 7 and keep_count(0.0, 7) == 0
    for fraction in (0.07, 0.29, 0.57, 0.3, 0.58, 0.33):
        for n in (7, 100, 1000, 300):
            assert keep_count(fraction, n) == int(fraction * n)
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    peft = pytest.importorskip("peft.utils.merge_utils", reason="peft is in the plugin's test extra")
    assert int(torch.count_nonzero(peft.magnitude_based_pruning(x, 0.29))) == keep_count(0.29, 100)
    sparsify = pytest.importorskip("mergekit.sparsify", reason="mergekit is in the plugin's test extra")
    assert int(torch.count_nonzero(sparsify.magnitude(x, 0.29))) == keep_count(0.29, 100)


def test_matches_mergekits_own_kernel_bit_for_bit():
    gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic",
                              reason="mergekit is in the plugin's test extra")
    base = pytest.importorskip("mergekit.merge_methods.base")
    registry = pytest.importorskip("mergekit.merge_methods.registry")
    assert gta  # the registry's methods are GeneralizedTaskArithmeticMerge instances
    ds = deltas(3, (16, 12), seed=5)
    theta0 = torch.randn(16, 12, generator=torch.Generator().manual_seed(9))
    weights, densities = [0.7, 0.25, 0.4], [0.3, 0.5, 0.02]
    method = registry.get("ties")
    group_ = base.TensorGroup.from_tensors([theta0] + [theta0 + d for d in ds], ids=["b", "m0", "m1", "m2"],
                                           base_index=0)
    per = lambda values: base.PerInputValues([(f"m{i}", v) for i, v in enumerate(values)])  # noqa: E731
    theirs = method.merge_group(group_, int8_mask=False, normalize=True, rescale=False, **{"lambda": 1.0},
                                weight=per(weights), density=per(densities))
    m = Ties()
    p = m.resolve_params({"trim_scope": "tensor", "density": [{"values": densities}], "min_kept": 1,
                          "aggregate": "weighted_mean", **MERGEKIT_OPTIONS})
    ours = m.merge(group([(theta0 + d) - theta0 for d in ds], weights), p, Layout([1], ["s0", "s1", "s2"]))
    assert torch.equal(theta0 + ours, theirs)


def test_density_values_must_match_the_sources(tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    from mergekit_core.api import MergeConfig, run_merge
    from mergekit_core.testing import fresh_host

    rng = np.random.default_rng(0)
    for name in ("base", "a", "b"):
        (tmp_path / name).mkdir()
        weight = torch.from_numpy(rng.standard_normal((4, 4)).astype("float32"))
        save_file({"model.layers.0.mlp.up_proj.weight": weight}, str(tmp_path / name / "model.safetensors"))
    spec = MergeConfig.from_dict({
        "base_model": str(tmp_path / "base"), "sources": [str(tmp_path / "a"), str(tmp_path / "b")],
        "method": "ties", "method_params": {"trim_scope": "tensor", "density": [{"values": [0.5, 0.5, 0.5]}]},
        "output_dir": str(tmp_path / "art")}).to_spec()
    with pytest.raises(ParameterError, match=r"density\[0\].values has 3 entries but there are 2 sources"):
        run_merge(spec, fresh_host(entry_points=True), in_memory=True)
