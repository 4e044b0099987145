"""TSV-M, Iso-C and Iso-CTS against float64 references written from the papers' equations."""

from __future__ import annotations

import numpy as np
import pytest
import subspace_reference as ref
import torch
from mk_subspace.linalg import iso_cts_sizes
from mk_subspace.methods import METHODS, IsoC, IsoCts, TsvMerge

from mergekit_core import ParameterError, TensorGroup
from mergekit_core.testing import check_merge_method

SUBSPACE = [m for m in METHODS if m.name in ("tsv_m", "iso_c", "iso_cts")]  # knots: test_knots.py


def tasks(shape, count, seed=0, rank=None):
    """Random task matrices (float64); ``rank`` makes each a product of two thin factors."""
    rng = np.random.default_rng(seed)
    if rank is None:
        return [rng.standard_normal(shape) * 0.1 for _ in range(count)]
    return [rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1])) * 0.1
            for _ in range(count)]


def merged(method, arrays, coefficients=None, name="model.layers.0.mlp.up_proj.weight", **params):
    coefficients = [1.0] * len(arrays) if coefficients is None else coefficients
    group = TensorGroup(name=name, layer=0, base=None, tensors=[torch.from_numpy(np.asarray(a)) for a in arrays],
                        coefficients=list(coefficients))
    return method.merge(group, method.resolve_params(params)).numpy()


@pytest.mark.parametrize("method", SUBSPACE, ids=lambda m: m.name)
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_contract(method, precision):
    check_merge_method(method, {"precision": precision, "lambda": 0.7})


# --------------------------------------------------------------------------- TSV-M


@pytest.mark.parametrize(("shape", "count"), [((12, 9), 3), ((9, 14), 2), ((10, 10), 4), ((7, 30), 7)])
def test_tsv_m_equals_the_papers_padded_layout(shape, count):
    """(12, 9)/3 and (7, 30)/7: T k = r; (9, 14)/2 and (10, 10)/4: zero-padded columns in the reference."""
    coefficients = [0.7, 1.3, -0.5, 0.9, 1.1, 0.4, 2.0][:count]
    arrays = tasks(shape, count, seed=sum(shape))
    expected = ref.tsv_m([c * a for c, a in zip(coefficients, arrays)])
    got = merged(TsvMerge(), arrays, coefficients, precision="float64")
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    got32 = merged(TsvMerge(), [a.astype(np.float32) for a in arrays], coefficients)
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, expected, rtol=1e-4, atol=2e-5)


def test_tsv_m_keeps_each_tasks_top_vectors_when_they_are_orthogonal():
    """Tasks living in orthogonal row and column spaces: the orthogonalisation changes nothing and
    TSV-M is the sum of each task's rank-k truncation (the paper's motivating case)."""
    rng = np.random.default_rng(1)
    q_left, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    q_right, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    arrays = []
    for t in range(3):
        s = np.zeros(12)
        s[4 * t:4 * t + 4] = [4.0, 3.0, 2.0, 1.0]
        s[(4 * t + 4) % 12] = 0.5  # a weaker direction the truncation to k = 4 drops
        arrays.append(q_left @ np.diag(s) @ q_right.T)
    truncated = [q_left[:, 4 * t:4 * t + 4] @ np.diag([4.0, 3.0, 2.0, 1.0]) @ q_right[:, 4 * t:4 * t + 4].T
                 for t in range(3)]
    np.testing.assert_allclose(merged(TsvMerge(), arrays, precision="float64"), sum(truncated), atol=1e-12)


def test_tsv_m_rank_below_the_number_of_tasks():
    """r = 3 < T = 4: k = 0. The reference returns zeros (small_rank: zero); the default is the mean."""
    arrays = tasks((3, 10), 4, seed=3)
    coefficients = [1.0, 0.5, 2.0, -1.0]
    np.testing.assert_array_equal(ref.tsv_m(arrays), np.zeros((3, 10)))
    np.testing.assert_array_equal(merged(TsvMerge(), arrays, small_rank="zero", precision="float64"),
                                  np.zeros((3, 10)))
    np.testing.assert_allclose(merged(TsvMerge(), arrays, coefficients, precision="float64"),
                               sum(c * a for c, a in zip(coefficients, arrays)) / 4, atol=1e-15)


def test_tsv_m_single_source_is_its_task_vector():
    (array,) = tasks((8, 5), 1, seed=4)
    np.testing.assert_allclose(merged(TsvMerge(), [array], [0.6], precision="float64"), 0.6 * array, atol=1e-12)


def test_tsv_m_a_zero_task_leaves_the_others_merge_unrotated():
    """A zero task vector contributes no directions: the result is the reference over the other
    tasks with the same k = r // T. (The reference code would orthogonalise LAPACK's arbitrary
    vectors for its zero singular values; see linalg's docstring.)"""
    arrays = tasks((12, 12), 2, seed=5)
    got = merged(TsvMerge(), [arrays[0], np.zeros((12, 12)), arrays[1]], precision="float64")
    np.testing.assert_allclose(got, ref.tsv_m(arrays, k=4), rtol=1e-10, atol=1e-12)


def test_tsv_m_rank_deficient_tasks_use_only_their_nonzero_directions():
    arrays = tasks((16, 12), 3, seed=6, rank=2)  # k = 4, but each task has rank 2
    expected = ref.tsv_m([a for a in arrays], k=2)  # the two extra slots hold zero singular values
    np.testing.assert_allclose(merged(TsvMerge(), arrays, precision="float64"), expected, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- Iso-C


@pytest.mark.parametrize(("shape", "count"), [((12, 9), 3), ((9, 14), 8), ((6, 6), 1)])
def test_iso_c_equals_the_flat_spectrum_of_the_sum(shape, count):
    coefficients = [0.3, 1.0, -0.7, 0.5, 0.8, 1.2, 0.1, 0.6][:count]
    arrays = tasks(shape, count, seed=10 + count)
    expected = ref.iso_c([c * a for c, a in zip(coefficients, arrays)])
    np.testing.assert_allclose(merged(IsoC(), arrays, coefficients, precision="float64"), expected,
                               rtol=1e-10, atol=1e-12)
    got32 = merged(IsoC(), [a.astype(np.float32) for a in arrays], coefficients)
    np.testing.assert_allclose(got32, expected, rtol=1e-4, atol=2e-5)
    singular = np.linalg.svd(expected, compute_uv=False)
    np.testing.assert_allclose(singular, singular.mean(), rtol=1e-10)  # isotropic


def test_iso_c_of_a_low_rank_sum_keeps_its_range():
    """A rank-2 sum: the flat value is the mean over all r singular values (as the reference), put on
    the 2 directions the sum has; the reference would add LAPACK's arbitrary completion for the rest."""
    arrays = tasks((10, 8), 2, seed=11, rank=1)
    u, s, vh = np.linalg.svd(sum(arrays), full_matrices=False)
    expected = s.mean() * u[:, :2] @ vh[:2]
    np.testing.assert_allclose(merged(IsoC(), arrays, precision="float64"), expected, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- Iso-CTS


@pytest.mark.parametrize(("shape", "count", "fraction"),
                         [((16, 12), 3, 0.8), ((20, 24), 4, 0.5), ((9, 14), 2, 0.8), ((12, 12), 1, 0.5)])
def test_iso_cts_equals_the_papers_construction(shape, count, fraction):
    coefficients = [0.9, 1.2, -0.4, 0.7][:count]
    arrays = tasks(shape, count, seed=20 + count)
    expected = ref.iso_cts([c * a for c, a in zip(coefficients, arrays)], fraction)
    got = merged(IsoCts(), arrays, coefficients, precision="float64", common_space_fraction=fraction)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    got32 = merged(IsoCts(), [a.astype(np.float32) for a in arrays], coefficients, common_space_fraction=fraction)
    np.testing.assert_allclose(got32, expected, rtol=1e-4, atol=2e-5)


def test_iso_cts_with_the_whole_rank_common_is_iso_c():
    arrays = tasks((10, 12), 3, seed=30)
    np.testing.assert_allclose(merged(IsoCts(), arrays, precision="float64", common_space_fraction=1.0),
                               merged(IsoC(), arrays, precision="float64"), rtol=1e-10, atol=1e-12)


def test_iso_cts_sizes_fill_the_rank_as_the_reference():
    for r in range(1, 40):
        for count in (1, 2, 3, 4, 8):
            for fraction in (0.0, 0.5, 0.8, 1.0):
                common, per_task = iso_cts_sizes(r, count, fraction)
                assert common + count * per_task == r and common >= 0 and per_task >= 0
                reference_common = r - round((r - int(r * fraction)) / count) * count
                if reference_common >= 0:  # the reference's rounding can exceed r (r = 3, T = 4, fraction 0)
                    assert (common, per_task) == (reference_common, (r - reference_common) // count)
    assert iso_cts_sizes(3, 4, 0.0) == (3, 0)


# --------------------------------------------------------------------------- shared behaviour


@pytest.mark.parametrize("method", SUBSPACE, ids=lambda m: m.name)
@pytest.mark.parametrize("shape", [(7,), (3, 2, 2, 2)])
def test_non_matrices_are_the_mean(method, shape):
    arrays = tasks(shape, 3, seed=40)
    coefficients = [0.5, 1.5, -1.0]
    np.testing.assert_allclose(merged(method, arrays, coefficients),
                               sum(c * a for c, a in zip(coefficients, arrays)) / 3, atol=1e-15)


@pytest.mark.parametrize("method", SUBSPACE, ids=lambda m: m.name)
@pytest.mark.parametrize("shape", [(6, 5), (5,)])
def test_all_zero_task_vectors_merge_to_zero(method, shape):
    out = merged(method, [np.zeros(shape, np.float32)] * 3)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.zeros(shape))


@pytest.mark.parametrize("method", SUBSPACE, ids=lambda m: m.name)
def test_equal_coefficients_scale_the_merge_as_alpha(method):
    """The papers' theta_0 + alpha * tau_merged: a single lambda is alpha."""
    arrays = tasks((9, 11), 3, seed=50)
    np.testing.assert_allclose(merged(method, arrays, [0.4] * 3, precision="float64"),
                               0.4 * merged(method, arrays, precision="float64"), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("method", SUBSPACE, ids=lambda m: m.name)
def test_excluded_matrices_are_the_mean(method):
    arrays = tasks((6, 4), 2, seed=60)
    out = merged(method, arrays, name="text_projection", exclude=["*text_proj*"], precision="float64")
    np.testing.assert_allclose(out, (arrays[0] + arrays[1]) / 2, atol=1e-15)
    assert not np.allclose(merged(method, arrays, name="text_projection", precision="float64"), out)


def test_bad_parameters_are_one_clear_error():
    with pytest.raises(ParameterError, match="exclude must be a list of glob patterns"):
        TsvMerge().resolve_params({"exclude": [3]})
    with pytest.raises(ParameterError, match="common_space_fraction"):
        IsoCts().resolve_params({"common_space_fraction": 1.5})
    assert {m.name for m in METHODS} == {"tsv_m", "iso_c", "iso_cts", "knots"}
