"""Zero-sized tensors and 0-d scalars: the codec, and compress / reconstruct / diagnose round trips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mk_svd_hybrid.codec import CodecSettings, Decoder, encode
from mk_svd_hybrid.quantize import pack_codes, quantize, unpack_codes
from mk_svd_hybrid.store import check_record
from safetensors.torch import load_file, save_file

from mergekit_core.testing import run_mk

ODD_SHAPES = [(0, 32), (32, 0), (4, 0, 3), (0,), ()]
SETTINGS = [
    CodecSettings(),
    CodecSettings(mask="none"),
    CodecSettings(noise="mean"),
    CodecSettings(noise="drop"),
    CodecSettings(quant="residual"),
    CodecSettings(svd="randomized", oversample_rank=1),
    CodecSettings(clusters=((0,), (1, 2))),
    CodecSettings(keep_task_masks=False),
]


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"mask={s.mask},noise={s.noise},quant={s.quant},"
                         f"svd={s.svd},clusters={len(s.clusters)}")
def test_codec_round_trips_empty_and_scalar_tensors(shape, settings):
    deltas = [torch.full(shape, 0.25 * (t + 1)) for t in range(3)]
    record = encode(deltas, settings)
    check_record(record, "t", Path("artifact"), shape, 3)
    json.dumps(record.meta, allow_nan=False)
    decoder = Decoder(record)
    for t, d in enumerate(deltas):
        assert tuple(decoder.task(t).shape) == shape
        torch.testing.assert_close(decoder.task(t), d)  # empty, or a scalar exact in fp16
    merged = decoder.combine([0.5, 0.25, 0.25])
    assert tuple(merged.shape) == shape
    torch.testing.assert_close(merged, 0.5 * deltas[0] + 0.25 * deltas[1] + 0.25 * deltas[2])


def test_given_masks_of_an_empty_tensor():
    deltas = [torch.zeros(0, 5) for _ in range(2)]
    record = encode(deltas, CodecSettings(), task_masks=torch.zeros(2, 0, 5, dtype=torch.bool))
    assert tuple(Decoder(record).task(1).shape) == (0, 5)


def test_quantizer_and_packing_of_zero_entries():
    q = quantize(torch.zeros(3, 0), 4)
    assert q.codes.shape == (3, 0) and q.step.shape == (3,)
    assert unpack_codes(pack_codes(q.codes, 4), 4, 0).numel() == 0
    assert quantize(torch.zeros(0, 4), 4).codes.shape == (0, 4)


NORMAL = {"layers.0.up_proj.weight": (12, 8), "layers.0.q_proj.weight": (8, 8), "norm.weight": (8,)}
EMPTY = {"empty": (0, 32), "empty3": (4, 0, 3), "empty_vector": (0,)}
SCALARS = {"base": 1.5, "ft1": 1.75, "ft2": 2.0}


@pytest.fixture(scope="module")
def pools(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """(base, ft1, ft2) with the odd tensors (``odd``) and without them (``plain``)."""
    root = tmp_path_factory.mktemp("svd-empty")
    g = torch.Generator().manual_seed(3)
    base = {n: torch.randn(s, generator=g) for n, s in NORMAL.items()}
    models = {"base": base, **{ft: {n: x + 0.1 * torch.randn(x.shape, generator=g) for n, x in base.items()}
                               for ft in ("ft1", "ft2")}}
    out: dict[str, dict[str, Path]] = {"odd": {}, "plain": {}}
    for pool in out:
        for name, tensors in models.items():
            d = root / pool / name
            d.mkdir(parents=True)
            extra = {"scale": torch.tensor(SCALARS[name]), **{n: torch.zeros(s) for n, s in EMPTY.items()}}
            save_file({**tensors, **extra} if pool == "odd" else tensors, str(d / "model.safetensors"))
            (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
            out[pool][name] = d
    return out


def _ok(result) -> None:
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr


def _compress(host, pool: dict[str, Path], out: Path) -> dict:
    result = run_mk(["svd-hybrid", "compress", "--base", str(pool["base"]), "-s", str(pool["ft1"]),
                     "-s", str(pool["ft2"]), "--out", str(out), "--json"], host=host)
    _ok(result)
    return json.loads(result.stdout)


def _reconstruct(host, pool: dict[str, Path], artifact: Path, out: Path, *args: str) -> dict[str, torch.Tensor]:
    _ok(run_mk(["svd-hybrid", "reconstruct", str(artifact), "--base", str(pool["base"]), "--out", str(out),
                "--quiet", *args], host=host))
    return load_file(str(out / "model.safetensors"))


def test_compress_reconstruct_diagnose_round_trip(pools, host, tmp_path):
    odd, plain = tmp_path / "odd", tmp_path / "plain"
    summary = _compress(host, pools["odd"], odd)
    _compress(host, pools["plain"], plain)
    assert summary["tensors"] == len(NORMAL) + len(EMPTY) + 1
    diagnostics = json.loads((odd / "diagnostics.json").read_text(),
                             parse_constant=lambda c: pytest.fail(f"diagnostics.json holds {c}"))
    for name, shape in EMPTY.items():
        assert diagnostics["tensors"][name]["shape"] == list(shape)
        assert diagnostics["tensors"][name]["mean_relative_error"] == 0.0

    merged = _reconstruct(host, pools["odd"], odd, tmp_path / "merged")
    reference = _reconstruct(host, pools["plain"], plain, tmp_path / "merged_plain")
    for name, shape in EMPTY.items():
        assert tuple(merged[name].shape) == shape
    assert float(merged["scale"]) == SCALARS["base"] + ((SCALARS["ft1"] - SCALARS["base"])
                                                       + (SCALARS["ft2"] - SCALARS["base"])) / 2
    for name in NORMAL:
        assert torch.equal(merged[name], reference[name]), name

    ft1 = _reconstruct(host, pools["odd"], odd, tmp_path / "ft1", "--task", "ft1")
    assert float(ft1["scale"]) == SCALARS["ft1"] and tuple(ft1["empty"].shape) == (0, 32)
    half = _reconstruct(host, pools["odd"], odd, tmp_path / "half", "--dtype", "fp16", "--lambda", "2")
    assert half["scale"].dtype == torch.float16 and tuple(half["empty3"].shape) == (4, 0, 3)
    assert float(half["scale"]) == SCALARS["base"] + 2 * 0.5 * 0.25 + 2 * 0.5 * 0.5  # lambda * w_t * delta_t

    result = run_mk(["svd-hybrid", "diagnose", str(odd), "--timing", "--json"], host=host)
    _ok(result)
    assert math.isfinite(json.loads(result.stdout)["overall"]["mean_relative_error"])
    _ok(run_mk(["svd-hybrid", "diagnose", str(odd)], host=host))


@pytest.mark.parametrize("params", [[], ["mask=none", "noise=mean"], ["weighting=cluster"], ["quant=residual"]])
def test_merge_with_empty_tensors(params, pools, host, tmp_path):
    words = [w for p in params for w in ("--param", p)]
    result = run_mk(["merge", "--method", "svd_hybrid", "--base", str(pools["odd"]["base"]), "--sources",
                     str(pools["odd"]["ft1"]), str(pools["odd"]["ft2"]), *words, "--out", str(tmp_path / "out"),
                     "--output-dir", str(tmp_path / "runs"), "--quiet"], host=host)
    _ok(result)
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, shape in EMPTY.items():
        assert tuple(merged[name].shape) == shape
    assert merged["scale"].shape == ()



def test_a_model_of_only_empty_tensors(host, tmp_path):
    """Nothing to store: the tables show '-' for the ratios instead of failing on them."""
    for name in ("base", "ft1", "ft2"):
        (tmp_path / name).mkdir()
        save_file({"empty": torch.zeros(0, 32)}, str(tmp_path / name / "model.safetensors"))
    artifact = tmp_path / "artifact"
    result = run_mk(["svd-hybrid", "compress", "--base", str(tmp_path / "base"), "-s", str(tmp_path / "ft1"),
                     "-s", str(tmp_path / "ft2"), "--out", str(artifact)], host=host)
    _ok(result)
    _ok(run_mk(["svd-hybrid", "diagnose", str(artifact)], host=host))
    rebuilt = _reconstruct(host, {"base": tmp_path / "base"}, artifact, tmp_path / "rebuilt")
    assert tuple(rebuilt["empty"].shape) == (0, 32)
