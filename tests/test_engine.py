"""run_merge against independent numpy references: built-in methods, lambda policies, merge modes,
full models and LoRA adapters, adapter outputs, reports, and failure behaviour."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from mergekit_core.config import MergeConfig
from mergekit_core.engine import run_merge
from mergekit_core.errors import MergeError, UsageError
from mergekit_core.io.peft_reader import AdapterReader
from mergekit_core.io.readers import SafetensorsReader
from mergekit_core.testing import fresh_host

HOST = fresh_host()
LAYER_TENSORS = ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight")


def spec_of(tmp_path, **data):
    data.setdefault("output_dir", str(tmp_path / "artifacts"))
    return MergeConfig.from_dict(data, None).to_spec()


def merged_state(tmp_path, **data):
    result = run_merge(spec_of(tmp_path, **data), HOST, in_memory=True)
    return {k: v.numpy() for k, v in result.state_dict.items()}, result


def np_state(tensors):
    return {k: v.numpy().astype(np.float64) if v.is_floating_point() else v.numpy() for k, v in tensors.items()}


def layer_of(name):
    parts = name.split(".")
    return int(parts[2]) if parts[1] == "layers" else None


def check(out, expected, names=None):
    for name in names or expected:
        np.testing.assert_allclose(out[name], expected[name], rtol=1e-5, atol=1e-5, err_msg=name)


# --------------------------------------------------------------------------- full models


def test_uniform_is_the_mean_of_the_weights(tmp_path, models):
    paths, tensors = models
    out, result = merged_state(tmp_path, method="uniform", base_model=str(paths["base"]),
                               sources=[str(paths["ft1"]), str(paths["ft2"])])
    s = [np_state(tensors[n]) for n in ("ft1", "ft2")]
    expected = {k: (s[0][k] + s[1][k]) / 2 for k in s[0] if s[0][k].dtype == np.float64}
    check(out, expected)
    assert np.array_equal(out["model.rotary.inv_freq_steps"], tensors["base"]["model.rotary.inv_freq_steps"].numpy())
    assert result.report["copied"] == 1 and result.report["merged"] == len(expected)


def test_uniform_without_base_is_the_mean(tmp_path, models):
    paths, tensors = models
    out, _ = merged_state(tmp_path, method="uniform", sources=[str(paths["ft1"]), str(paths["ft2"])])
    s = [np_state(tensors[n]) for n in ("ft1", "ft2")]
    check(out, {k: (s[0][k] + s[1][k]) / 2 for k in s[0] if s[0][k].dtype == np.float64})


def test_task_arithmetic_scalar_lambda(tmp_path, models):
    paths, tensors = models
    out, result = merged_state(tmp_path, method="task_vector", base_model=str(paths["base"]),
                               sources=[str(paths["ft1"]), str(paths["ft2"])], method_params={"lambda": 0.4})
    b, s1, s2 = (np_state(tensors[n]) for n in ("base", "ft1", "ft2"))
    expected = {k: b[k] + 0.4 * ((s1[k] - b[k]) + (s2[k] - b[k])) for k in b if b[k].dtype == np.float64}
    check(out, expected)
    assert result.lambda_values == {"lambda": 0.4}
    num = sum(((expected[k] - b[k]) ** 2).sum() for k in expected)
    den = sum((b[k] ** 2).sum() for k in expected)
    assert result.report["relative_delta_norm"] == pytest.approx(math.sqrt(num / den), rel=1e-5)


def test_weighted_normalizes_per_task_weights(tmp_path, models):
    paths, tensors = models
    out, _ = merged_state(tmp_path, method="weighted", base_model=str(paths["base"]),
                          sources=[str(paths["ft1"]), str(paths["ft2"])],
                          lambda_policy={"name": "per_task", "params": {"lambdas": [3.0, 1.0]}})
    s1, s2 = np_state(tensors["ft1"]), np_state(tensors["ft2"])
    check(out, {k: 0.75 * s1[k] + 0.25 * s2[k] for k in s1 if s1[k].dtype == np.float64})


def test_weighted_delta_per_layer_and_per_task_layer(tmp_path, models):
    paths, tensors = models
    b, s1, s2 = (np_state(tensors[n]) for n in ("base", "ft1", "ft2"))
    floats = [k for k in b if b[k].dtype == np.float64]
    overrides = {0: 0.1, "1-2": 0.7}
    out, result = merged_state(tmp_path, method="weighted_delta", base_model=str(paths["base"]),
                               sources=[str(paths["ft1"]), str(paths["ft2"])],
                               lambda_policy={"name": "per_layer", "params": {"default": 0.3, "overrides": overrides}})
    lam = {None: 0.3, 0: 0.1, 1: 0.7, 2: 0.7}
    check(out, {k: b[k] + lam[layer_of(k)] * ((s1[k] - b[k]) + (s2[k] - b[k])) for k in floats})
    assert result.lambda_values["layer.2"] == 0.7
    values = {"task.1.layer.0": 0.9, "task.0.layer.2": -0.2}
    out, _ = merged_state(tmp_path, method="weighted_delta", base_model=str(paths["base"]),
                          sources=[str(paths["ft1"]), str(paths["ft2"])],
                          lambda_policy={"name": "per_task_layer", "params": {"lambdas": [0.2, 0.5],
                                                                              "values": values}})

    def lam2(task, layer):
        return values.get(f"task.{task}.layer.{layer}", [0.2, 0.5][task])

    check(out, {k: b[k] + lam2(0, layer_of(k)) * (s1[k] - b[k]) + lam2(1, layer_of(k)) * (s2[k] - b[k])
                for k in floats})


def np_slerp(t, v0, v1, eps=0.9995):
    u0, u1 = v0 / np.linalg.norm(v0), v1 / np.linalg.norm(v1)
    dot = float(np.clip((u0 * u1).sum(), -1, 1))
    if abs(dot) > eps:
        return (1 - t) * v0 + t * v1
    th = math.acos(dot)
    return math.sin((1 - t) * th) / math.sin(th) * v0 + math.sin(t * th) / math.sin(th) * v1


def test_slerp_matches_numpy_on_weights(tmp_path, models):
    paths, tensors = models
    out, _ = merged_state(tmp_path, method="slerp", base_model=str(paths["base"]),
                          sources=[str(paths["ft1"]), str(paths["ft2"])], method_params={"t": 0.3})
    s1, s2 = np_state(tensors["ft1"]), np_state(tensors["ft2"])
    check(out, {k: np_slerp(0.3, s1[k], s2[k]) for k in s1 if s1[k].dtype == np.float64})
    assert np.allclose(out["model.norm.weight"], 1.0, atol=0.5)  # near-parallel tensors fall back to lerp


def test_merge_modes(tmp_path, models):
    paths, tensors = models
    srcs = [str(paths[n]) for n in ("ft1", "ft2", "ft3")]
    missing = "model.layers.2.mlp.up_proj.weight"
    b, s1, s2 = (np_state(tensors[n]) for n in ("base", "ft1", "ft2"))
    common, result = merged_state(tmp_path, method="task_arithmetic", base_model=str(paths["base"]), sources=srcs,
                                  method_params={"lambda": 1.0})
    np.testing.assert_array_equal(common[missing], b[missing].astype(np.float32))
    assert result.report["copied_why"]["only in 2 of 3 sources (merge_mode common)"] == 1
    union, _ = merged_state(tmp_path, method="task_arithmetic", base_model=str(paths["base"]), sources=srcs,
                            method_params={"lambda": 1.0}, merge_mode="union")
    np.testing.assert_allclose(union[missing], s1[missing] + s2[missing] - b[missing], rtol=1e-5, atol=1e-5)
    with pytest.raises(MergeError, match="merge_mode strict: source ft3 lacks 'model.layers.2.mlp.up_proj.weight'"):
        run_merge(spec_of(tmp_path, method="uniform", base_model=str(paths["base"]), sources=srcs,
                          merge_mode="strict"), HOST, in_memory=True)


def test_exclude_keeps_the_base(tmp_path, models):
    paths, tensors = models
    out, result = merged_state(tmp_path, method="uniform", base_model=str(paths["base"]),
                               sources=[str(paths["ft1"]), str(paths["ft2"])], exclude=["lm_head.*"])
    np.testing.assert_array_equal(out["lm_head.weight"], tensors["base"]["lm_head.weight"].numpy())
    assert result.report["copied_why"]["excluded by pattern 'lm_head.*'"] == 1


def test_written_model_has_recipe_dtype_shards_and_bundle(tmp_path, models):
    paths, tensors = models
    out_dir = tmp_path / "merged"
    result = run_merge(spec_of(tmp_path, method="uniform", base_model=str(paths["base"]),
                               sources=[str(paths["ft1"]), str(paths["ft2"])],
                               output={"path": str(out_dir), "dtype": "bf16", "shard_size": 1500}), HOST)
    reader = SafetensorsReader.from_directory(out_dir)
    assert len(reader.headers) > 1 and (out_dir / "config.json").is_file()
    assert reader.infos()["model.norm.weight"].dtype == "BF16"
    assert reader.infos()["model.rotary.inv_freq_steps"].dtype == "I64"
    with safe_open(str(reader.headers[0].path), "pt") as f:
        recipe = json.loads(f.metadata()["mergekit_recipe"])
    assert recipe["spec"]["method"]["name"] == "uniform"
    meta = json.loads((result.run_dir / "merge_metadata.json").read_text())
    assert set(meta["output"]["sha256"]) >= {"config.json", "model.safetensors.index.json"}
    assert all(v["sha256"] for v in meta["inputs"].values())
    assert meta["versions"]["mergekit-core"] and meta["peak_rss_mb"] > 0
    assert json.loads((result.run_dir / "summary.json").read_text())["tensors"]["merged"] == result.report["merged"]
    assert result.run_dir.parent.parent == tmp_path / "artifacts" / "merged" / "uniform" / "ft1_ft2"


def test_written_output_equals_the_in_memory_merge_with_a_slow_writer(tmp_path, models, monkeypatch):
    """The writer thread writes one tensor while the next is merged: a writer slower than the merge
    must still write every tensor as merged (memory reused too early would change what is
    written)."""
    import time

    from mergekit_core.io.writer import StreamingSafetensorsWriter

    paths, _ = models
    data = dict(method="task_arithmetic", base_model=str(paths["base"]), method_params={"lambda": 0.7},
                sources=[str(paths["ft1"]), str(paths["ft2"])])
    expected, _ = merged_state(tmp_path, **data)
    original = StreamingSafetensorsWriter.write

    def slow(self, name, tensor):
        time.sleep(0.02)
        original(self, name, tensor)

    monkeypatch.setattr(StreamingSafetensorsWriter, "write", slow)
    out_dir = tmp_path / "merged"
    run_merge(spec_of(tmp_path, output={"path": str(out_dir)}, **data), HOST)
    reader = SafetensorsReader.from_directory(out_dir)
    assert set(reader.infos()) == set(expected)
    for name, value in expected.items():
        assert np.array_equal(reader.get(name).numpy(), value), name


def test_crash_mid_merge_leaves_no_output(tmp_path, models, monkeypatch):
    paths, _ = models
    from mergekit_core.builtin import methods

    calls = {"n": 0}
    original = methods.Uniform.linear_coefficients

    def crashing(self, group, params):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, group, params)

    monkeypatch.setattr(methods.Uniform, "linear_coefficients", crashing)
    out_dir = tmp_path / "merged"
    with pytest.raises(KeyboardInterrupt):
        run_merge(spec_of(tmp_path, method="uniform", base_model=str(paths["base"]),
                          sources=[str(paths["ft1"]), str(paths["ft2"])], output=str(out_dir)), HOST)
    assert not out_dir.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []
    runs = tmp_path / "artifacts" / "merged" / "uniform" / "ft1_ft2" / "runs"
    assert list(runs.iterdir()) == [] and calls["n"] == 4


def test_nonfinite_sources_are_named(tmp_path, models):
    from safetensors.torch import save_file

    paths, tensors = models
    bad = dict(tensors["ft2"])
    bad["model.layers.1.mlp.up_proj.weight"] = bad["model.layers.1.mlp.up_proj.weight"].clone()
    bad["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(bad, str(paths["ft2"] / "model.safetensors"))
    spec = spec_of(tmp_path, method="uniform", base_model=str(paths["base"]),
                   sources=[str(paths["ft1"]), str(paths["ft2"])])
    with pytest.raises(MergeError, match=r"model.layers.1.mlp.up_proj.weight: .*NaN or Inf.*source ft2"):
        run_merge(spec, HOST, in_memory=True)
    result = run_merge(spec, HOST, in_memory=True, allow_nonfinite=True)
    assert any("ft2" in w for w in result.metadata["warnings"])


def test_shape_mismatch_is_reported_before_any_work(tmp_path, models):
    from safetensors.torch import save_file

    paths, tensors = models
    bigger = dict(tensors["ft2"])
    bigger["model.embed_tokens.weight"] = torch.randn(24, 8)
    save_file(bigger, str(paths["ft2"] / "model.safetensors"))
    with pytest.raises(MergeError, match=r"model.embed_tokens.weight: source ft2 has shape \[24, 8\], expected "
                                         r"\[20, 8\] \(embedding matrices of different vocabulary sizes"):
        run_merge(spec_of(tmp_path, method="uniform", base_model=str(paths["base"]),
                          sources=[str(paths["ft1"]), str(paths["ft2"])]), HOST)
    assert not (tmp_path / "artifacts").exists()


def test_component_problems_are_reported_together(tmp_path, models):
    paths, _ = models
    spec = spec_of(tmp_path, method="task_arithmetic", method_params={"lamda": 1},
                   base_model=str(paths["base"]), sources=[str(paths["ft1"])],
                   lambda_policy="per_leyer", transforms=["sparsify"])
    with pytest.raises(UsageError) as err:
        run_merge(spec, HOST)
    msg = str(err.value)
    assert "unknown parameter 'lamda'" in msg and "unknown transform 'sparsify'" in msg
    assert "unknown lambda policy 'per_leyer'" in msg and "did you mean 'per_layer'" in msg


# --------------------------------------------------------------------------- adapters


def test_adapters_into_a_full_model(tmp_path, models, lora_adapters):
    paths, tensors = models
    apaths, deltas = lora_adapters
    b = np_state(tensors["base"])
    out, result = merged_state(tmp_path, method="task_arithmetic", base_model=str(paths["base"]),
                               sources=[str(apaths["a"]), str(apaths["b"])], method_params={"lambda": 0.5},
                               merge_mode="union", output={"kind": "model"})
    for name in set(deltas["a"]) | set(deltas["b"]):
        total = sum(deltas[n][name].numpy() for n in ("a", "b") if name in deltas[n])
        np.testing.assert_allclose(out[name], b[name] + 0.5 * total, rtol=1e-5, atol=1e-5, err_msg=name)
    assert result.output_kind == "model"
    untouched = "model.layers.2.self_attn.q_proj.weight"
    np.testing.assert_array_equal(out[untouched], b[untouched].astype(np.float32))


def test_adapter_output_by_exact_concatenation(tmp_path, models, lora_adapters):
    paths, _ = models
    apaths, deltas = lora_adapters
    out_dir = tmp_path / "merged_adapter"
    result = run_merge(spec_of(tmp_path, method="weighted_delta", sources=[str(apaths["a"]), str(apaths["b"])],
                               lambda_policy={"name": "per_task", "params": {"lambdas": [0.7, -0.4]}},
                               output=str(out_dir)), HOST)
    assert result.output_kind == "adapter" and result.report["energy_kept"] == 1.0
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert list(result.report["left_out"]) == ["model.layers.1.mlp.up_proj.weight",
                                               "model.layers.1.self_attn.q_proj.weight"]
    reader = AdapterReader(out_dir)
    assert set(reader.targets()) == {q0}  # common mode: only the module both adapters change
    assert reader.modules["model.layers.0.self_attn.q_proj"].rank == 6  # 4 + 2, exact
    expected = 0.7 * deltas["a"][q0] - 0.4 * deltas["b"][q0]
    torch.testing.assert_close(reader.delta(q0), expected, rtol=1e-5, atol=1e-6)
    assert reader.config.use_rslora is False and reader.config.scaling("x") == 1.0
    union_dir = tmp_path / "union_adapter"
    run_merge(spec_of(tmp_path, method="uniform", sources=[str(apaths["a"]), str(apaths["b"])],
                      merge_mode="union", output=str(union_dir)), HOST)
    union = AdapterReader(union_dir)
    assert len(union.targets()) == 3
    up1 = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(union.delta(up1), 0.5 * deltas["b"][up1], rtol=1e-5, atol=1e-6)
    assert union.config.rank_pattern  # modules of different ranks


def test_adapter_output_nonlinear_uses_svd_and_records_energy(tmp_path, models, lora_adapters):
    paths, _ = models
    apaths, deltas = lora_adapters
    out_dir = tmp_path / "slerp_adapter"
    result = run_merge(spec_of(tmp_path, method="slerp", base_model=str(paths["base"]),
                               sources=[str(apaths["a"]), str(apaths["b"])], output={"path": str(out_dir),
                                                                                     "adapter_rank": 2}), HOST)
    energy = result.report["energy_kept_per_module"]
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert 0 < energy[q0] < 1 and 0 < result.report["energy_kept"] < 1
    reader = AdapterReader(out_dir)
    base = SafetensorsReader.from_directory(paths["base"]).get(q0)
    w0, w1 = ((base + deltas[n][q0]).double().numpy() for n in ("a", "b"))
    full = np_slerp(0.5, w0, w1) - base.double().numpy()
    u, s, vh = np.linalg.svd(full)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    np.testing.assert_allclose(reader.delta(q0).numpy(), best, rtol=1e-4, atol=1e-5)
    assert energy[q0] == pytest.approx(float((s[:2] ** 2).sum() / (s ** 2).sum()), rel=1e-4)


def test_adapter_output_loads_in_peft(tmp_path, models, lora_adapters):
    peft = pytest.importorskip("peft", reason="needs the test extra")
    from torch import nn

    paths, tensors = models
    apaths, deltas = lora_adapters
    out_dir = tmp_path / "merged_adapter"
    run_merge(spec_of(tmp_path, method="task_arithmetic", sources=[str(apaths["a"]), str(apaths["b"])],
                      merge_mode="union", method_params={"lambda": 1.0}, output=str(out_dir)), HOST)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.Module()
            self.self_attn.q_proj = nn.Linear(8, 8, bias=False)
            self.mlp = nn.Module()
            self.mlp.up_proj = nn.Linear(8, 12, bias=False)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([Block() for _ in range(3)])

    tiny = Tiny()
    base = tensors["base"]
    tiny.load_state_dict({k: v for k, v in base.items() if "proj" in k})
    merged = peft.PeftModel.from_pretrained(tiny, out_dir).merge_and_unload().state_dict()
    for name in merged:
        expected = base[name] + sum(deltas[n].get(name, 0) for n in ("a", "b"))
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-5)


def test_adapter_model_output_needs_a_base(tmp_path, lora_adapters):
    apaths, _ = lora_adapters
    with pytest.raises(MergeError, match="a model output from adapters needs base_model"):
        run_merge(spec_of(tmp_path, method="uniform", sources=[str(apaths["a"])], output={"kind": "model"}), HOST)


def test_sources_of_another_architecture_are_refused(tmp_path, models):
    from safetensors.torch import save_file

    paths, _ = models
    other = tmp_path / "other"
    other.mkdir()
    save_file({"transformer.h.0.attn.c_attn.weight": torch.zeros(4, 4)}, str(other / "model.safetensors"))
    with pytest.raises(MergeError, match="nothing to merge"):
        run_merge(spec_of(tmp_path, method="uniform", base_model=str(paths["base"]), sources=[str(other)]), HOST)


def test_tied_head_and_orphan_tensors_are_never_silent(tmp_path, models):
    from safetensors.torch import save_file

    paths, tensors = models
    (paths["base"] / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": True}))
    tied_base = {k: v for k, v in tensors["base"].items() if k != "lm_head.weight"}
    save_file(tied_base, str(paths["base"] / "model.safetensors"))
    with pytest.raises(MergeError, match="lm_head.weight: a source changes it, but the base ties it to "
                                         "model.embed_tokens.weight"):
        run_merge(spec_of(tmp_path, method="uniform", base_model=str(paths["base"]),
                          sources=[str(paths["ft1"])]), HOST, in_memory=True)
    (paths["base"] / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
    result = run_merge(spec_of(tmp_path, method="uniform", base_model=str(paths["base"]),
                               sources=[str(paths["ft1"])]), HOST, in_memory=True)
    assert any("lm_head.weight: left out" in w for w in result.metadata["warnings"])


def test_prepare_context_streams_the_groups_a_merge_sees(tmp_path, models):
    from mergekit_core.engine import prepare_context

    paths, tensors = models
    spec = spec_of(tmp_path, method="task_arithmetic", base_model=str(paths["base"]), method_params={"lambda": 0.7},
                   sources=[str(paths["ft1"]), str(paths["ft2"])])
    with prepare_context(spec, HOST) as (context, comps):
        assert context.host is HOST and comps.params["lambda"] == 0.7
        groups = list(context.groups())
    floats = [k for k, v in tensors["base"].items() if v.is_floating_point()]
    assert sorted(g.name for g in groups) == sorted(floats)
    for g in groups:
        assert g.coefficients == [0.7, 0.7]
        for delta, src in zip(g.tensors, ("ft1", "ft2")):
            np.testing.assert_allclose(delta.numpy(), (tensors[src][g.name] - tensors["base"][g.name]).numpy(),
                                       rtol=1e-6, atol=1e-6)


def test_finish_tells_a_prepared_method_how_the_merge_ended(tmp_path, models):
    """``MergeMethod.finish(state, error)``: once, error None after a complete merge, the
    exception after a failed one (here a method that fails on its second tensor)."""
    import torch

    from mergekit_core import MergeError, MergeMethod
    from mergekit_core.config import MergeConfig
    from mergekit_core.engine import run_merge
    from mergekit_core.testing import fresh_host

    calls = []

    class Recorder(MergeMethod):
        name = "recorder"
        needs_prepare = True
        fail_on = None

        def prepare(self, context, params):
            return {"merged": 0}

        def merge(self, group, params, state=None):
            state["merged"] += 1
            if state["merged"] == self.fail_on:
                raise MergeError(f"{group.name}: refused on purpose")
            return torch.stack(group.tensors).mean(0)

        def finish(self, state, error):
            calls.append((state["merged"], None if error is None else str(error)))
            if self.fail_finish:
                raise MergeError("cannot commit on purpose")

        fail_finish = False

    import types

    from mergekit_core import hookimpl

    method = Recorder()
    plugin = types.ModuleType("recorder_plugin")

    @hookimpl
    def mk_merge_methods():
        return [method]

    plugin.mk_merge_methods = mk_merge_methods
    paths, _ = models
    data = {"method": "recorder", "base_model": str(paths["base"]), "sources": [str(paths["ft1"]), str(paths["ft2"])],
            "output_dir": str(tmp_path / "runs")}
    result = run_merge(MergeConfig.from_dict(data).to_spec(), fresh_host({"recorder": plugin}), in_memory=True)
    assert calls == [(result.report["merged"], None)]
    calls.clear()
    method.fail_on = 2
    with pytest.raises(MergeError, match="refused on purpose"):
        run_merge(MergeConfig.from_dict(data).to_spec(), fresh_host({"recorder": plugin}), in_memory=True)
    assert len(calls) == 1 and calls[0][0] == 2 and "refused on purpose" in calls[0][1]

    # a finish that fails publishes no output: it runs before the output is swapped into place
    calls.clear()
    method.fail_on, method.fail_finish = None, True
    out = tmp_path / "merged"
    with pytest.raises(MergeError, match="cannot commit on purpose"):
        run_merge(MergeConfig.from_dict({**data, "output": {"path": str(out)}}).to_spec(),
                  fresh_host({"recorder": plugin}))
    assert len(calls) == 1 and calls[0][1] is None
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]
