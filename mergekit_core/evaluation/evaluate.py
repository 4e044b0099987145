"""Evaluate merged models on named tasks, and record the results where the reference puts them.

For each task the primary metric is recorded with its ``interference_delta``: the merged model's
metric minus the metric of that task's own fine-tuned source (the source named like the task) on
the same split and subset. Source metrics are computed once and cached in the index.

Files written for one evaluation (``tag`` names the merge, e.g. its run id)::

    <run_dir>/eval_results_<split>[_<subset>].json
    <combo>/eval/<split>/eval_results_<tag>_<split>[_<subset>].json
    <combo>/eval/<split>/per_task/<task>/<task>_<tag>_metrics.json
    <combo>/eval/index.json                                          (append-only)
    <output_dir>/<task>/metrics/eval/<split>/merged/<other tasks>/<tag>/metrics.json
        -> relative symlink to the per-task file (a JSON pointer where links are not allowed)
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergekit_core.components import TaskInfo
from mergekit_core.config import MergeConfig, MergeSpec, SourceSpec, safe_name
from mergekit_core.engine.run import MergeResult, run_merge
from mergekit_core.evaluation.index import append_index, find_latest
from mergekit_core.evaluation.scoring import EvalSetup, score
from mergekit_core.outputs import write_json
from mergekit_core.plugins import PluginHost


def source_model(host: PluginHost, source: SourceSpec, base_model: Path | None) -> dict[str, Any]:
    """A source's own weights in memory: a full checkpoint as is, an adapter applied to the base."""

    data: dict[str, Any] = {"sources": [{"name": source.name, "path": str(source.path)}], "method": "uniform",
                            "output": {"kind": "model"}}
    if base_model is not None:
        data["base_model"] = str(base_model)
    result = run_merge(MergeConfig.from_dict(data).to_spec(), host, in_memory=True, write_bundle=False)
    return result.state_dict


def individual_match(setup: EvalSetup, task: TaskInfo, source: SourceSpec) -> dict[str, Any]:
    """The index fields that identify a source's own metric on this split and subset."""
    subset_key = setup.subset.key(task.name) if setup.subset is not None else None
    return {"kind": "individual", "source_path": str(source.path), "task": task.name, "split": setup.split,
            "subset": subset_key, "evaluator": setup.evaluator.name}


def individual_metric(setup: EvalSetup, host: PluginHost, task: TaskInfo, source: SourceSpec,
                      base_model: Path | None, index_path: Path) -> float:
    """The task's own source's primary metric on this split and subset, cached in the index."""
    match = individual_match(setup, task, source)
    cached = find_latest(index_path, **match)
    if cached is not None:
        return cached["metric_value"]
    metrics, _ = score(setup, source_model(host, source, base_model), task)
    append_index(index_path, [{**match, "metric": task.metric, "metric_value": metrics[task.metric],
                               "metrics": metrics, "time": time.time()}])
    return metrics[task.metric]


def _link(view: Path, target: Path) -> None:
    view.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(target, view.parent)
    if view.is_symlink() or view.exists():
        view.unlink()
    try:
        view.symlink_to(rel)
    except OSError:  # no symlinks here: a small pointer file instead
        write_json(view, {"points_to": rel})


def evaluate_merge(setup: EvalSetup, host: PluginHost, model: Any, *, method: str, sources: Sequence[SourceSpec],
                   base_model: Path | None, combo_dir: Path, tag: str, params: Mapping[str, Any] | None = None,
                   run_dir: Path | None = None,
                   scores: Mapping[str, tuple[dict[str, float], str | None]] | None = None) -> dict[str, Any]:
    """Evaluate a merged model on every task of ``setup``; write and index the results.

    ``scores``: each task's ``(metrics, subset key)`` computed elsewhere (a sweep trial on a
    worker); ``model`` is then not used."""
    index_path = combo_dir / "eval" / "index.json"
    by_name = {s.name: s for s in sources}
    per_task: dict[str, Any] = {}
    subset_key = None
    for task in setup.tasks:
        metrics, subset_key = scores[task.name] if scores is not None else score(setup, model, task)
        value = metrics[task.metric]
        own = by_name.get(task.name)
        individual = (individual_metric(setup, host, task, own, base_model, index_path)
                      if own is not None else None)
        delta = value - individual if individual is not None else None
        per_task[task.name] = {
            "metric": task.metric, "value": value, "higher_is_better": task.higher_is_better,
            "metrics": metrics, "individual": individual, "interference_delta": delta,
        }
    suffix = f"_{subset_key}" if subset_key else ""
    result = {
        "method": method, "tag": tag, "split": setup.split, "subset": subset_key,
        "evaluator": setup.evaluator.name, "sources": [s.name for s in sources], "params": dict(params or {}),
        "tasks": per_task, "summary": summarize(per_task), "time": time.time(),
    }
    if run_dir is not None:
        write_json(run_dir / f"eval_results_{setup.split}{suffix}.json", result)
    eval_dir = combo_dir / "eval" / setup.split
    write_json(eval_dir / f"eval_results_{safe_name(tag)}_{setup.split}{suffix}.json", result)
    for task, entry in per_task.items():
        target = eval_dir / "per_task" / task / f"{task}_{safe_name(tag)}{suffix}_metrics.json"
        write_json(target, {"task": task, "method": method, "tag": tag, **entry})
        others = "_".join(safe_name(s.name) for s in sources if s.name != task) or "none"
        view = (setup.output_dir / safe_name(task) / "metrics" / "eval" / setup.split / "merged" / others
                / safe_name(f"{method}_{tag}{suffix}") / "metrics.json")
        _link(view, target)
    append_index(index_path, [{"kind": "merged", **{k: result[k] for k in (
        "method", "tag", "split", "subset", "evaluator", "sources", "params", "summary", "time")},
        "run_dir": str(run_dir) if run_dir else None,
        "metrics": {t: e["value"] for t, e in per_task.items()},
        "interference_delta": {t: e["interference_delta"] for t, e in per_task.items()}}])
    result["written"] = {
        "run_bundle": str(run_dir / f"eval_results_{setup.split}{suffix}.json") if run_dir is not None else None,
        "results": str(eval_dir / f"eval_results_{safe_name(tag)}_{setup.split}{suffix}.json"),
        "index": str(index_path),
    }
    return result


def evaluate_result(setup: EvalSetup, host: PluginHost, spec: MergeSpec, result: MergeResult,
                    model: Any = None, params: Mapping[str, Any] | None = None,
                    tag: str | None = None) -> dict[str, Any]:
    """Evaluate a finished merge (its in-memory weights unless ``model`` is given) and record the
    results under its run bundle and its method's directory."""
    from mergekit_core.outputs import combo_dir

    tag = tag or (result.run_dir.name if result.run_dir else "merge")
    return evaluate_merge(setup, host, result.state_dict if model is None else model, method=result.method,
                          sources=spec.sources, base_model=spec.base_model,
                          combo_dir=combo_dir(spec.output_dir, result.method, spec.task_combo), tag=tag,
                          params=result.params if params is None else params, run_dir=result.run_dir)


def summarize(per_task: Mapping[str, Any]) -> dict[str, Any]:
    """Average metric, and the max-min criterion: the worst task's direction-adjusted interference."""
    values = [e["value"] for e in per_task.values()]
    deltas = [(e["interference_delta"] if e["higher_is_better"] else -e["interference_delta"])
              for e in per_task.values() if e["interference_delta"] is not None]
    normalized = [e["value"] / e["individual"] for e in per_task.values()
                  if e["individual"] and e["higher_is_better"]]
    worst = min(per_task, key=lambda t: per_task[t]["value"]) if per_task else None
    adjusted = [e["value"] if e["higher_is_better"] else -e["value"] for e in per_task.values()]
    return {
        "min_metric": min(adjusted) if adjusted else None,
        "mean_metric": sum(values) / len(values) if values else None,
        "mean_normalized": sum(normalized) / len(normalized) if normalized else None,
        "worst_task": worst,
        "min_interference_delta": min(deltas) if deltas else None,
    }
