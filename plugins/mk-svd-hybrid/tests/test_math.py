"""Each piece of SVD-Hybrid against a small numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mk_svd_hybrid import masks, weighting
from mk_svd_hybrid.quantize import (
    dequantize_stages,
    pack_codes,
    quantize,
    residual_quantize,
    rtvq,
    unpack_codes,
)
from mk_svd_hybrid.rank import energy_rank, shared_basis


def _deltas(t: int, shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(t)]


# --------------------------------------------------------------------------- masks


def test_tall_masks_match_the_reference_formula():
    deltas = _deltas(4, (5, 7))
    lambdas = [0.2, 0.4, 0.6, 1.0]
    got = masks.tall_masks(deltas, lambdas).numpy()
    tau = np.stack([d.numpy() for d in deltas])
    mtl = tau.sum(0)
    for t in range(4):  # m_t = |tau_t| > lambda_t |tau_MTL - tau_t|, strict
        np.testing.assert_array_equal(got[t], np.abs(tau[t]) > lambdas[t] * np.abs(mtl - tau[t]))


def test_tall_mask_is_strict_at_equality():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0])
    m = masks.tall_masks([a, b], [1.0, 1.0])
    assert m[0].tolist() == [False, True]  # |1| > |1| is false


@pytest.mark.parametrize("strategy", masks.STRATEGIES)
def test_combine_strategies(strategy):
    m = (torch.rand(5, 40, generator=torch.Generator().manual_seed(1)) > 0.5)
    ref = {"union": m.numpy().any(0), "intersection": m.numpy().all(0),
           "majority": m.numpy().sum(0) > 5 / 2}[strategy]
    np.testing.assert_array_equal(masks.combine(m, strategy).numpy(), ref)


def test_majority_needs_more_than_half():
    m = torch.tensor([[True], [True], [False], [False]])
    assert not bool(masks.combine(m, "majority")[0])


def test_pack_is_one_bit_per_entry_and_round_trips_like_numpy():
    m = torch.rand(3, 13, generator=torch.Generator().manual_seed(2)) > 0.3
    packed = masks.pack(m)
    assert packed.dtype == torch.uint8 and packed.numel() == (39 + 7) // 8
    np.testing.assert_array_equal(packed.numpy(), np.packbits(m.numpy().reshape(-1)))
    assert torch.equal(masks.unpack(packed, (3, 13)), m)


# --------------------------------------------------------------------------- energy rank


def _numpy_rank(s: np.ndarray, threshold: float) -> int:
    sq = s.astype(np.float64) ** 2
    if sq.sum() == 0:
        return 0
    return int(np.clip(np.searchsorted(np.cumsum(sq) / sq.sum(), threshold) + 1, 1, len(s)))


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.9, 0.99, 1.0])
def test_energy_rank_matches_numpy(threshold):
    s = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    assert energy_rank(s, threshold) == _numpy_rank(s.numpy(), threshold)


def test_energy_rank_edge_cases():
    assert energy_rank(torch.zeros(4), 0.9) == 0  # all-zero: store nothing
    assert energy_rank(torch.ones(4), 1.0) == 4  # threshold 1.0: clamped to the full rank
    assert energy_rank(torch.tensor([1.0, 1e-20]), 1.0) == 2


def test_energy_is_squared_singular_values_not_nuclear_norm():
    s = torch.tensor([3.0, 1.0, 1.0, 1.0])  # squared: 9/12 = 0.75; nuclear: 3/6 = 0.5
    assert energy_rank(s, 0.75) == 1


def test_shared_basis_spans_the_top_subspace_of_the_stacked_tasks():
    xs = _deltas(3, (8, 20), seed=3)
    basis = shared_basis(xs, 0.8)
    u, s, _ = np.linalg.svd(np.concatenate([x.numpy() for x in xs], axis=1), full_matrices=False)
    k = _numpy_rank(s, 0.8)
    assert basis.rank == k
    proj_ours = basis.vectors.numpy() @ basis.vectors.numpy().T
    proj_ref = u[:, :k] @ u[:, :k].T
    np.testing.assert_allclose(proj_ours, proj_ref, atol=1e-4)
    assert basis.energy_kept() == pytest.approx((s[:k] ** 2).sum() / (s**2).sum(), rel=1e-6)
    # the truncation error is sqrt(1 - E(k))
    stacked = torch.cat(xs, dim=1)
    err = torch.linalg.norm(stacked - basis.vectors @ (basis.vectors.T @ stacked)) / torch.linalg.norm(stacked)
    assert float(err) == pytest.approx((1 - basis.energy_kept()) ** 0.5, rel=1e-3)


def test_shared_basis_edge_cases():
    zero = shared_basis([torch.zeros(4, 6), torch.zeros(4, 6)], 0.9)
    assert zero.rank == 0 and zero.vectors.shape == (4, 0)
    full = shared_basis(_deltas(2, (4, 6)), 1.0)
    assert full.rank == 4  # threshold 1.0 keeps every component
    capped = shared_basis(_deltas(2, (4, 6)), 1.0, max_rank=100)  # a cap above the matrix rank
    assert capped.rank == 4
    assert shared_basis(_deltas(2, (4, 6)), 1.0, max_rank=2).rank == 2


def test_randomized_basis_agrees_with_exact_on_a_low_rank_matrix():
    g = torch.Generator().manual_seed(4)
    left = torch.randn(200, 5, generator=g)
    xs = [left @ torch.randn(5, 300, generator=g) for _ in range(2)]
    exact = shared_basis(xs, 0.999)
    rand = shared_basis(xs, 0.999, randomized=True, oversample_rank=20)
    assert exact.rank == rand.rank == 5
    np.testing.assert_allclose((rand.vectors @ rand.vectors.T).numpy(), (exact.vectors @ exact.vectors.T).numpy(),
                               atol=1e-4)
    # more components asked for than the matrix has: falls back to the exact path, no error
    assert shared_basis(xs, 0.999, randomized=True, oversample_rank=1000).rank == 5


# --------------------------------------------------------------------------- quantization


def _numpy_quantize(x: np.ndarray, bits: int) -> np.ndarray:
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    levels = 2**bits - 1
    step = (hi - lo) / levels if hi > lo else 1.0
    zero = np.clip(np.round(-lo / step), 0, levels)
    q = np.clip(np.round(x / step) + zero, 0, levels)
    return step * (q - zero)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantizer_round_trip_and_error_bound(bits):
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(bits)) * 0.01 + 0.002
    q = quantize(x, bits)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    back = q.dequantize()
    for r in range(3):
        np.testing.assert_allclose(back[r].numpy(), _numpy_quantize(x[r].numpy().astype(np.float64), bits),
                                   rtol=1e-5, atol=1e-9)
    bound = q.step.unsqueeze(-1) / 2
    assert bool(((x - back).abs() <= bound * (1 + 1e-5)).all())


def test_quantizer_keeps_zero_and_constants_exact():
    x = torch.tensor([[0.0, 0.3, -0.7, 0.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])
    back = quantize(x, 2).dequantize()
    assert back[0, 0] == 0.0 and back[0, 3] == 0.0
    torch.testing.assert_close(back[1], x[1])
    assert torch.equal(back[2], x[2])


@pytest.mark.parametrize("bits", range(1, 9))
def test_code_packing_round_trips(bits):
    codes = torch.randint(0, 2**bits, (37,), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == (37 * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, 37), codes)


def test_residual_stages_reduce_the_error():
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(5))
    errors = [float(torch.linalg.norm(x - dequantize_stages(residual_quantize(x, 2, s)))) for s in range(1, 5)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    # each stage's error is bounded by half of its own step
    stages = residual_quantize(x, 3, 2)
    residual = x - stages[0].dequantize()
    assert bool(((residual - stages[1].dequantize()).abs() <= stages[1].step.unsqueeze(-1) / 2 * 1.0001).all())


def test_rtvq_uses_the_quantized_base_for_offsets():
    x = torch.randn(5, 2, 64, generator=torch.Generator().manual_seed(6))
    base, offsets = rtvq(x, base_bits=3, offset_bits=2, stages=1)
    xn = x.numpy().astype(np.float64)
    base_hat = np.stack([_numpy_quantize(row, 3) for row in xn.mean(0)])
    ref = np.stack([np.stack([_numpy_quantize(row, 2) for row in xn[t] - base_hat]) + base_hat for t in range(5)])
    got = dequantize_stages(base).unsqueeze(0) + dequantize_stages(offsets)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-5)
    # base + offsets beats quantizing each task alone at the offset's bits
    alone = dequantize_stages(residual_quantize(x, 2, 1))
    assert float(torch.linalg.norm(x - got)) < float(torch.linalg.norm(x - alone))


# --------------------------------------------------------------------------- weighting and clusters


def test_weighting_modes():
    assert weighting.uniform(4) == [0.25] * 4
    acc = [0.9, 0.8, 0.95]
    e = np.exp(np.array(acc) / 0.1)
    np.testing.assert_allclose(weighting.performance(acc, 0.1), e / e.sum())
    assert weighting.performance(acc, 1e6) == pytest.approx([1 / 3] * 3)
    assert weighting.cluster_weights([0, 0, 0, 1]) == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])
    assert sum(weighting.cluster_weights([2, 0, 1, 1, 0])) == pytest.approx(1.0)
    assert weighting.task_accuracies({"a": 0.5, "b": 0.7}, ["b", "a"]) == [0.7, 0.5]
    with pytest.raises(KeyError):
        weighting.task_accuracies({"a": 0.5}, ["a", "b"])


@pytest.mark.parametrize("method", ["kmeans", "hierarchical"])
def test_two_obvious_clusters_are_recovered(method):
    g = torch.Generator().manual_seed(7)
    centers = torch.randn(2, 500, generator=g)
    vectors = torch.stack([centers[c] + 0.1 * torch.randn(500, generator=g) for c in [0, 1, 0, 1, 1, 0]])
    gram = (vectors @ vectors.T).double().numpy()
    labels = weighting.cluster_tasks(gram, 2, method)
    assert labels == [0, 1, 0, 1, 1, 0]
    assert weighting.cluster_tasks(gram, 1, method) == [0] * 6
