"""AdaMerging against small references, on a quick digits pool (real backbones, real adapters)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from mk_adamerging.coefficients import effective
from mk_adamerging.objective import draw
from mk_adamerging.optimizer import AdaMerging
from mk_adamerging.train import setup_problem
from mk_digits.build import BuildSettings, build_pool

from mergekit_core import Evaluator, Param, TaskInfo, hookimpl
from mergekit_core.api import (
    MergeConfig,
    optimize_and_merge,
    optimizer_context,
    run_merge,
)
from mergekit_core.testing import fresh_host, run_mk

HOST = fresh_host(entry_points=True)
TASKS = ["upright", "rotated", "parity"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("digits") / "pool"
    build_pool(path, BuildSettings.quick())
    return path


def config(pool: Path, tmp_path: Path, lora: bool = False, **optimizer) -> dict:
    root = pool / "lora" if lora else pool
    return {"sources": [str(root / t) for t in TASKS], "base_model": str(pool / "base"),
            "method": "task_arithmetic", "optimizer": {"name": "adamerging", "params": optimizer},
            "evaluator": "digits", "evaluator_params": {"pool": str(pool)}, "eval_tasks": TASKS,
            "output_dir": str(tmp_path / "runs"), "output": {"kind": "model"}}


def problem_for(data: dict, host=HOST):
    """The AdaMerging problem of a config, in the context mk merge builds, and fixed batches."""
    with optimizer_context(MergeConfig.from_dict(data).to_spec(), host) as (context, optimizer, params):
        optimizer.check(context, params)
        merged = context.plan.by_action("merge")
        names = [t.name for t in merged]
        problem, lam, labels, _ = setup_problem(context, params, names, {t.name: t.layer for t in merged})
    g = torch.Generator().manual_seed(0)
    batches = [draw(d, 16, 1, g) for d in problem.data]
    return problem, lam, batches, names, labels


def loss_and_grad(problem, lam, batches):
    lam = lam.detach().clone().requires_grad_(True)
    loss, _ = problem.loss_and_grad(lam, batches)
    return loss, lam.grad.detach().clone()


def test_gradient_matches_finite_differences(pool, tmp_path):
    problem, lam, batches, _, _ = problem_for(config(pool, tmp_path, granularity="block", steps=1))
    loss, grad = loss_and_grad(problem, lam, batches)
    assert grad.shape == lam.shape and grad.abs().sum() > 0
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # directional derivatives along random directions
        v = torch.randn(lam.shape, generator=g)
        v /= v.norm()
        eps = 2e-3
        up, _ = problem.loss_and_grad((lam + eps * v).detach(), batches)
        down, _ = problem.loss_and_grad((lam - eps * v).detach(), batches)
        assert (up - down) / (2 * eps) == pytest.approx(float((grad * v).sum()), rel=3e-2, abs=2e-3)


def test_streaming_and_legacy_implementations_agree(pool, tmp_path):
    a, lam, batches, _, _ = problem_for(config(pool, tmp_path, granularity="layer", steps=1))
    b, _, _, _, _ = problem_for(config(pool, tmp_path, granularity="layer", steps=1,
                                       merge_impl="functional_clone_legacy"))
    lam = lam.detach() + 0.05 * torch.randn(lam.shape, generator=torch.Generator().manual_seed(2))
    la, ga = loss_and_grad(a, lam, batches)
    lb, gb = loss_and_grad(b, lam, batches)
    assert la == pytest.approx(lb, rel=1e-5)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)


def test_lora_sources_stay_factored_and_give_the_dense_loss_and_gradient(pool, tmp_path):
    factored, lam, batches, _, _ = problem_for(config(pool, tmp_path, lora=True, steps=1))
    dense, _, _, _, _ = problem_for(config(pool, tmp_path, lora=True, steps=1, factored=False))
    from mergekit_core.api import LowRankDelta

    kinds = {type(d) for e in factored.entries for d in e.deltas}
    assert LowRankDelta in kinds  # the adapted linear weights are kept as B, A
    assert all(not isinstance(d, LowRankDelta) for e in dense.entries for d in e.deltas)
    assert (sum(e.nbytes() for e in factored.entries) < 0.8 * sum(e.nbytes() for e in dense.entries))
    lam = lam.detach() + 0.1 * torch.rand(lam.shape, generator=torch.Generator().manual_seed(3))
    lf, gf = loss_and_grad(factored, lam, batches)
    ld, gd = loss_and_grad(dense, lam, batches)
    assert lf == pytest.approx(ld, rel=1e-5)
    torch.testing.assert_close(gf, gd, rtol=1e-3, atol=1e-5)


def test_layer_granularity_with_equal_coefficients_is_the_task_granularity(pool, tmp_path):
    task, lam_t, batches, _, _ = problem_for(config(pool, tmp_path, granularity="task", steps=1))
    layer, lam_l, _, _, _ = problem_for(config(pool, tmp_path, granularity="layer", steps=1))
    values = torch.tensor([0.2, 0.45, 0.7])
    lt, gt = loss_and_grad(task, values.view(-1, 1), batches)
    ll, gl = loss_and_grad(layer, values.view(-1, 1).expand_as(lam_l), batches)
    assert lt == pytest.approx(ll, rel=1e-6)
    torch.testing.assert_close(gl.sum(1, keepdim=True), gt, rtol=1e-4, atol=1e-6)  # chain rule


@pytest.mark.parametrize("granularity", ["task", "block", "layer"])
def test_zero_steps_is_task_arithmetic_at_the_initial_value_bit_for_bit(pool, tmp_path, granularity):
    data = config(pool, tmp_path, granularity=granularity, steps=0)
    ada = optimize_and_merge(MergeConfig.from_dict(data).to_spec(), HOST, in_memory=True, write_bundle=False)
    plain = {k: v for k, v in data.items() if k != "optimizer"}
    ref = run_merge(MergeConfig.from_dict({**plain, "method_params": {"lambda": 0.3}}).to_spec(), HOST,
                    in_memory=True, write_bundle=False)
    assert ada.state_dict.keys() == ref.state_dict.keys()
    for name, tensor in ref.state_dict.items():
        assert torch.equal(ada.state_dict[name], tensor), name


def test_adaptation_lowers_the_loss_and_saved_weights_reproduce_the_merge_in_a_new_process(pool, tmp_path):
    data = config(pool, tmp_path, granularity="layer", steps=12, lr=0.02, objective="cross_entropy")
    path = tmp_path / "ada.yaml"
    path.write_text(yaml.safe_dump(data))
    first = run_mk(["merge", str(path), "--out", str(tmp_path / "a"), "--json"], host=HOST)
    assert first.exit_code == 0, first.stderr
    summary = json.loads(first.stdout)
    report = summary["optimizer"]["report"]
    assert report["loss_last"] < report["loss_first"]
    bundle = Path(summary["run_dir"])
    curve = json.loads((bundle / "adamerging_loss.json").read_text())["curve"]
    assert len(curve) == 12 and curve[0]["loss"] == report["loss_first"]
    values = json.loads((bundle / "adamerging_values.json").read_text())["values"]
    assert len(values) == len(TASKS) * summary["merged"] and len(set(values.values())) > len(TASKS)

    again = dict(data, optimizer={"name": "adamerging", "params": {"granularity": "layer",
                                                                    "weights": str(bundle / "adamerging_values.json")}})
    again_path = tmp_path / "again.yaml"
    again_path.write_text(yaml.safe_dump(again))
    table = {k: v for k, v in data.items() if k != "optimizer"}
    table["lambda_policy"] = {"name": "per_tensor", "params": {"table": str(bundle / "lambdas.json")}}
    table_path = tmp_path / "table.yaml"
    table_path.write_text(yaml.safe_dump(table))
    for name, cfg in (("b", again_path), ("c", table_path)):
        done = subprocess.run([sys.executable, "-m", "mergekit_core", "merge", str(cfg), "--out", str(tmp_path / name)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr

    def digest(out: str) -> str:  # the tensors' bytes (the header records each run's own config)
        from safetensors.torch import load_file

        tensors = load_file(tmp_path / out / "model.safetensors")
        h = hashlib.sha256()
        for name in sorted(tensors):
            h.update(name.encode() + tensors[name].numpy().tobytes())
        return h.hexdigest()

    assert digest("a") == digest("b") == digest("c")


def _reference_ties_split(deltas: list[torch.Tensor], k: float) -> list[torch.Tensor]:
    """Readable AdaMerging++ split of whole flattened task vectors (the official
    ``ties_merging_split``): top-k% per task, sign of the sum, keep agreeing entries."""
    flat = torch.stack(deltas)
    kept = []
    for row in flat:
        m = int(k / 100 * row.numel())
        threshold = row.abs().sort(descending=True).values[m - 1]
        kept.append(row * (row.abs() >= threshold))
    kept = torch.stack(kept)
    sign = torch.sign(kept.sum(0))
    return [torch.where(torch.sign(r) == sign, r, torch.zeros_like(r)) for r in kept]


def test_adamerging_plus_learns_on_the_ties_processed_task_vectors(pool, tmp_path):
    plain, _, _, names, _ = problem_for(config(pool, tmp_path, steps=1))
    plus, _, _, _, _ = problem_for(config(pool, tmp_path, steps=1, plus=True, plus_k=20))
    sizes = [e.base.numel() for e in plain.entries]
    whole = [torch.cat([e.deltas[t].float().reshape(-1) for e in plain.entries]) for t in range(len(TASKS))]
    expected = _reference_ties_split(whole, 20)
    for t in range(len(TASKS)):
        got = torch.cat([e.deltas[t].float().reshape(-1) for e in plus.entries])
        torch.testing.assert_close(got, expected[t])
        assert 0.15 < float((got != 0).float().mean()) <= 0.2
    assert sum(sizes) == whole[0].numel()


class NoForward(Evaluator):
    name = "no_forward"
    description = "scores without a forward pass"
    params = (Param("pool", None, "unused", type=str),)

    def tasks(self, params):
        return [TaskInfo(t, "accuracy") for t in TASKS]

    def evaluate(self, model, task, split, subset, params):
        return {"accuracy": 0.5}


class NanLogits(Evaluator):
    name = "nan_logits"
    description = "a forward that returns NaN"
    params = (Param("pool", None, "unused", type=str),)

    def tasks(self, params):
        return [TaskInfo(t, "accuracy") for t in TASKS]

    def unlabeled_batches(self, task, split, params):
        yield torch.zeros(4, 64)

    def forward(self, model, task, inputs, params):
        w = next(iter(v for k, v in model.items() if k.endswith("weight")))
        return torch.full((inputs.shape[0], 3), float("nan")) * w.sum()


def _host_with_toys():
    plugin = types.ModuleType("toy_evaluators")
    plugin.mk_evaluators = hookimpl(lambda: [NoForward(), NanLogits()])
    plugin.mk_evaluators.__name__ = "mk_evaluators"
    host = fresh_host({"toys": plugin}, entry_points=True)
    return host


@pytest.mark.parametrize(("change", "expected"), [
    ({"evaluator": "no_forward"}, "needs evaluator no_forward to implement forward()"),
    ({"method": "ties"}, "method ties is not that merge"),
    ({"optimizer": {"name": "adamerging", "params": {"tasks": ["upright", "cursive"]}}}, "unknown task 'cursive'"),
    ({"evaluator": "nan_logits", "optimizer": {"name": "adamerging", "params": {"steps": 3}}}, "the loss is nan at step 1"),
    ({"lambda_policy": "per_task"}, "learns the values of lambda policy per_tensor"),
    ({"optimizer": {"name": "adamerging", "params": {"objective": "cross_entropy", "split": "dev"}}},
     "unknown split 'dev'"),
])
def test_bad_input_is_one_line_a_non_zero_exit_and_no_output(pool, tmp_path, change, expected):
    data = {**config(pool, tmp_path, steps=2), **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    result = run_mk(["merge", str(path), "--out", str(out)], host=_host_with_toys())
    assert result.exit_code != 0
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_weights_for_another_merge_are_refused_naming_what_differs(pool, tmp_path):
    data = config(pool, tmp_path, steps=0)
    result = optimize_and_merge(MergeConfig.from_dict(data).to_spec(), HOST, in_memory=True)
    saved = json.loads((result.run_dir / "adamerging_values.json").read_text())
    cases = {
        "tensors": ({**saved, "tensors": saved["tensors"][:-1] + ["blocks.9.fc1.weight"]}, "blocks.9.fc1.weight"),
        "sources": ({**saved, "sources": ["upright", "rotated", "mod3"]}, "learned for sources"),
        "granularity": ({**saved, "granularity": "task"}, "set granularity: task"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(content))
        bad = dict(data, optimizer={"name": "adamerging", "params": {"weights": str(path)}})
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(bad))
        run = run_mk(["merge", str(cfg), "--out", str(tmp_path / f"out_{name}")], host=HOST)
        assert run.exit_code == 2 and expected in run.stderr, (name, run.stderr)
        assert not (tmp_path / f"out_{name}").exists()


def test_the_learned_values_are_clamped_and_the_component_declares_its_policy():
    comp = AdaMerging()
    assert comp.lambda_policy(comp.resolve_params({"granularity": "block"})) == "per_task_layer"
    raw = torch.tensor([[-0.5, 0.3, 1.7]])
    assert effective(raw, clamp=True, normalize=False).tolist() == [[0.0, pytest.approx(0.3), 1.0]]
    assert torch.allclose(effective(torch.zeros(3, 2), clamp=True, normalize=True), torch.full((3, 2), 1 / 3))


def test_the_example_config_runs_on_a_pool(pool, tmp_path):
    shipped = yaml.safe_load((Path(__file__).resolve().parents[3] / "configs" /
                              "merge_adamerging_digits.yaml").read_text())
    assert shipped["optimizer"]["name"] == "adamerging"
    shipped.update(sources_root=str(pool), base_model=str(pool / "base"), output_dir=str(tmp_path / "runs"),
                   evaluator_params={"pool": str(pool)})
    shipped["optimizer"]["params"]["steps"] = 2
    path = tmp_path / "example.yaml"
    path.write_text(yaml.safe_dump(shipped))
    result = run_mk(["merge", str(path), "--out", str(tmp_path / "merged"), "--eval-tasks", "upright", "--json"],
                    host=HOST)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["optimizer"]["report"]["steps"] == 2 and summary["evaluation"]["tasks"]["upright"]["value"] > 0.3


def test_the_docs_page_names_every_parameter():
    page = (Path(__file__).resolve().parents[3] / "docs" / "plugins" / "mk-adamerging.md").read_text()
    missing = [p.name for p in AdaMerging.params if f"`{p.name}`" not in page]
    assert missing == []


def test_run_merge_alone_says_to_use_optimize_and_merge(pool, tmp_path):
    from mergekit_core import PluginError

    data = {**config(pool, tmp_path, steps=1, granularity="task"), "lambda_policy": "per_task"}
    with pytest.raises(PluginError, match="optimize_and_merge"):
        run_merge(MergeConfig.from_dict(data).to_spec(), HOST, in_memory=True, write_bundle=False)


def test_adamerging_plus_writes_the_merge_of_the_ties_processed_vectors(pool, tmp_path):
    data = config(pool, tmp_path, steps=0, granularity="task", plus=True, plus_k=20)
    result = optimize_and_merge(MergeConfig.from_dict(data).to_spec(), HOST, in_memory=True, write_bundle=False)
    assert result.method == "ties" and result.params["aggregate"] == "sum"
    plain = run_merge(MergeConfig.from_dict({**{k: v for k, v in data.items() if k != "optimizer"},
                                             "method_params": {"lambda": 0.3}}).to_spec(), HOST,
                      in_memory=True, write_bundle=False).state_dict
    from safetensors.torch import load_file

    base = load_file(pool / "base" / "model.safetensors")
    sources = [load_file(pool / t / "model.safetensors") for t in TASKS]
    names = [n for n in base if any(not torch.equal(s[n], base[n]) for s in sources)]
    whole = [torch.cat([(s[n].float() - base[n].float()).reshape(-1) for n in names]) for s in sources]
    split = _reference_ties_split(whole, 20)
    merged = sum(0.3 * v for v in split)
    offset = 0
    differs = False
    for n in names:
        size = base[n].numel()
        expected = base[n].float() + merged[offset:offset + size].reshape(base[n].shape)
        torch.testing.assert_close(result.state_dict[n].float(), expected, rtol=1e-5, atol=1e-6)
        differs |= not torch.allclose(result.state_dict[n].float(), plain[n].float())
        offset += size
    assert differs  # not the plain task arithmetic of the untrimmed vectors


def test_a_table_that_misses_a_tensor_is_refused_unless_a_fallback_is_given(pool, tmp_path):
    data = config(pool, tmp_path, steps=0)
    result = optimize_and_merge(MergeConfig.from_dict(data).to_spec(), HOST, in_memory=True)
    table = json.loads((result.run_dir / "lambdas.json").read_text())
    dropped = sorted(table["tensors"])[0]
    del table["tensors"][dropped]
    (tmp_path / "cfg").mkdir()
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "partial.json").write_text(json.dumps(table))
    plain = {k: v for k, v in data.items() if k != "optimizer"}
    for params, ok in (({}, False), ({"fallback": 0.3}, True)):
        cfg = {**plain, "lambda_policy": {"name": "per_tensor",
                                          "params": {"table": "../tables/partial.json", **params}}}
        path = tmp_path / "cfg" / "t.yaml"  # the table's path is relative to the config file
        path.write_text(yaml.safe_dump(cfg))
        out = tmp_path / f"out_{ok}"
        run = run_mk(["merge", str(path), "--out", str(out)], host=HOST)
        assert (run.exit_code == 0) == ok, run.stderr
        if not ok:
            assert dropped in run.stderr and "fallback" in run.stderr and not out.exists()


@pytest.mark.parametrize(("params", "expected"), [
    ({"weights": "/nonexistent/adamerging_values.json"}, "cannot read the AdaMerging weights"),
    ({"tasks": ["uprigth"]}, "did you mean 'upright'"),
    ({"tasks": []}, "'tasks' is empty"),
])
def test_the_dry_run_runs_the_optimizers_checks(pool, tmp_path, params, expected):
    path = tmp_path / "dry.yaml"
    path.write_text(yaml.safe_dump(config(pool, tmp_path, **params)))
    run = run_mk(["merge", str(path), "--dry-run"], host=HOST)
    assert run.exit_code == 2 and expected in run.stderr, run.stderr


def test_non_finite_saved_values_and_sources_are_named(pool, tmp_path):
    from safetensors.torch import load_file, save_file

    data = config(pool, tmp_path, steps=0)
    result = optimize_and_merge(MergeConfig.from_dict(data).to_spec(), HOST, in_memory=True)
    saved = json.loads((result.run_dir / "adamerging_values.json").read_text())
    first = next(iter(saved["values"]))
    text = json.dumps(saved).replace(f'"{first}": {saved["values"][first]}', f'"{first}": NaN')
    (tmp_path / "nan.json").write_text(text)
    bad = dict(data, optimizer={"name": "adamerging", "params": {"weights": str(tmp_path / "nan.json")}})
    with pytest.raises(Exception, match="finite numbers"):
        optimize_and_merge(MergeConfig.from_dict(bad).to_spec(), HOST, in_memory=True)

    import shutil

    broken = tmp_path / "rotated"
    shutil.copytree(pool / "rotated", broken)
    tensors = load_file(broken / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    save_file(tensors, broken / "model.safetensors")
    nan_source = dict(config(pool, tmp_path, steps=2, granularity="task"))
    nan_source["sources"] = [str(pool / "upright"), str(broken), str(pool / "parity")]
    from mergekit_core import MergeError

    with pytest.raises(MergeError, match=f"tensor {name} of source rotated holds NaN"):
        optimize_and_merge(MergeConfig.from_dict(nan_source).to_spec(), HOST, in_memory=True)
