"""Encoding and decoding one tensor; the method contract; the tvq transform."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from mk_svd_hybrid import plugin
from mk_svd_hybrid.codec import CodecSettings, Decoder, encode
from mk_svd_hybrid.methods import SvdHybrid

from mergekit_core.testing import check_merge_method, fresh_host

LOSSLESS = CodecSettings(energy=1.0, fp16_energy=1.0, mask="none")


def _deltas(t: int, shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [0.01 * torch.randn(shape, generator=g) for _ in range(t)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (4, 3, 2, 2)])
def test_full_energy_and_fp16_is_nearly_lossless(shape):
    deltas = _deltas(3, shape)
    decoder = Decoder(encode(deltas, LOSSLESS))
    for t, d in enumerate(deltas):
        assert decoder.task(t).shape == d.shape
        assert _rel(decoder.task(t), d) < 2e-3  # fp16 basis and coefficients


def test_vectors_are_kept_per_task_and_averaged():
    deltas = _deltas(3, (7,))
    record = encode(deltas, CodecSettings())
    decoder = Decoder(record)
    assert record.meta["kind"] == "vector"
    torch.testing.assert_close(decoder.task(1), deltas[1], atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(decoder.combine([1 / 3] * 3), sum(deltas) / 3, atol=1e-5, rtol=1e-3)


def test_combine_is_the_weighted_sum_of_rebuilt_tasks():
    deltas = _deltas(4, (12, 20))
    decoder = Decoder(encode(deltas, CodecSettings(noise="rtvq")))
    w = [0.1, 0.5, -0.2, 0.3]
    ref = sum(wi * decoder.task(i) for i, wi in enumerate(w))
    torch.testing.assert_close(decoder.combine(w), ref, atol=1e-6, rtol=1e-4)


def test_region_weights_scale_signal_and_noise_separately():
    deltas = _deltas(3, (12, 20))
    decoder = Decoder(encode(deltas, CodecSettings(mask_lambdas=(1.0, 1.0, 1.0), noise="mean")))
    signal = decoder.signal_mask().T.reshape(12, 20) if decoder.meta["transposed"] else decoder.signal_mask()
    assert 0 < float(signal.float().mean()) < 1
    w = [1 / 3] * 3
    both = decoder.combine(w)
    only_signal = decoder.combine(w, noise_weight=0.0)
    assert torch.equal(only_signal[~signal], torch.zeros(int((~signal).sum())))
    torch.testing.assert_close(only_signal[signal], both[signal])
    torch.testing.assert_close(decoder.combine(w, signal_weight=2.0)[signal], 2 * both[signal])


@pytest.mark.parametrize("noise", ["rtvq", "mean", "drop"])
def test_noise_treatments(noise):
    deltas = _deltas(3, (16, 16), seed=1)
    decoder = Decoder(encode(deltas, CodecSettings(mask_lambdas=(1.0,) * 3, noise=noise, energy=1.0,
                                                   fp16_energy=1.0)))
    signal = decoder.signal_mask()
    rebuilt = decoder.task(0)
    if noise == "drop":
        assert torch.equal(rebuilt[~signal], torch.zeros(int((~signal).sum())))
    elif noise == "mean":
        torch.testing.assert_close(rebuilt[~signal], (sum(deltas) / 3)[~signal], atol=1e-5, rtol=1e-3)
    else:
        err = (rebuilt - deltas[0])[~signal].abs().max()
        assert float(err) < float(deltas[0].abs().max()) / 4


def test_fewer_bits_cost_less_and_err_more():
    deltas = _deltas(4, (32, 64), seed=2)
    s = CodecSettings(mask="none", energy=1.0, fp16_energy=0.3)
    coarse, fine = encode(deltas, dataclasses.replace(s, stages=1)), encode(deltas, dataclasses.replace(s, stages=3))
    assert coarse.nbytes < fine.nbytes
    err = [sum(_rel(Decoder(r).task(t), deltas[t]) for t in range(4)) for r in (coarse, fine)]
    assert err[1] < err[0]
    residual = encode(deltas, dataclasses.replace(s, quant="residual", bits=4, stages=1))
    assert "low.0.s0.codes" in residual.tensors and _rel(Decoder(residual).task(0), deltas[0]) < 0.2


def test_one_basis_per_cluster():
    deltas = _deltas(4, (8, 12), seed=3)
    record = encode(deltas, CodecSettings(clusters=((0, 2), (1, 3)), energy=1.0, fp16_energy=1.0, mask="none"))
    assert [c["tasks"] for c in record.meta["clusters"]] == [[0, 2], [1, 3]]
    assert "basis.1" in record.tensors
    decoder = Decoder(record)
    for t in range(4):
        assert _rel(decoder.task(t), deltas[t]) < 2e-3


def test_all_zero_tensor_stores_no_basis():
    record = encode([torch.zeros(5, 9)] * 2, CodecSettings(mask="none"))
    assert record.meta["clusters"][0]["rank"] == 0
    assert torch.equal(Decoder(record).task(1), torch.zeros(5, 9))


def test_given_masks_are_used_and_stored():
    deltas = _deltas(2, (4, 8))
    given = torch.zeros(2, 4, 8, dtype=torch.bool)
    given[0, :2] = True
    record = encode(deltas, CodecSettings(noise="drop"), task_masks=given)
    rebuilt = Decoder(record).task(0)
    assert torch.equal(rebuilt[2:], torch.zeros(2, 8))
    assert record.tensors["task_masks"].shape == (2, 4)


def test_method_contract():
    check_merge_method(SvdHybrid())
    check_merge_method(SvdHybrid(), {"mask": "none", "quant": "residual", "noise": "mean"})


def test_parameters_are_checked():
    method = SvdHybrid()
    from mergekit_core import ParameterError

    with pytest.raises(ParameterError, match="n_clusters"):
        method.resolve_params({"weighting": "cluster", "n_clusters": 1})
    with pytest.raises(ParameterError, match="accuracies"):
        method.resolve_params({"accuracies": "best"})
    with pytest.raises(ParameterError, match="offset_bits"):
        method.resolve_params({"offset_bits": 1})


def test_tvq_transform_quantizes_each_task_vector():
    host = fresh_host({"svd_hybrid": plugin})
    tvq = host.get("transform", "tvq")
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(8))
    out = tvq.apply("w", x, tvq.resolve_params({"bits": 3}), torch.Generator())
    levels = torch.unique(out)
    assert len(levels) <= 2**3
    step = (x.max() - x.min()) / 7
    assert float((out - x).abs().max()) <= float(step) / 2 * 1.0001
    finer = tvq.apply("w", x, tvq.resolve_params({"bits": 3, "stages": 2, "granularity": "row"}), torch.Generator())
    assert float((finer - x).abs().max()) < float((out - x).abs().max())
