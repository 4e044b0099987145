"""Evaluation, subsets, the concurrent index, sweeps (ranking, resume), with a toy evaluator."""

from __future__ import annotations

import json
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mergekit_core import Evaluator, Param, TaskInfo, hookimpl
from mergekit_core.config import MergeConfig
from mergekit_core.evaluation.evaluate import evaluate_merge
from mergekit_core.evaluation.index import read_index
from mergekit_core.evaluation.scoring import make_setup, setup_from_spec
from mergekit_core.evaluation.subsets import SubsetSpec, subset_indices
from mergekit_core.evaluation.sweep import read_journal, run_sweep
from mergekit_core.io.readers import SafetensorsReader
from mergekit_core.testing import fresh_host, run_mk

CALLS: Counter = Counter()
TENSOR = "model.layers.0.self_attn.q_proj.weight"


class ToyEvaluator(Evaluator):
    """Task ``ftN``: minus the distance of one tensor to ftN's (own model: 0). 60 examples, 3 classes."""

    name = "toy"
    description = "distance to each source's weights"
    params = (Param("pool", help="the models fixture's directory", type=str),)

    def tasks(self, params):
        return [TaskInfo(n, "closeness") for n in ("ft1", "ft2")]

    def labels(self, task, split, params):
        return [i % 3 for i in range(60)]

    def evaluate(self, model, task, split, subset, params):
        CALLS[task] += 1
        if not isinstance(model, dict):
            reader = SafetensorsReader.from_directory(Path(model))
            model = {n: reader.get(n) for n in reader.infos()}
        target = SafetensorsReader.from_directory(Path(params["pool"]) / task).get(TENSOR)
        distance = float(torch.linalg.vector_norm(model[TENSOR].float() - target.float()))
        n = 60 if subset is None else len(subset)
        return {"closeness": -distance, "samples": n}


toy_plugin = types.ModuleType("toy_plugin")
toy_plugin.mk_evaluators = hookimpl(lambda: [ToyEvaluator()])
toy_plugin.mk_evaluators.__name__ = "mk_evaluators"
HOST = fresh_host({"toy": toy_plugin})


def config(tmp_path, models, **extra):
    paths, _ = models
    data = {"sources": [str(paths["ft1"]), str(paths["ft2"])], "base_model": str(paths["base"]),
            "evaluator": "toy", "evaluator_params": {"pool": str(paths["base"].parent)},
            "output_dir": str(tmp_path / "art"), **extra}
    return MergeConfig.from_dict(data)


def test_interference_delta_and_cached_individual_metrics(tmp_path, models):
    paths, tensors = models
    spec = config(tmp_path, models, method="uniform").to_spec()
    setup = make_setup(HOST, "toy", {"pool": str(paths["base"].parent)}, None, "test", None, spec.output_dir)
    from mergekit_core.engine import run_merge

    merged = run_merge(spec, HOST, in_memory=True).state_dict
    combo = tmp_path / "art" / "merged" / "uniform" / "ft1_ft2"
    CALLS.clear()
    result = evaluate_merge(setup, HOST, merged, method="uniform", sources=spec.sources, base_model=spec.base_model,
                            combo_dir=combo, tag="run1")
    half = float(torch.linalg.vector_norm(tensors["ft1"][TENSOR] - tensors["ft2"][TENSOR])) / 2
    for task in ("ft1", "ft2"):
        entry = result["tasks"][task]
        assert entry["individual"] == pytest.approx(0.0, abs=1e-5)
        assert entry["interference_delta"] == pytest.approx(-half, rel=1e-4)
    assert CALLS == {"ft1": 2, "ft2": 2}  # the merged model and each task's own source
    evaluate_merge(setup, HOST, merged, method="uniform", sources=spec.sources, base_model=spec.base_model,
                   combo_dir=combo, tag="run2")
    assert CALLS == {"ft1": 3, "ft2": 3}  # own metrics came from the index
    index = read_index(combo / "eval" / "index.json")
    assert [e["kind"] for e in index].count("individual") == 2 and [e["kind"] for e in index].count("merged") == 2
    assert (combo / "eval" / "test" / "eval_results_run1_test.json").is_file()
    view = tmp_path / "art" / "ft1" / "metrics" / "eval" / "test" / "merged" / "ft2" / "uniform_run1" / "metrics.json"
    assert view.is_symlink() and json.loads(view.read_text())["task"] == "ft1"


def test_subsets_are_deterministic_stratified_and_namespaced(tmp_path):
    labels = [i % 3 if i < 90 else 0 for i in range(120)]  # class 0 is half of the examples
    spec = SubsetSpec.from_config({"seed": 3, "max_samples": 40, "per_task": {"small": {"max_samples": 10}}})
    first, key = subset_indices(spec, "t", "test", labels, 120, tmp_path)
    assert len(first) == 40 and key.startswith("subset-")
    counts = Counter(labels[i] for i in first)
    assert counts == {0: 20, 1: 10, 2: 10}  # proportional to 60/30/30
    again, _ = subset_indices(spec, "t", "test", labels, 120, tmp_path)
    assert again == first
    (tmp_path / f"t_test_{key}.json").unlink()
    assert subset_indices(spec, "t", "test", labels, 120, tmp_path)[0] == first  # recomputed, same
    small, small_key = subset_indices(spec, "small", "test", labels, 120, tmp_path)
    assert len(small) == 10 and small_key != key
    other_seed = SubsetSpec.from_config({"seed": 4, "max_samples": 40})
    assert subset_indices(other_seed, "t", "test", labels, 120, tmp_path)[0] != first
    assert subset_indices(spec, "t", "test", labels, 30, tmp_path) == (None, None)  # whole split is smaller


def test_subset_results_never_overwrite_full_split_results(tmp_path, models):
    paths, _ = models
    spec = config(tmp_path, models, method="uniform").to_spec()
    combo = tmp_path / "combo"
    from mergekit_core.engine import run_merge

    merged = run_merge(spec, HOST, in_memory=True).state_dict
    for subset in (None, {"max_samples": 12}):
        setup = make_setup(HOST, "toy", {"pool": str(paths["base"].parent)}, None, "test", subset, spec.output_dir)
        evaluate_merge(setup, HOST, merged, method="uniform", sources=spec.sources, base_model=spec.base_model,
                       combo_dir=combo, tag="r")
    files = sorted(p.name for p in (combo / "eval" / "test").glob("eval_results_*.json"))
    assert len(files) == 2 and files[0] == "eval_results_r_test.json" and "_subset-" in files[1]
    subset_result = json.loads((combo / "eval" / "test" / files[1]).read_text())
    assert subset_result["tasks"]["ft1"]["metrics"]["samples"] == 12


WRITER = """
import sys
from pathlib import Path
from mergekit_core.evaluation.index import append_index
for i in range(25):
    append_index(Path(sys.argv[1]), [{"worker": int(sys.argv[2]), "i": i}])
"""


def test_index_stays_valid_under_concurrent_writers(tmp_path):
    """Four processes append at once (separate interpreters: nothing to pickle, nothing to hang)."""
    import subprocess
    import sys

    path = tmp_path / "index.json"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(w)], stderr=subprocess.PIPE, text=True)
             for w in range(4)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    entries = json.loads(path.read_text())
    assert len(entries) == 100
    assert Counter(e["worker"] for e in entries) == {0: 25, 1: 25, 2: 25, 3: 25}


def test_sweep_ranks_by_the_worst_task(tmp_path, models):
    cfg = config(tmp_path, models, method="weighted_delta", lambda_policy="per_task",
                 search={"type": "grid", "grid": {"lambdas": [[1.0, 0.0], [0.9, 0.1], [0.5, 0.5], [0.0, 1.0]]}})
    result = run_sweep(cfg, HOST)
    scores = {tuple(r["point"]["lambdas"]): r for r in result["points"]}
    # every point has the same mean closeness (-D/2); only the worst task tells them apart
    means = [r["summary"]["mean_metric"] for r in scores.values()]
    assert max(means) - min(means) < 1e-4
    assert result["best"]["point"]["lambdas"] == [0.5, 0.5]
    assert scores[(1.0, 0.0)]["score"] < scores[(0.9, 0.1)]["score"] < scores[(0.5, 0.5)]["score"]
    saved = json.loads(Path(result["path"]).read_text())
    assert len(saved["points"]) == 4 and saved["best"]["point"] == {"lambdas": [0.5, 0.5]}


def test_sweep_resumes_after_a_crash_without_redoing_points(tmp_path, models):
    cfg = config(tmp_path, models, method="task_arithmetic",
                 search={"type": "grid", "grid": {"lambda": [0.1, 0.2, 0.3, 0.4, -0.1]}}, constraint_nonnegative=True)

    def crash_after_two(event, **info):  # Ctrl-C right after the second point was journaled
        if event == "point":
            crash_after_two.seen += 1
            if crash_after_two.seen == 2:
                raise KeyboardInterrupt

    crash_after_two.seen = 0
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, HOST, progress=crash_after_two)
    from mergekit_core.evaluation.sweep import plan_sweep

    journal = plan_sweep(cfg, HOST).journal
    assert [r["point"]["lambda"] for r in read_journal(journal)] == [0.1, 0.2]
    CALLS.clear()
    result = run_sweep(cfg, HOST, resume=True)
    assert [r["point"]["lambda"] for r in result["points"]] == [0.1, 0.2, 0.3, 0.4, -0.1]
    assert CALLS == {"ft1": 2, "ft2": 2}  # only 0.3 and 0.4 merged and evaluated; own metrics cached
    skipped = result["points"][-1]
    assert skipped["score"] is None and "constraint_nonnegative" in skipped["skipped"]
    fresh = run_sweep(cfg, HOST)  # without --resume the journal starts over
    assert len(read_journal(journal)) == 5 and len(fresh["points"]) == 5


def test_sweep_config_errors_before_any_merge(tmp_path, models):
    cfg = config(tmp_path, models, method="task_arithmetic", search={"type": "grid", "grid": {"lamda": [0.1]}})
    with pytest.raises(Exception, match="'lamda' is neither a parameter of merge method 'task_arithmetic'.*did you mean 'lambda'"):
        run_sweep(cfg, HOST)
    bad_task = config(tmp_path, models, method="uniform", eval_tasks=["ft9"],
                      search={"type": "grid", "grid": {"normalize": [True]}})
    bad_task = MergeConfig.from_dict({**bad_task.data, "method": "weighted"})
    with pytest.raises(Exception, match="unknown task 'ft9' for evaluator toy; its tasks: ft1, ft2"):
        run_sweep(bad_task, HOST)


def test_cli_sweep_and_evaluate(tmp_path, models):
    cfg = config(tmp_path, models, method="task_arithmetic", search={"type": "grid", "grid": {"lambda": [0.2, 0.4]}})
    path = tmp_path / "sweep.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg.data))
    result = run_mk(["sweep", str(path), "--json"], host=HOST)
    assert result.exit_code == 0, result.stderr
    assert len(json.loads(result.stdout)["points"]) == 2
    merged = run_mk(["merge", str(path), "--lambda", "0.3", "--out", str(tmp_path / "m"), "--eval-tasks",
                     "ft1", "ft2", "--json"], host=HOST)
    assert merged.exit_code == 0, merged.stderr
    summary = json.loads(merged.stdout)
    assert set(summary["evaluation"]["tasks"]) == {"ft1", "ft2"}
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "eval_results_test.json").is_file()
    again = run_mk(["evaluate", str(run_dir), "--tasks", "ft1", "--split", "validation", "--json"], host=HOST)
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["split"] == "validation" and (run_dir / "eval_results_validation.json").is_file()
    np.testing.assert_allclose(json.loads(again.stdout)["tasks"]["ft1"]["value"],
                               summary["evaluation"]["tasks"]["ft1"]["value"], rtol=1e-5)


def test_an_optimizer_can_build_and_score_merges(tmp_path, models):
    from mergekit_core import Optimizer
    from mergekit_core.api import optimize_and_merge

    seen = []

    class PickBest(Optimizer):
        name = "pick_best"
        description = "tries two values of the first task's lambda"

        def optimize(self, context, params):
            best = None
            for v in (0.0, 1.0):
                values = {**context.initial_values, "task.0": v}
                weights = context.build_merged(values)
                scores = context.evaluate(values)
                seen.append((v, weights[TENSOR].clone(), scores))
                if best is None or scores["ft1"] > best[1]:
                    best = (values, scores["ft1"])
            return best[0]

    plugin = types.ModuleType("opt_plugin")
    plugin.mk_optimizers = hookimpl(lambda: [PickBest()])
    plugin.mk_optimizers.__name__ = "mk_optimizers"
    host = fresh_host({"toy": toy_plugin, "opt": plugin})
    paths, tensors = models
    spec = config(tmp_path, models, method="weighted_delta", lambda_policy={"name": "per_task",
                                                                            "params": {"lambdas": [0.5, 0.0]}},
                  optimizer="pick_best").to_spec()
    result = optimize_and_merge(spec, host, in_memory=True)
    assert result.lambda_values == {"task.0": 1.0, "task.1": 0.0}  # ft1's own weights score best on ft1
    torch.testing.assert_close(seen[1][1], tensors["ft1"][TENSOR])
    assert seen[1][2]["ft1"] == pytest.approx(0.0, abs=1e-5) and seen[0][2]["ft1"] < 0
    torch.testing.assert_close(result.state_dict[TENSOR], tensors["ft1"][TENSOR])


def test_merge_eval_uses_the_config_split_unless_the_flag_is_given(tmp_path, models):
    import yaml

    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({**config(tmp_path, models, method="task_arithmetic").data,
                                    "split": "validation"}))
    args = ["merge", str(path), "--eval-tasks", "ft1", "--json"]
    from_config = run_mk([*args, "--out", str(tmp_path / "a")], host=HOST)
    assert from_config.exit_code == 0, from_config.stderr
    assert json.loads(from_config.stdout)["evaluation"]["split"] == "validation"
    from_flag = run_mk([*args, "--out", str(tmp_path / "b"), "--split", "test"], host=HOST)
    assert json.loads(from_flag.stdout)["evaluation"]["split"] == "test"


def test_a_legacy_config_key_prints_one_warning_line(tmp_path, models):
    import yaml

    data = config(tmp_path, models, method="task_arithmetic").data
    path = tmp_path / "legacy.yaml"
    path.write_text(yaml.safe_dump({**data, "lambda": 0.3}))
    result = run_mk(["merge", str(path), "--dry-run", "--lambda", "0.2"], host=HOST)  # the config is read twice
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "deprecated" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "use method_params.lambda" in lines[0]
    assert "DeprecationWarning" not in result.stderr


def test_sweep_prints_the_ranked_table_and_evaluate_says_where_results_went(tmp_path, models):
    import yaml

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config(tmp_path, models, method="task_arithmetic",
                                          search={"type": "grid", "grid": {"lambda": [0.1, 0.5, 0.9]}}).data))
    result = run_mk(["sweep", str(path)], host=HOST)
    assert result.exit_code == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if "lambda=" in line and line.startswith("│")]
    assert len(rows) == 3 and "rank" in result.stdout
    scores = [float(r.split("│")[3]) for r in rows]
    assert scores == sorted(scores, reverse=True) and len({r.split("lambda=")[1].split()[0] for r in rows}) == 3
    merged = run_mk(["merge", str(path), "--lambda", "0.3", "--out", str(tmp_path / "m"), "--json"], host=HOST)
    run_dir = json.loads(merged.stdout)["run_dir"]
    shown = run_mk(["evaluate", run_dir, "--tasks", "ft1"], host=HOST)
    assert shown.exit_code == 0, shown.stderr
    lines = {line.split(": ")[0]: line.split(": ", 1)[1] for line in shown.stdout.splitlines() if ": " in line}
    assert Path(lines["results"]).is_file() and Path(lines["index"]).is_file()
    assert Path(lines["in the run bundle"]).is_file()


def test_ties_in_the_ranking_go_to_the_better_mean():
    from mergekit_core.evaluation.sweep import _best

    records = [{"point": {"lambda": 0.05}, "score": -0.3, "summary": {"mean_metric": 0.60}},
               {"point": {"lambda": 0.1}, "score": -0.3, "summary": {"mean_metric": 0.64}},
               {"point": {"lambda": 0.4}, "score": -0.5, "summary": {"mean_metric": 0.70}}]
    assert _best(records)["point"] == {"lambda": 0.1}


def test_evaluate_a_model_directory_writes_where_it_is_told(tmp_path, models, monkeypatch):
    paths, _ = models
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results"
    result = run_mk(["evaluate", str(paths["ft1"]), "--evaluator", "toy", "--param",
                     f"pool={paths['base'].parent}", "--output-dir", str(out), "--json"], host=HOST)
    assert result.exit_code == 0, result.stderr
    assert Path(json.loads(result.stdout)["written"]["index"]).is_relative_to(out)
    assert not (tmp_path / "artifacts").exists()


class Fragile(Evaluator):
    name = "fragile"
    description = "fails on models it does not know"

    def tasks(self, params):
        return [TaskInfo("ft1", "closeness")]

    def evaluate(self, model, task, split, subset, params):
        raise AttributeError("Backbone has no attribute lm_head")


fragile_plugin = types.ModuleType("fragile_plugin")
fragile_plugin.mk_evaluators = hookimpl(lambda: [Fragile()])
fragile_plugin.mk_evaluators.__name__ = "mk_evaluators"


def test_an_unknown_split_and_a_failing_evaluator_are_one_line_each(tmp_path, models):
    paths, _ = models
    host = fresh_host({"toy": toy_plugin, "fragile": fragile_plugin})
    common = ["evaluate", str(paths["ft1"]), "--output-dir", str(tmp_path / "r")]
    split = run_mk([*common, "--evaluator", "toy", "--param", f"pool={paths['base'].parent}", "--split", "dev"],
                   host=host)
    assert split.exit_code == 2 and "unknown split 'dev' for evaluator toy; its splits: train, validation, test" \
        in split.stderr
    failed = run_mk([*common, "--evaluator", "fragile"], host=host)
    assert failed.exit_code == 1 and "Traceback" not in failed.stderr
    assert "evaluator 'fragile' (module " in failed.stderr and "failed on task ft1: AttributeError" in failed.stderr


def test_evaluating_a_model_mk_wrote_gives_interference_against_its_sources(tmp_path, models):
    paths, _ = models
    out = tmp_path / "merged"
    merged = run_mk(["merge", "--method", "task_arithmetic", "--base", str(paths["base"]), "--sources",
                     str(paths["ft1"]), str(paths["ft2"]), "--lambda", "0.5", "--out", str(out),
                     "--output-dir", str(tmp_path / "art"), "-q"], host=HOST)
    assert merged.exit_code == 0, merged.stderr
    result = run_mk(["evaluate", str(out), "--evaluator", "toy", "--param", f"pool={paths['base'].parent}",
                     "--output-dir", str(tmp_path / "r"), "--json"], host=HOST)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["method"] == "task_arithmetic"
    assert all(e["interference_delta"] is not None for e in data["tasks"].values())


def test_an_empty_eval_tasks_list_is_refused_not_read_as_all(tmp_path, models):
    from mergekit_core.errors import ConfigError

    spec = MergeConfig.from_dict({**config(tmp_path, models, method="task_arithmetic").data,
                                  "eval_tasks": []}).to_spec()
    with pytest.raises(ConfigError, match="eval_tasks is empty"):
        setup_from_spec(HOST, spec)
