"""mk-subspace through the engine: run_merge and `mk merge` on small safetensors models, the listing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import subspace_reference as ref
import torch
from safetensors.torch import load_file, save_file

from mergekit_core.api import MergeConfig, run_merge
from mergekit_core.testing import fresh_host, run_mk

HOST = fresh_host(entry_points=True)
SHAPES = {"model.layers.0.mlp.up_proj.weight": (12, 8), "model.layers.0.self_attn.q_proj.weight": (8, 8),
          "model.layers.0.mlp.gate_proj.bias": (12,), "model.layers.1.self_attn.k_proj.weight": (2, 8),
          "model.norm.weight": (8,)}
SOURCES = ("ft1", "ft2", "ft3")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A base and three fine-tunes (float32). k_proj is 2 x 8: rank 2 < 3 tasks."""
    root = tmp_path_factory.mktemp("subspace_pool")
    rng = np.random.default_rng(0)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    deltas = {}
    for name in ("base", *SOURCES):
        d = {k: (rng.standard_normal(s) * 0.05).astype(np.float32) * (name != "base") for k, s in SHAPES.items()}
        stored = {k: base[k] + d[k] for k in SHAPES}
        deltas[name] = {k: stored[k].astype(np.float64) - base[k].astype(np.float64) for k in SHAPES}
        (root / name).mkdir()
        save_file({k: torch.from_numpy(v) for k, v in stored.items()}, str(root / name / "model.safetensors"))
    return root, base, deltas


def reference_merge(method: str, tau: list[np.ndarray], **params) -> np.ndarray:
    if tau[0].ndim != 2:
        return sum(tau) / len(tau)
    if method == "tsv_m":
        if min(tau[0].shape) < len(tau):
            return sum(tau) / len(tau)  # small_rank: mean
        return ref.tsv_m(tau)
    if method == "iso_c":
        return ref.iso_c(tau)
    return ref.iso_cts(tau, params.get("common_space_fraction", 0.8))


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_run_merge_with_a_per_task_policy_equals_the_reference(tmp_path, pool, method):
    root, base, deltas = pool
    lambdas = [1.0, 0.5, -0.3]
    spec = MergeConfig.from_dict({
        "method": method, "base_model": str(root / "base"), "sources": [str(root / s) for s in SOURCES],
        "lambda_policy": {"name": "per_task", "params": {"lambdas": lambdas}},
        "output_dir": str(tmp_path / "art"),
    }).to_spec()
    result = run_merge(spec, HOST, in_memory=True)
    for name in SHAPES:
        tau = [c * deltas[s][name] for c, s in zip(lambdas, SOURCES)]
        expected = base[name] + reference_merge(method, tau)
        np.testing.assert_allclose(result.state_dict[name].numpy(), expected, rtol=1e-5, atol=2e-6, err_msg=name)


@pytest.mark.parametrize("method", ["tsv_m", "iso_cts"])
def test_mk_merge_writes_the_model(tmp_path, pool, method):
    root, base, deltas = pool
    out = tmp_path / "merged"
    result = run_mk(["merge", "--method", method, "--base", str(root / "base"), "--sources",
                     *[str(root / s) for s in SOURCES], "--lambda", "0.8", "--param", "common_space_fraction=0.5"
                     if method == "iso_cts" else "small_rank=zero", "--out", str(out),
                     "--output-dir", str(tmp_path / "art")], host=HOST)
    assert result.exit_code == 0, result.stderr
    written = {}
    for f in out.glob("*.safetensors"):
        written.update(load_file(str(f)))
    assert set(written) == set(SHAPES)
    for name in SHAPES:
        tau = [0.8 * deltas[s][name] for s in SOURCES]
        if method == "tsv_m" and name.endswith("k_proj.weight"):
            expected = base[name]  # small_rank=zero: the reference code's k = 0
        else:
            expected = base[name] + reference_merge(method, tau, common_space_fraction=0.5)
        np.testing.assert_allclose(written[name].numpy(), expected, rtol=1e-5, atol=2e-6, err_msg=name)


def test_listed_with_parameters_and_a_bad_parameter_is_one_line(tmp_path, pool):
    listing = json.loads(run_mk(["plugins", "list", "--json"], host=HOST).stdout)
    entry = next(p for p in listing if p.get("distribution", "").startswith("mk-subspace"))
    assert entry["status"] == "ok"
    shown = json.loads(run_mk(["plugins", "show", "iso_cts", "--json"], host=HOST).stdout)[0]
    assert {p["name"]: p["default"] for p in shown["params"]}["common_space_fraction"] == 0.8
    root, _, _ = pool
    bad = run_mk(["merge", "--method", "iso_cts", "--base", str(root / "base"), "--sources",
                  *[str(root / s) for s in SOURCES], "--param", "common_space_fraction=2", "--out",
                  str(tmp_path / "never"), "--output-dir", str(tmp_path / "art")], host=HOST)
    assert bad.exit_code == 2 and "common_space_fraction" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "never").exists()
