"""The digits benchmark: data, a (quick) pool build, the evaluator, merges in between."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mk_digits.build import BENCHMARK_VERSION, BuildSettings, build_pool
from mk_digits.data import TASKS, num_classes, task_data

from mergekit_core import FormatError
from mergekit_core.api import MergeConfig, evaluate_merge, make_setup, run_merge
from mergekit_core.testing import fresh_host, run_mk

HOST = fresh_host(entry_points=True)


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
    import torch

    threads = torch.get_num_threads()
    result = run_mk(["digits", "build", "--out", str(tmp_path / "p"), "--quick"], host=HOST)
    assert result.exit_code == 0, result.stderr
    assert torch.get_num_threads() == threads  # one thread while building, then restored
    meta_path = tmp_path / "p" / "pool.json"
    assert json.loads(meta_path.read_text())["settings"]["pretrain_steps"] == 400
    again = build_pool(tmp_path / "p", BuildSettings.quick())  # reused: same settings
    assert again == json.loads(meta_path.read_text()) and again["benchmark_version"] == BENCHMARK_VERSION
    ev = HOST.get("evaluator", "digits")
    with pytest.raises(Exception, match="not a digits pool"):
        ev.evaluate({}, "upright", "test", None, {"pool": str(tmp_path), "batch_size": 1})


def test_a_pool_of_another_benchmark_version_is_refused_or_rebuilt(tmp_path):
    """Never mixed in: the evaluator refuses a version-1 pool (heads that centred the features)
    with one line, and the builder rebuilds it even though its settings match."""
    tiny = BuildSettings(pretrain_steps=20, finetune_steps=5)
    first = build_pool(tmp_path / "v", tiny)
    meta_path = tmp_path / "v" / "pool.json"
    old = json.loads(meta_path.read_text())
    del old["benchmark_version"]  # pools from before versioning
    meta_path.write_text(json.dumps(old))
    ev = HOST.get("evaluator", "digits")
    params = {"pool": str(tmp_path / "v"), "batch_size": 1}
    with pytest.raises(FormatError, match="benchmark version 1.*rebuild it with 'mk digits build --out"):
        ev.evaluate(str(tmp_path / "v" / "upright"), "upright", "test", None, params)
    logged = []
    rebuilt = build_pool(tmp_path / "v", tiny, log=logged.append)
    assert any("benchmark version 1, rebuilding it" in m for m in logged)
    assert rebuilt["benchmark_version"] == BENCHMARK_VERSION and rebuilt["settings"] == first["settings"]
    assert ev.evaluate(str(tmp_path / "v" / "upright"), "upright", "test", None, params)["samples"] == 360


def test_head_scores_cosine_to_centred_prototypes_without_centring_features():
    import torch
    from mk_digits.model import LOGIT_SCALE, head_logits, make_head

    g = torch.Generator().manual_seed(0)
    features = torch.randn(60, 64, generator=g) + 3.0  # far from the origin: centring would matter
    labels = torch.arange(60) % 3
    head = make_head(features, labels, 3)
    f, y = features.double().numpy(), labels.numpy()
    means = np.stack([f[y == c].mean(0) for c in range(3)])
    protos = means - means.mean(0)
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    np.testing.assert_allclose(head["prototypes"].double().numpy(), protos, atol=1e-5)
    x = torch.randn(5, 64, generator=g) + 3.0
    xn = x.double().numpy() / np.linalg.norm(x.double().numpy(), axis=1, keepdims=True)
    np.testing.assert_allclose(head_logits(x, head).double().numpy(), LOGIT_SCALE * xn @ protos.T, atol=1e-4)
    assert set(head) == {"prototypes", "scale"}


def test_shifted_images_are_moved_by_an_offset_of_the_rule_with_zero_fill():
    from mk_digits.data import SHIFT, SHIFTS, task_views

    up, _ = task_views("upright")
    shifted, _ = task_views("shifted")
    assert SHIFTS[SHIFT] and all(1 <= max(abs(dy), abs(dx)) <= 2 for dy, dx in SHIFTS[SHIFT])

    def moved(img, dy, dx):
        out = np.zeros_like(img)
        for i in range(8):
            for j in range(8):
                if 0 <= i - dy < 8 and 0 <= j - dx < 8:
                    out[i, j] = img[i - dy, j - dx]
        return out

    used = set()
    for k in range(0, 1797, 37):
        hits = [o for o in SHIFTS[SHIFT] if np.array_equal(moved(up[k], *o), shifted[k])]
        assert hits, k
        used.update(hits)
    assert len(used) == len(SHIFTS[SHIFT])  # every offset of the rule is drawn


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


def test_a_missing_pool_stops_mk_merge_eval_before_anything_is_written(pool, tmp_path):
    path, _ = pool
    out = tmp_path / "merged"
    result = run_mk(["merge", "--method", "task_arithmetic", "--base", str(path / "base"), "--sources",
                     str(path / "upright"), str(path / "rotated"), "--out", str(out), "--output-dir",
                     str(tmp_path / "runs"), "--eval-tasks", "upright", "--evaluator", "digits",
                     "--eval-param", f"pool={tmp_path / 'no-pool'}"], host=HOST)
    assert result.exit_code != 0 and "not a digits pool" in result.stderr, result.stderr
    assert not out.exists() and not (tmp_path / "runs").exists()
