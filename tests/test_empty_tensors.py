"""Zero-sized tensors (a 0 in the shape) and 0-d scalars through every merge method and transform.

Each method merges a base and two fine-tunes that hold, besides ordinary matrices and vectors, an
empty [0, 32] matrix, an empty [0] vector, an empty [4, 0, 3] tensor and a 0-d scalar. The output
must keep the empty shapes, get the scalar right (checked against float64 hand computations), and
leave the ordinary tensors exactly as a merge of models without the odd tensors gives them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_core.testing import fresh_host, run_mk

HOST = fresh_host(entry_points=True)

NORMAL = ("model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight")
EMPTY = {"model.empty": (0, 32), "model.empty_vector": (0,), "model.layers.0.empty3": (4, 0, 3)}
SCALAR = "model.scale"
SCALARS = {"base": 1.5, "ft1": 1.75, "ft2": 2.0}
"""Exact in float16 too, so even svd_hybrid's fp16 vector coding keeps them."""
DELTAS = [SCALARS["ft1"] - SCALARS["base"], SCALARS["ft2"] - SCALARS["base"]]

METHODS = [m.name for m in HOST.components("merge_method")]
TRANSFORMS = [t.name for t in HOST.components("transform")]


def _scalar_cases() -> dict[str, tuple[list[str], float]]:
    """Method -> (--param words, the merged scalar computed by hand in float64)."""
    b, (d1, d2) = SCALARS["base"], DELTAS
    mean = b + (d1 + d2) / 2
    total = b + (d1 + d2)
    return {
        "uniform": ([], mean),
        "weighted": ([], mean),
        "task_arithmetic": ([], b + 0.3 * (d1 + d2)),
        "weighted_delta": ([], b + 0.3 * (d1 + d2)),
        "slerp": ([], 0.5 * SCALARS["ft1"] + 0.5 * SCALARS["ft2"]),  # parallel 1-entry vectors: lerp
        "ties": (["k=100", "trim_scope=tensor"], mean),  # same signs: the disjoint mean is the mean
        "dare_linear": (["p=0"], total),
        "dare_ties": (["p=0"], mean),
        "breadcrumbs": (["beta=0", "gamma=0"], total),
        "breadcrumbs_ties": (["beta=0", "gamma=0"], mean),
        "svd_hybrid": ([], mean),  # uniform task weights, lambda 1
    }


SCALAR_CASES = _scalar_cases()


def _write(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return directory


@pytest.fixture(scope="module")
def pools(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Three pools of (base, ft1, ft2) sharing their ordinary tensors: ``odd`` (with the empty
    tensors and the scalar), ``scalar`` (with the scalar only) and ``plain`` (neither)."""
    root = tmp_path_factory.mktemp("empty-tensors")
    g = torch.Generator().manual_seed(0)
    normal = {"base": {n: torch.randn(s, generator=g) for n, s in zip(NORMAL, ((12, 8), (8, 8), (8,)))}}
    for ft in ("ft1", "ft2"):
        normal[ft] = {n: x + 0.1 * torch.randn(x.shape, generator=g) for n, x in normal["base"].items()}
    out: dict[str, dict[str, Path]] = {"odd": {}, "scalar": {}, "plain": {}}
    for model, tensors in normal.items():
        scalar = {SCALAR: torch.tensor(SCALARS[model])}
        empty = {n: torch.zeros(s) for n, s in EMPTY.items()}
        out["odd"][model] = _write(root / "odd" / model, {**tensors, **empty, **scalar})
        out["scalar"][model] = _write(root / "scalar" / model, {**tensors, **scalar})
        out["plain"][model] = _write(root / "plain" / model, dict(tensors))
    return out


def _merge(pool: dict[str, Path], out: Path, *args: str) -> dict[str, torch.Tensor]:
    method = args[args.index("--method") + 1] if "--method" in args else None
    one = method is not None and HOST.get("merge_method", method).max_sources == 1  # nearswap: base + one source
    sources = [str(pool["ft1"])] if one else [str(pool["ft1"]), str(pool["ft2"])]
    result = run_mk(["merge", "--base", str(pool["base"]), "--sources", *sources,
                     "--out", str(out), "--output-dir", str(out.parent / "runs"), "--quiet", *args], host=HOST)
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    return load_file(str(out / "model.safetensors"))


def _params(words: list[str]) -> list[str]:
    return [arg for w in words for arg in ("--param", w)]


def _check_odd(merged: dict[str, torch.Tensor]) -> None:
    for name, shape in EMPTY.items():
        assert tuple(merged[name].shape) == shape and merged[name].dtype == torch.float32, name
    assert merged[SCALAR].shape == () and merged[SCALAR].dtype == torch.float32
    assert torch.isfinite(merged[SCALAR])


def test_every_method_is_covered():
    """A new linear method needs its hand computation here; the built-ins must all be present."""
    assert {"uniform", "weighted", "task_arithmetic", "weighted_delta", "slerp"} <= set(METHODS)
    for name in METHODS:
        if HOST.get("merge_method", name).linear:
            assert name in SCALAR_CASES, f"add a float64 hand computation of {name} to SCALAR_CASES"


@pytest.mark.parametrize("method", METHODS)
def test_method_keeps_empty_shapes_and_leaves_other_tensors_alone(method, pools, tmp_path):
    odd = _merge(pools["odd"], tmp_path / "odd", "--method", method)
    _check_odd(odd)
    assert set(odd) == set(NORMAL) | set(EMPTY) | {SCALAR}
    with_scalar = _merge(pools["scalar"], tmp_path / "scalar", "--method", method)
    plain = _merge(pools["plain"], tmp_path / "plain", "--method", method)
    # a method with a model-wide pass (ties' global trim) counts the scalar as one more entry, so
    # only the empty tensors are sure to change nothing there
    reference = with_scalar if HOST.get("merge_method", method).needs_prepare else plain
    for name in NORMAL:
        assert torch.equal(odd[name], reference[name]), f"{method}: {name} changed"
        assert torch.equal(odd[name], with_scalar[name]), f"{method}: {name} changed"
    assert torch.equal(odd[SCALAR], with_scalar[SCALAR])


@pytest.mark.parametrize("method", sorted(SCALAR_CASES))
def test_scalar_matches_a_float64_hand_computation(method, pools, tmp_path):
    if method not in METHODS:
        pytest.skip(f"{method} is not installed")
    words, expected = SCALAR_CASES[method]
    merged = _merge(pools["odd"], tmp_path / "out", "--method", method, *_params(words))
    _check_odd(merged)
    assert float(merged[SCALAR]) == pytest.approx(expected, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_transform_keeps_empty_shapes_and_leaves_other_tensors_alone(transform, pools, tmp_path):
    spec = HOST.get("transform", transform)
    params = {"granularity": "row"} if any(p.name == "granularity" for p in spec.params) else {}

    def run(pool: str, out: Path) -> dict[str, torch.Tensor]:
        config = out.parent / f"{pool}.yaml"
        config.write_text(json.dumps({
            "method": "task_arithmetic", "base_model": str(pools[pool]["base"]),
            "sources": [str(pools[pool]["ft1"]), str(pools[pool]["ft2"])],
            "transforms": [{"name": transform, "params": params}],
            "output": str(out), "output_dir": str(out.parent / "runs"),
        }))
        result = run_mk(["merge", str(config), "--quiet"], host=HOST)
        assert result.exit_code == 0, result.stderr
        return load_file(str(out / "model.safetensors"))

    odd, plain = run("odd", tmp_path / "odd"), run("plain", tmp_path / "plain")
    _check_odd(odd)
    for name in NORMAL:
        assert torch.equal(odd[name], plain[name]), f"{transform}: {name} changed"


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_outputs(dtype, pools, tmp_path):
    merged = _merge(pools["odd"], tmp_path / "out", "--method", "task_arithmetic", "--dtype", dtype)
    assert {tuple(merged[n].shape) for n in EMPTY} == set(EMPTY.values())
    assert float(merged[SCALAR]) == pytest.approx(SCALAR_CASES["task_arithmetic"][1], rel=1e-2)


def test_transform_kernels_on_empty_and_scalar_tensors():
    """Every transform's ``apply`` directly, with each value of each of its choice parameters, on
    0-sized and 0-d deltas."""
    for transform in HOST.components("transform"):
        variants = [{}] + [{p.name: c} for p in transform.params for c in (p.choices or ())]
        for given in variants:
            params = transform.resolve_params(given)
            for shape in [*EMPTY.values(), (3, 0), ()]:
                out = transform.apply("t", torch.full(shape, 0.5), params, torch.Generator().manual_seed(0))
                assert tuple(out.shape) == tuple(shape), (transform.name, given, shape)
