"""`mk merge --method svd_hybrid` and `mk svd-hybrid` on the digits pool, and refused artifacts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_core.api import sha256_file
from mergekit_core.testing import run_mk


def _sources(pool: Path, tasks: list[str]) -> list[str]:
    return [str(pool / t) for t in tasks]


def _compress(host, pool: Path, tasks: list[str], out: Path, *params: str) -> dict:
    args = ["svd-hybrid", "compress", "--base", str(pool / "base"), "--out", str(out), "--json"]
    for s in _sources(pool, tasks):
        args += ["-s", s]
    for p in params:
        args += ["-p", p]
    result = run_mk(args, host=host)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_merge_then_reconstruct_in_a_new_process_without_the_sources(pool, tasks, host, tmp_path):
    artifact, merged = tmp_path / "artifact", tmp_path / "merged"
    result = run_mk(["merge", "--method", "svd_hybrid", "--base", str(pool / "base"), "--sources",
                     *_sources(pool, tasks), "--param", f"artifact_dir={artifact}", "--out", str(merged),
                     "--output-dir", str(tmp_path / "runs"), "--quiet"], host=host)
    assert result.exit_code == 0, result.stderr
    for t in tasks:  # the artifact alone must do
        shutil.rmtree(pool / t)
    rebuilt = tmp_path / "rebuilt"
    proc = subprocess.run([sys.executable, "-m", "mergekit_core", "svd-hybrid", "reconstruct", str(artifact),
                           "--base", str(pool / "base"), "--out", str(rebuilt), "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    a, b = load_file(str(merged / "model.safetensors")), load_file(str(rebuilt / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert (rebuilt / "config.json").is_file()
    base = load_file(str(pool / "base" / "model.safetensors"))
    assert any(not torch.equal(a[n], base[n]) for n in a)

    diagnostics = json.loads((artifact / "diagnostics.json").read_text())
    overall = diagnostics["overall"]
    assert overall["compression_ratio"] > 1 and set(overall["relative_error"]) == set(tasks)
    matrix = next(e for e in diagnostics["tensors"].values() if e["kind"] == "matrix")
    assert 0 < matrix["mean_relative_error"] < 1 and matrix["compression_ratio"] > 1 and matrix["rank"][0] > 0
    assert sum(diagnostics["coefficient_histograms"]["counts"]["fp16"]) > 0


def test_a_task_model_rebuilt_from_the_artifact_keeps_its_accuracy(pool, tasks, host, tmp_path):
    from mk_digits.scoring import evaluate

    artifact = tmp_path / "artifact"
    _compress(host, pool, tasks, artifact)
    meta = json.loads((pool / "pool.json").read_text())
    for task in ("upright", "parity"):
        out = tmp_path / task
        result = run_mk(["svd-hybrid", "reconstruct", str(artifact), "--base", str(pool / "base"), "--out", str(out),
                         "--task", task, "--quiet"], host=host)
        assert result.exit_code == 0, result.stderr
        acc = evaluate(str(pool), str(out), task, "test", None)["accuracy"]
        assert acc >= 0.98 * meta["tasks"][task]["finetuned_test_accuracy"]
    bad = run_mk(["svd-hybrid", "reconstruct", str(artifact), "--base", str(pool / "base"), "--out",
                  str(tmp_path / "x"), "--task", "nope"], host=host)
    assert bad.exit_code == 2 and "no task 'nope'" in bad.stderr and not (tmp_path / "x").exists()


def test_weighting_modes_and_the_cluster_path(pool, tasks, host, tmp_path):
    uniform = _compress(host, pool, tasks, tmp_path / "u")
    assert uniform["weights"] == pytest.approx([1 / 8] * 8)
    acc = {t: 0.5 + 0.05 * i for i, t in enumerate(tasks)}
    perf = _compress(host, pool, tasks, tmp_path / "p", "weighting=performance", f"accuracies={json.dumps(acc)}",
                     "temperature=0.05")
    assert perf["weights"] == sorted(perf["weights"]) and sum(perf["weights"]) == pytest.approx(1.0)
    for method in ("kmeans", "hierarchical"):
        clustered = _compress(host, pool, tasks, tmp_path / method, "weighting=cluster", "n_clusters=3",
                              f"cluster_method={method}")
        assert len(clustered["clusters"]) == 3
        assert sorted(t for c in clustered["clusters"] for t in c) == list(range(8))
        manifest = json.loads((tmp_path / method / "manifest.json").read_text())
        matrix = next(m for m in manifest["tensors"].values() if m["kind"] == "matrix")
        assert len(matrix["clusters"]) == 3 and "cosine" in manifest["weighting"]
    missing = run_mk(["svd-hybrid", "compress", "--base", str(pool / "base"), "-s", str(pool / tasks[0]),
                      "--out", str(tmp_path / "m"), "-p", "weighting=performance"], host=host)
    assert missing.exit_code == 2 and "accuracies" in missing.stderr and not (tmp_path / "m").exists()


def test_performance_weights_from_the_evaluator(pool, tasks, host, tmp_path):
    config = tmp_path / "svd.yaml"
    config.write_text(json.dumps({
        "base_model": str(pool / "base"), "sources": [{"name": t, "path": str(pool / t)} for t in tasks[:3]],
        "method": "svd_hybrid", "method_params": {"weighting": "performance", "accuracies": "evaluate"},
        "evaluator": "digits", "evaluator_params": {"pool": str(pool)}, "output_dir": str(tmp_path / "runs"),
    }))
    result = run_mk(["svd-hybrid", "compress", str(config), "--out", str(tmp_path / "a"), "--json"], host=host)
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    accuracies = manifest["weighting"]["accuracies"]
    assert set(accuracies) == set(tasks[:3]) and all(0.5 < a <= 1 for a in accuracies.values())


def test_masks_loaded_from_an_artifact_are_the_ones_stored(pool, tasks, host, tmp_path):
    first = tmp_path / "first"
    _compress(host, pool, tasks, first, "mask_lambda=0.6")
    again = tmp_path / "again"
    _compress(host, pool, tasks, again, f"mask_file={first}", "mask_strategy=majority")
    a, b = (load_file(str(d / "records-00001.safetensors")) for d in (first, again))
    masks = [k for k in a if k.endswith("::task_masks")]
    assert masks and all(torch.equal(a[k], b[k]) for k in masks)
    assert any(not torch.equal(a[k.replace("task_masks", "mask")], b[k.replace("task_masks", "mask")])
               for k in masks)  # majority of the same masks is not their union


def test_tvq_transform_in_a_merge(pool, tasks, host, tmp_path):
    config = tmp_path / "ta.yaml"
    config.write_text(json.dumps({
        "base_model": str(pool / "base"), "sources": _sources(pool, tasks[:2]), "method": "task_arithmetic",
        "transforms": [{"name": "tvq", "params": {"bits": 2}}], "output": {"path": str(tmp_path / "m")},
        "output_dir": str(tmp_path / "runs"),
    }))
    result = run_mk(["merge", str(config), "--quiet"], host=host)
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "m" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- refused artifacts


@pytest.fixture
def artifact(pool, tasks, host, tmp_path) -> Path:
    path = tmp_path / "artifact"
    _compress(host, pool, tasks, path)
    return path


def _reconstruct(host, artifact: Path, base: Path, out: Path):
    return run_mk(["svd-hybrid", "reconstruct", str(artifact), "--base", str(base), "--out", str(out)], host=host)


def test_missing_file_is_refused(artifact, pool, host, tmp_path):
    (artifact / "records-00001.safetensors").unlink()
    result = _reconstruct(host, artifact, pool / "base", tmp_path / "out")
    assert result.exit_code == 1 and "records-00001.safetensors" in result.stderr and "missing" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_wrong_sha256_is_refused(artifact, pool, host, tmp_path):
    path = artifact / "diagnostics.json"
    path.write_text(path.read_text().replace("relative_error", "relative_errors", 1))
    result = run_mk(["svd-hybrid", "diagnose", str(artifact)], host=host)
    assert result.exit_code == 1 and "sha256 does not match" in result.stderr and "diagnostics.json" in result.stderr


def test_basis_of_the_wrong_shape_is_refused(artifact, pool, host, tmp_path):
    shard = artifact / "records-00001.safetensors"
    tensors = load_file(str(shard))
    key = next(k for k in tensors if k.endswith("::basis.0"))
    tensors[key] = tensors[key][:, :-1].contiguous()  # one component short, consistently re-hashed
    save_file(tensors, str(shard))
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["files"]["records-00001.safetensors"] = sha256_file(shard)
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    result = _reconstruct(host, artifact, pool / "base", tmp_path / "out")
    assert result.exit_code == 1 and key.split("::")[0] in result.stderr and "basis 0 has shape" in result.stderr
    assert not (tmp_path / "out").exists()


def test_artifact_for_another_base_model_is_refused(artifact, pool, tasks, host, tmp_path):
    result = _reconstruct(host, artifact, pool / tasks[0], tmp_path / "out")  # same shapes, other weights
    assert result.exit_code == 1 and "differs from the one the artifact" in result.stderr
    assert not (tmp_path / "out").exists()
    other = tmp_path / "other"
    other.mkdir()
    base = load_file(str(pool / "base" / "model.safetensors"))
    name = next(iter(base))
    base[name] = torch.zeros(3, 3)
    save_file(base, str(other / "model.safetensors"))
    result = _reconstruct(host, artifact, other, tmp_path / "out")
    assert result.exit_code == 1 and name in result.stderr and "shape" in result.stderr


def test_not_an_artifact(pool, host, tmp_path):
    result = _reconstruct(host, pool / "base", pool / "base", tmp_path / "out")
    assert result.exit_code == 1 and "not an SVD-Hybrid artifact" in result.stderr
