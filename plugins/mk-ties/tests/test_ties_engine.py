"""mk-ties through the engine: model-scope trimming, adapters, the plugin listing, and mergekit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mergekit_core.api import MergeConfig, SafetensorsReader, load_merge_config, open_checkpoint, run_merge
from mergekit_core.testing import fresh_host, run_mk

HOST = fresh_host(entry_points=True)
SHAPES = {"model.layers.0.mlp.up_proj.weight": (12, 8), "model.layers.0.self_attn.q_proj.weight": (8, 8),
          "model.layers.1.mlp.up_proj.weight": (12, 8), "model.norm.weight": (8,)}


def np_top_mask(a, m):
    order = np.lexsort((np.arange(a.size), -a))
    mask = np.zeros(a.size, dtype=bool)
    mask[order[:m]] = True
    return mask


def np_elect_merge(stack, coefficients):
    signs = np.sign(stack)
    elected = np.sign(stack.sum(0))
    elected[elected == 0] = np.sign(elected.sum())
    agree = (signs == elected) & (stack != 0)
    return (stack * np.asarray(coefficients)[:, None] * agree).sum(0) / np.maximum(agree.sum(0), 1)


@pytest.fixture
def pool(tmp_path):
    """A base and three fine-tunes whose deltas are multiples of 1/128: many ties in magnitude,
    and exact in float32 (the base is a multiple of 1/16), so (base + delta) - base == delta."""
    rng = np.random.default_rng(0)
    base = {k: (np.round(rng.standard_normal(s) * 16) / 16).astype(np.float32) for k, s in SHAPES.items()}
    paths, deltas = {}, {}
    for name in ("base", "ft1", "ft2", "ft3"):
        d = {k: (np.round(rng.standard_normal(s) * 5) / 128).astype(np.float32) if name != "base"
             else np.zeros(s, np.float32) for k, s in SHAPES.items()}
        deltas[name] = d
        out = tmp_path / name
        out.mkdir()
        stored = {k: base[k] + d[k] for k in SHAPES}
        assert all(np.array_equal(stored[k] - base[k], d[k]) for k in SHAPES)
        save_file({k: torch.from_numpy(v) for k, v in stored.items()}, str(out / "model.safetensors"))
        paths[name] = out
    return paths, base, deltas


def spec(tmp_path, **data):
    data.setdefault("output_dir", str(tmp_path / "art"))
    return MergeConfig.from_dict(data).to_spec()


def test_model_scope_trim_equals_sorting_the_whole_task_vector(tmp_path, pool):
    paths, base, deltas = pool
    sources = ["ft1", "ft2", "ft3"]
    result = run_merge(spec(tmp_path, method="ties", base_model=str(paths["base"]),
                            sources=[str(paths[s]) for s in sources],
                            method_params={"k": 30, "trim_scope": "model", "lambda": 0.9}), HOST, in_memory=True)
    names = list(SHAPES)  # plan order = the base's order
    masks = {}
    for s in sources:
        flat = np.concatenate([deltas[s][n].reshape(-1) for n in names]).astype(np.float64)
        keep = int(0.3 * flat.size)
        m = np_top_mask(np.abs(flat), keep)
        threshold = np.sort(np.abs(flat))[::-1][keep - 1]
        assert (np.abs(flat) > threshold).sum() < keep < (np.abs(flat) >= threshold).sum()  # ties at the cut
        offsets = np.cumsum([0] + [deltas[s][n].size for n in names])
        masks[s] = {n: m[offsets[i]:offsets[i + 1]] for i, n in enumerate(names)}
    for n in names:
        stack = np.stack([deltas[s][n].reshape(-1) * masks[s][n] for s in sources])
        expected = base[n].reshape(-1) + np_elect_merge(stack, [0.9] * 3)
        np.testing.assert_allclose(result.state_dict[n].numpy().reshape(-1), expected, rtol=1e-5, atol=1e-6,
                                   err_msg=n)


def test_dare_ties_is_reproducible_from_its_seed(tmp_path, pool):
    paths, _, _ = pool
    data = dict(method="dare_ties", base_model=str(paths["base"]), sources=[str(paths["ft1"]), str(paths["ft2"])],
                method_params={"p": 0.5}, seed=7)
    a = run_merge(spec(tmp_path, **data), HOST, in_memory=True).state_dict
    b = run_merge(spec(tmp_path, **data), HOST, in_memory=True).state_dict
    c = run_merge(spec(tmp_path, **{**data, "seed": 8}), HOST, in_memory=True).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_transform_pipeline_before_any_method(tmp_path, pool):
    paths, base, deltas = pool
    result = run_merge(spec(tmp_path, method="task_arithmetic", base_model=str(paths["base"]),
                            sources=[str(paths["ft1"])], method_params={"lambda": 1.0},
                            transforms=[{"name": "trim", "params": {"k": 50}}]), HOST, in_memory=True)
    for n in SHAPES:
        d = deltas["ft1"][n].reshape(-1)
        expected = base[n].reshape(-1) + d * np_top_mask(np.abs(d), int(0.5 * d.size))
        np.testing.assert_allclose(result.state_dict[n].numpy().reshape(-1), expected, rtol=1e-6, atol=1e-6)


def test_canonical_ties_config_loads():
    from pathlib import Path

    cfg = load_merge_config(Path(__file__).resolve().parents[3] / "configs" / "merge_ties.yaml")
    assert cfg.data["method"] == "ties"


def test_listed_with_every_parameter_documented():
    listing = json.loads(run_mk(["plugins", "list", "--json"], host=HOST).stdout)
    entry = next(e for e in listing if e["name"] == "ties")
    assert entry["distribution"] == "mk-ties" and entry["status"] == "ok"
    assert set(entry["provides"]["merge_method"]) == {"ties", "dare_linear", "dare_ties", "breadcrumbs",
                                                      "breadcrumbs_ties", "della", "della_linear", "sce",
                                                      "ram", "ramplus_tl"}
    assert set(entry["provides"]["transform"]) == {"trim", "dare", "magnitude_prune"}
    shown = json.loads(run_mk(["plugins", "show", "ties", "--json"], host=HOST).stdout)[0]
    assert {p["name"] for p in shown["params"]} == {"k", "trim_scope", "sign_method", "sign_tie", "aggregate",
                                                    "lambda", "density", "min_kept", "weighted_election", "scale"}
    assert all(p["help"] for p in shown["params"])


def test_without_the_plugin_ties_is_unknown_and_the_package_is_named():
    result = run_mk(["plugins", "show", "ties", "--kind", "merge_method"], host=fresh_host())
    assert result.exit_code == 2 and "pip install -e plugins/mk-ties" in result.stderr
    assert "pip install mk-ties" not in result.stderr


# --------------------------------------------------------------------------- adapters


def _adapters(tmp_path):
    rng = np.random.default_rng(1)
    base = {"layers.0.q_proj.weight": rng.standard_normal((8, 6)).astype(np.float32),
            "layers.1.q_proj.weight": rng.standard_normal((8, 6)).astype(np.float32)}
    (tmp_path / "base").mkdir()
    save_file({k: torch.from_numpy(v) for k, v in base.items()}, str(tmp_path / "base" / "model.safetensors"))
    paths = {}
    for name, r in (("a", 4), ("b", 2)):
        t = {}
        for m in ("layers.0.q_proj", "layers.1.q_proj"):
            t[f"base_model.model.{m}.lora_A.weight"] = torch.from_numpy(rng.standard_normal((r, 6)).astype(np.float32))
            t[f"base_model.model.{m}.lora_B.weight"] = torch.from_numpy(rng.standard_normal((8, r)).astype(np.float32))
        d = tmp_path / name
        d.mkdir()
        save_file(t, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": r,
                                                           "target_modules": ["q_proj"]}))
        paths[name] = d
    return tmp_path / "base", paths, base


def test_lora_ties_writes_an_adapter_and_a_full_model_that_load(tmp_path):
    peft = pytest.importorskip("peft", reason="needs the test extra")
    base_dir, paths, base = _adapters(tmp_path)
    sources = [str(paths["a"]), str(paths["b"])]
    params = {"k": 50, "trim_scope": "tensor"}
    full = run_merge(spec(tmp_path, method="ties", base_model=str(base_dir), sources=sources,
                          method_params=params, output={"path": str(tmp_path / "full"), "kind": "model"}), HOST)
    assert full.output_kind == "model"
    adapter = run_merge(spec(tmp_path, method="ties", base_model=str(base_dir), sources=sources,
                             method_params=params, output={"path": str(tmp_path / "ad"), "adapter_rank": 8}), HOST)
    assert adapter.output_kind == "adapter"
    assert adapter.report["energy_kept"] == pytest.approx(1.0, abs=1e-6)  # rank 8 >= min(8, 6): nothing lost
    merged_full = SafetensorsReader.from_directory(tmp_path / "full")
    reader = open_checkpoint(tmp_path / "ad", HOST)
    for name, w in base.items():
        np.testing.assert_allclose(reader.delta(name).numpy(), merged_full.get(name).numpy() - w, atol=1e-5)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(6, 8, bias=False)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer(), Layer()])

    model = Tiny()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in base.items()})
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "ad").merge_and_unload().state_dict()
    for name in base:
        torch.testing.assert_close(merged[name], merged_full.get(name), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- mergekit


def test_matches_mergekit_where_definitions_agree():
    sparsify = pytest.importorskip("mergekit.sparsify", reason="needs the plugin's test extra")
    gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")
    from mk_ties.kernels import dare
    from mk_ties.methods import Breadcrumbs, Ties

    from mergekit_core import TensorGroup

    rng = np.random.default_rng(3)
    deltas = [torch.from_numpy(rng.standard_normal((40, 25)).astype(np.float32)) for _ in range(3)]
    # TIES: mergekit trims per tensor (argsort, k = int(density * n)), elects with sum >= 0 -> +1, and
    # with normalize divides by the summed weights of agreeing entries. With equal weights of 1 that
    # is our trim_scope tensor, sign_tie positive. (mergekit multiplies weights in before the election
    # and keeps at least one entry when int(density * n) == 0; we elect on unweighted values.)
    trimmed = torch.stack([sparsify.magnitude(d, 0.2) for d in deltas])
    mask = gta.get_mask(trimmed, method="sum")
    ref = (trimmed * mask).sum(0) / mask.sum(0).clamp(min=1)
    group = TensorGroup("w", 0, None, deltas, [1.0, 1.0, 1.0], ["a", "b", "c"])
    ours = Ties().merge(group, Ties().resolve_params({"k": 20, "trim_scope": "tensor", "sign_tie": "positive"}))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    # DARE with mergekit's L1 rescale, on the same mask.
    x = deltas[0]
    ours = dare(x, 0.7, "l1", torch.Generator().manual_seed(4))
    ref = sparsify.rescaled_masked_tensor(x, (ours != 0).to(x.dtype), sparsify.RescaleNorm.l1)
    torch.testing.assert_close(ours, ref)
    # Breadcrumbs: mergekit keeps `density` after removing the top `gamma`; ours drops the top beta and
    # the bottom gamma. density 0.3, mergekit gamma 0.01 == our beta 0.01, gamma 0.69 (n = 1000).
    ref = sparsify.magnitude_outliers(x, 0.3, gamma=0.01)
    b = Breadcrumbs()
    ours = b.merge(TensorGroup("w", 0, None, [x], [1.0], ["a"]), b.resolve_params({"beta": 0.01, "gamma": 0.69}))
    torch.testing.assert_close(ours, ref)


def test_listing_with_the_plugin_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom mergekit_core.cli import main\n"
            "for args in (['--help'], ['plugins', 'list'], ['plugins', 'show', 'ties']):\n"
            "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ties" in proc.stdout and proc.stderr.strip().endswith("NO-TORCH"), proc.stderr
