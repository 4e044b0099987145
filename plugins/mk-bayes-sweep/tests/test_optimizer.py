"""``optimizer: bayes`` in a direct ``mk merge``: it searches the lambda policy's values through the
evaluator, then the merge is streamed with the best ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import toy
import yaml

from mergekit_core.testing import run_mk


def merge_config(sweep_config, **optimizer_params):
    data = sweep_config(lambda_policy="per_task",
                        optimizer={"name": "bayes", "params": {"budget": 10, "init_points": 4, **optimizer_params}})
    del data["search"]
    return data


def test_bayes_optimizer_picks_the_best_values_it_evaluated_and_merges_with_them(sweep_config, host, tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(merge_config(sweep_config, objective="ft1")))
    toy.CALLS.clear()
    result = run_mk(["merge", str(path), "--out", str(tmp_path / "merged"), "--json"], host=host)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    run_dir = Path(summary["run_dir"])
    history = json.loads((run_dir / "bayes_history.json").read_text())
    assert history["evaluations"] == 10 and len(history["history"]) == 10
    best = max(history["history"], key=lambda h: h["score"])
    meta = json.loads((run_dir / "merge_metadata.json").read_text())
    assert meta["lambda_values"] == pytest.approx(best["values"])
    assert meta["optimizer"]["report"]["best"]["score"] == pytest.approx(best["score"])
    assert best["values"]["task.0"] > max(best["values"]["task.1"], best["values"]["task.2"])  # ft1's own vector
    assert toy.CALLS["ft1"] == 10  # one evaluation per proposal; the final merge is not scored again
    merged = toy._weights(str(tmp_path / "merged"))
    own = toy._weights(str(toy_models_dir(sweep_config) / "ft1"))
    import torch

    distance = sum(float(torch.linalg.vector_norm(merged[n] - own[n]) ** 2) for n in own) ** 0.5
    assert -distance == pytest.approx(best["score"], rel=1e-5)  # the written model is the best one found


def toy_models_dir(sweep_config) -> Path:
    return Path(sweep_config()["evaluator_params"]["pool"])


def test_bayes_optimizer_without_an_evaluator_or_with_a_bad_key_is_one_line(sweep_config, host, tmp_path):
    data = merge_config(sweep_config)
    del data["evaluator"], data["evaluator_params"]
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(data))
    result = run_mk(["merge", str(path), "--out", str(tmp_path / "m1")], host=host)
    assert result.exit_code == 2 and "optimizer bayes scores merges" in result.stderr
    assert not (tmp_path / "m1").exists()
    path.write_text(yaml.safe_dump(merge_config(sweep_config, keys=["task.9"])))
    result = run_mk(["merge", str(path), "--out", str(tmp_path / "m2")], host=host)
    assert result.exit_code == 2 and "'task.9' is not a value of lambda policy per_task" in result.stderr
    path.write_text(yaml.safe_dump(merge_config(sweep_config, budget=2, init_points=4)))
    result = run_mk(["merge", str(path), "--out", str(tmp_path / "m3")], host=host)
    assert result.exit_code == 2 and "budget 2 is below init_points 4" in result.stderr
    path.write_text(yaml.safe_dump(merge_config(sweep_config, max=float("nan"))))
    result = run_mk(["merge", str(path), "--out", str(tmp_path / "m4")], host=host)
    assert result.exit_code == 2 and "parameter 'max' must be a finite number, got nan" in result.stderr
    assert "Traceback" not in result.stderr and not toy.CALLS.get("ft9")


def test_the_dry_run_refuses_a_bayes_merge_without_an_evaluator(sweep_config, host, tmp_path):
    data = merge_config(sweep_config)
    del data["evaluator"], data["evaluator_params"]
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(data))
    result = run_mk(["merge", str(path), "--dry-run"], host=host)
    assert result.exit_code == 2 and "optimizer bayes scores merges" in result.stderr, result.stderr
