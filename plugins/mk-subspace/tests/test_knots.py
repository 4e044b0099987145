"""KnOTS against a float64 reference written from the paper and its official code, and through the engine."""

from __future__ import annotations

import numpy as np
import pytest
import subspace_reference as ref
import torch
from mk_subspace.methods import Knots
from safetensors.torch import load_file

from mergekit_core import ParameterError, TensorGroup
from mergekit_core.api import MergeConfig, run_merge
from mergekit_core.testing import StaticPrepareContext, check_merge_method, fresh_host

HOST = fresh_host(entry_points=True)
SHAPES = {"a.q_proj.weight": (10, 8), "a.v_proj.weight": (6, 8), "b.q_proj.weight": (10, 8)}


def lora_like(seed, count=3, rank=3):
    rng = np.random.default_rng(seed)
    return {n: [rng.standard_normal((s[0], rank)) @ rng.standard_normal((rank, s[1])) * 0.1 for _ in range(count)]
            for n, s in SHAPES.items()}


def groups(tasks, coefficients, names=None):
    return [TensorGroup(name=n, layer=0, base=None, tensors=[torch.from_numpy(a) for a in mats],
                        coefficients=list(coefficients)) for n, mats in tasks.items() if names is None or n in names]


def run(method, tasks, coefficients, **params):
    resolved = method.resolve_params(params)
    state = method.prepare(StaticPrepareContext(groups(tasks, coefficients)), resolved)
    return {g.name: method.merge(g, resolved, state).numpy() for g in groups(tasks, coefficients)}


@pytest.mark.parametrize("params", [{}, {"trim_scope": "tensor", "k": 100.0, "p": 0.1}])
def test_contract(params):
    check_merge_method(Knots(), params)


@pytest.mark.parametrize("scope", ["model", "tensor"])
@pytest.mark.parametrize("k", [30.0, 100.0])
def test_knots_ties_equals_the_reference(scope, k):
    tasks = lora_like(0)
    coefficients = [0.6, 0.9, 0.3]
    got = run(Knots(), tasks, coefficients, k=k, trim_scope=scope)
    expected = ref.knots(tasks, k / 100, coefficients, scope)
    for n in SHAPES:
        np.testing.assert_allclose(got[n], expected[n], rtol=1e-10, atol=1e-12, err_msg=n)


def test_model_scope_differs_from_tensor_scope():
    tasks = lora_like(1)
    model, tensor = (run(Knots(), tasks, [1.0] * 3, k=30.0, trim_scope=s) for s in ("model", "tensor"))
    assert any(not np.allclose(model[n], tensor[n]) for n in SHAPES)


def test_single_source_keeping_everything_is_its_update():
    tasks = {n: m[:1] for n, m in lora_like(2).items()}
    got = run(Knots(), tasks, [0.7], k=100.0)
    for n in SHAPES:
        np.testing.assert_allclose(got[n], 0.7 * tasks[n][0], rtol=1e-10, atol=1e-12)


def test_dare_drops_coordinates_with_the_seeded_draw():
    tasks = lora_like(3)
    got = run(Knots(), tasks, [1.0] * 3, k=100.0, p=0.25, trim_scope="tensor")
    redrawn = {}
    for n, mats in tasks.items():
        u, s, vh = np.linalg.svd(np.concatenate(mats, 1), full_matrices=False)
        keep = s > 1e-5
        reps = [s[keep, None] * v for v in np.split(vh[keep], 3, 1)]
        dropped = []
        for t, r in enumerate(reps):
            draw = torch.rand(r.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64).numpy()
            dropped.append(r * (draw >= 0.25) / 0.75)
        kept = np.stack(dropped)
        elected = np.sign(kept.sum(0))
        agree = (np.sign(kept) == elected) & (kept != 0)
        redrawn[n] = u[:, keep] @ ((kept * agree).sum(0) / np.maximum(agree.sum(0), 1))
    for n in SHAPES:
        # the SVD's signs are arbitrary per component, so compare the products, not the coordinates
        np.testing.assert_allclose(got[n], redrawn[n], rtol=1e-9, atol=1e-12)


def test_all_zero_updates_and_vectors():
    tasks = {"a.q_proj.weight": [np.zeros((5, 4))] * 2}
    assert not run(Knots(), tasks, [1.0, 1.0])["a.q_proj.weight"].any()
    group = TensorGroup("norm.weight", None, None, [torch.ones(4), torch.zeros(4)], [0.5, 0.5])
    resolved = Knots().resolve_params({})
    np.testing.assert_allclose(Knots().merge(group, resolved, None).numpy(), 0.25 * np.ones(4))


def test_p_one_is_refused():
    with pytest.raises(ParameterError, match="drops every coordinate"):
        Knots().resolve_params({"p": 1.0})


ADAPTER_MODULES = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.0.self_attn.v_proj": (4, 8),
                   "model.layers.1.self_attn.q_proj": (8, 8)}


def write_lora(path, rank, alpha, rslora, seed):
    """A PEFT LoRA adapter on ADAPTER_MODULES; returns each module's dense update s B A (float64)."""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    scale = alpha / (rank ** 0.5 if rslora else rank)
    for module, (out_dim, in_dim) in ADAPTER_MODULES.items():
        a, b = torch.randn(rank, in_dim, generator=g) * 0.1, torch.randn(out_dim, rank, generator=g) * 0.1
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        deltas[module] = scale * b.double().numpy() @ a.double().numpy()
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
        "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}))
    return deltas


def test_lora_adapters_merge_into_an_adapter_that_holds_the_result_exactly(tmp_path):
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    (tmp_path / "base").mkdir()
    save_file({**{f"{m}.weight": torch.from_numpy(rng.standard_normal(s).astype(np.float32))
                  for m, s in ADAPTER_MODULES.items()}, "model.norm.weight": torch.ones(8)},
              str(tmp_path / "base" / "model.safetensors"))
    first = write_lora(tmp_path / "lora_a", 3, 6, False, seed=1)
    second = write_lora(tmp_path / "lora_b", 2, 4, True, seed=2)
    out = tmp_path / "merged"
    spec = MergeConfig.from_dict({
        "method": "knots", "base_model": str(tmp_path / "base"),
        "sources": [str(tmp_path / "lora_a"), str(tmp_path / "lora_b")],
        "method_params": {"k": 40.0, "lambda": 0.8},
        "output": {"path": str(out), "kind": "adapter", "adapter_rank": 5}, "output_dir": str(tmp_path / "art"),
    }).to_spec()
    run_merge(spec, HOST)
    written = load_file(str(out / "adapter_model.safetensors"))
    tasks = {m: [first[m].astype(np.float32).astype(np.float64), second[m].astype(np.float32).astype(np.float64)]
             for m in ADAPTER_MODULES}
    expected = ref.knots(tasks, 0.4, [0.8, 0.8])
    for m in ADAPTER_MODULES:
        got = (written[f"base_model.model.{m}.lora_B.weight"].double() @
               written[f"base_model.model.{m}.lora_A.weight"].double()).numpy()
        assert np.linalg.matrix_rank(expected[m]) <= 5  # rank <= 3 + 2: the adapter holds it exactly
        np.testing.assert_allclose(got, expected[m], rtol=1e-4, atol=1e-6, err_msg=m)
