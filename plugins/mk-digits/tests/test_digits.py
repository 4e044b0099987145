"""The digits benchmark: data, a (quick) pool build, the evaluator, merges in between."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
from mk_digits.build import BuildSettings, build_pool
from mk_digits.data import TASKS, num_classes, task_data

from mergekit_core import MergeMethod, hookimpl
from mergekit_core.api import MergeConfig, evaluate_merge, make_setup, run_merge
from mergekit_core.testing import fresh_host, run_mk

HOST = fresh_host(entry_points=True)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    path = tmp_path_factory.mktemp("digits") / "pool"
    meta = build_pool(path, BuildSettings.quick())
    return path, meta


def test_tasks_and_splits():
    sizes = {s: len(task_data("upright", s).y) for s in ("train", "validation", "test")}
    assert sizes == {"train": 1078, "validation": 359, "test": 360}
    for task in TASKS:
        d = task_data(task, "test")
        assert d.x.shape == (360, 64) and 0.0 <= d.x.min() and d.x.max() <= 1.0
        assert set(np.unique(d.y)) == set(range(num_classes(task)))
    up, rot = task_data("upright", "test"), task_data("rotated", "test")
    assert np.array_equal(up.y, rot.y) and not np.array_equal(up.x, rot.x)
    np.testing.assert_allclose(task_data("inverted", "test").x, 1.0 - up.x, atol=1e-6)
    np.testing.assert_array_equal(task_data("shifted", "test").x, task_data("shifted", "test").x)  # fixed


def test_finetuned_models_clearly_beat_the_pretrained_backbone(pool):
    _, meta = pool
    for task, t in meta["tasks"].items():
        assert t["finetuned_test_accuracy"] > t["zero_shot_test_accuracy"] + 0.05, task
    zero = np.mean([t["zero_shot_test_accuracy"] for t in meta["tasks"].values()])
    tuned = np.mean([t["finetuned_test_accuracy"] for t in meta["tasks"].values()])
    assert tuned > zero + 0.2
    assert all(t["lora_test_accuracy"] > t["finetuned_test_accuracy"] - 0.05 for t in meta["tasks"].values())


def test_evaluator_agrees_with_the_build_and_average_merge_is_in_between(pool, tmp_path):
    path, meta = pool
    setup = make_setup(HOST, "digits", {"pool": str(path)}, None, "test", None, tmp_path)
    spec = MergeConfig.from_dict({"sources": [str(path / t) for t in TASKS], "base_model": str(path / "base"),
                                  "method": "uniform", "output_dir": str(tmp_path)}).to_spec()
    merged = run_merge(spec, HOST, in_memory=True).state_dict
    result = evaluate_merge(setup, HOST, merged, method="uniform", sources=spec.sources, base_model=spec.base_model,
                            combo_dir=tmp_path / "combo", tag="avg")
    for task, entry in result["tasks"].items():
        assert entry["individual"] == pytest.approx(meta["tasks"][task]["finetuned_test_accuracy"], abs=1e-6)
    merged_mean = result["summary"]["mean_metric"]
    zero = np.mean([t["zero_shot_test_accuracy"] for t in meta["tasks"].values()])
    tuned = np.mean([t["finetuned_test_accuracy"] for t in meta["tasks"].values()])
    assert zero < merged_mean < tuned


def test_lora_adapters_merge_through_the_engine(pool, tmp_path):
    path, _ = pool
    spec = MergeConfig.from_dict({"sources": [str(path / "lora" / t) for t in ("upright", "parity")],
                                  "base_model": str(path / "base"), "method": "task_arithmetic",
                                  "method_params": {"lambda": 1.0}, "output": {"path": str(tmp_path / "ad")},
                                  "output_dir": str(tmp_path)}).to_spec()
    result = run_merge(spec, HOST)
    assert result.output_kind == "adapter" and result.report["energy_kept"] == 1.0


def test_unlabeled_batches_and_forward(pool):

    path, _ = pool
    ev = HOST.get("evaluator", "digits")
    params = ev.resolve_params({"pool": str(path), "batch_size": 100})
    batches = list(ev.unlabeled_batches("noisy", "validation", params))
    assert [len(b) for b in batches] == [100, 100, 100, 59]
    from safetensors.torch import load_file

    state = {k: v.requires_grad_() for k, v in load_file(str(path / "noisy" / "model.safetensors")).items()}
    logits = ev.forward(state, "noisy", batches[0], params)
    assert logits.shape == (100, 10)
    logits.sum().backward()
    assert state["embed.weight"].grad is not None


def test_build_command_and_bad_pool(tmp_path, pool):
    result = run_mk(["digits", "build", "--out", str(tmp_path / "p"), "--quick"], host=HOST)
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "p" / "pool.json").read_text())["settings"]["pretrain_steps"] == 400
    again = build_pool(tmp_path / "p", BuildSettings.quick())  # reused: same settings
    assert again == json.loads((tmp_path / "p" / "pool.json").read_text())
    ev = HOST.get("evaluator", "digits")
    with pytest.raises(Exception, match="not a digits pool"):
        ev.evaluate({}, "upright", "test", None, {"pool": str(tmp_path), "batch_size": 1})


def test_ready_sweep_config_runs(pool, tmp_path):
    from pathlib import Path

    from mergekit_core.api import load_merge_config, run_sweep

    path, _ = pool
    cfg = load_merge_config(Path(__file__).resolve().parents[3] / "configs" / "sweep_digits.yaml")
    cfg = cfg.with_overrides({"sources_root": str(path), "base_model": str(path / "base"),
                              "evaluator_params": {"pool": str(path)}, "output_dir": str(tmp_path)})
    result = run_sweep(cfg, HOST)
    assert len(result["points"]) == 8 and result["best"]["score"] is not None
    assert all(r["metrics"] for r in result["points"])


class ListMethod(MergeMethod):
    """A third-party method that breaks the contract: it returns a list."""

    name = "returns_a_list"
    description = "broken on purpose"

    def merge(self, group, params, state=None):
        return [x.tolist() for x in group.tensors]


broken_plugin = types.ModuleType("broken_plugin")
broken_plugin.mk_merge_methods = hookimpl(lambda: [ListMethod()])
broken_plugin.mk_merge_methods.__name__ = "mk_merge_methods"


def test_demo_table(tmp_path):
    from mk_digits.benchmark import print_table, run_benchmark, write_outputs

    host = fresh_host({"broken": broken_plugin}, entry_points=True)
    report = run_benchmark(tmp_path, host, quick=True, log=lambda m: None)
    failed = next(r for r in report["rows"] if r["method"] == "returns_a_list")
    assert "returned a list for tensor" in failed["error"] and "not a torch.Tensor" in failed["error"]
    names = [r["method"] for r in report["rows"]]
    assert names[0].startswith("zero-shot") and names[1].startswith("fine-tuned")
    assert "uniform" in names and "ties" in names and any("sweep" in n for n in names)
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["zero-shot (pretrained backbone)"]["mean_accuracy"] < rows["uniform"]["mean_accuracy"]
    assert rows["uniform"]["mean_accuracy"] < rows["fine-tuned, one model per task (ceiling)"]["mean_accuracy"]
    paths = write_outputs(report, tmp_path / "out")
    assert json.loads(paths[0].read_text())["rows"][0]["method"] == names[0]
    print_table(report)
