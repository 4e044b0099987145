"""An evaluation setup (evaluator, tasks, split, subset) and scoring one model on one task.

This module merges nothing, so the engine's optimizer wiring can score merged weights without an
import cycle; recording results, cached own-model metrics and interference deltas are in
``mergekit_core.evaluation.evaluate``, above the engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_core.components import Evaluator, TaskInfo, origin
from mergekit_core.config import MergeSpec
from mergekit_core.errors import ConfigError, MergekitError, PluginError
from mergekit_core.evaluation.subsets import SubsetSpec, subset_indices
from mergekit_core.plugins import PluginHost


@dataclass
class EvalSetup:
    evaluator: Evaluator
    params: dict[str, Any]
    tasks: list[TaskInfo]
    split: str
    subset: SubsetSpec | None
    output_dir: Path

    @property
    def subset_cache(self) -> Path:
        return self.output_dir / "eval_subsets"


def make_setup(host: PluginHost, evaluator: str | None, evaluator_params: Mapping[str, Any] | None,
               tasks: Sequence[str] | None, split: str, subset: Mapping[str, Any] | None,
               output_dir: Path) -> EvalSetup:
    """Resolve the evaluator and check the task names and their data (each task's labels on the
    split, when the evaluator lists them), before anything is merged."""
    if not evaluator:
        names = ", ".join(host.names("evaluator")) or "none installed"
        raise ConfigError(f"evaluation needs an evaluator (evaluator: NAME); installed: {names}",
                          hint="name it with --evaluator NAME (or evaluator: NAME in the config); "
                               "'mk plugins list' shows the installed ones (digits comes with mk-digits)")
    comp: Evaluator = host.get("evaluator", evaluator)
    params = comp.resolve_params(dict(evaluator_params or {}))
    if split not in comp.splits:
        raise ConfigError(f"unknown split {split!r} for evaluator {evaluator}; its splits: {', '.join(comp.splits)}")
    known = {t.name: t for t in evaluator_call(comp, "tasks", None, params)}
    chosen = list(tasks) if tasks else list(known)
    unknown = [t for t in chosen if t not in known]
    if unknown:
        raise ConfigError(f"unknown task '{unknown[0]}' for evaluator {evaluator}; its tasks: {', '.join(known)}")
    for task in chosen:  # the data must be there before anything is merged or written
        try:
            evaluator_call(comp, "labels", task, task, split, params)
        except NotImplementedError:
            break
    return EvalSetup(comp, params, [known[t] for t in chosen], split, SubsetSpec.from_config(subset), Path(output_dir))


def setup_from_spec(host: PluginHost, spec: MergeSpec, *, evaluator: str | None = None,
                    params: Mapping[str, Any] | None = None, tasks: Sequence[str] | None = None,
                    split: str | None = None, subset: Mapping[str, Any] | None = None) -> EvalSetup:
    """The evaluation a config asks for (``evaluator``, ``evaluator_params``, ``eval_tasks``,
    ``split``, ``eval_subset``), with what the command line gives taking precedence."""
    sweep = spec.sweep
    if not tasks and "eval_tasks" in sweep and not sweep["eval_tasks"]:
        raise ConfigError("eval_tasks is empty: name the tasks to evaluate, or leave eval_tasks out for all of "
                          "the evaluator's tasks")
    return make_setup(host, evaluator or sweep.get("evaluator"),
                      {**(sweep.get("evaluator_params") or {}), **(params or {})},
                      tasks or sweep.get("eval_tasks"), split or sweep.get("split", "validation"),
                      subset if subset is not None else sweep.get("eval_subset"), spec.output_dir)


def evaluator_call(evaluator: Evaluator, fn: str, task: str | None, *args: Any) -> Any:
    """``evaluator.fn(*args)``; an exception from the plugin's code (not a mergekit error, not
    ``NotImplementedError`` for an optional method) becomes one PluginError naming the evaluator,
    where it comes from and the task.

    Raises:
        PluginError: the evaluator failed.
    """
    try:
        return getattr(evaluator, fn)(*args)
    except (MergekitError, NotImplementedError):
        raise
    except Exception as exc:
        where = f" on task {task}" if task else ""
        raise PluginError(f"{evaluator.label} ({origin(evaluator)}) failed{where}: {type(exc).__name__}: {exc}",
                          hint="is the model one this evaluator can score (its architecture and tasks)?") from exc


def score(setup: EvalSetup, model: Any, task: TaskInfo) -> tuple[dict[str, float], str | None]:
    """The evaluator's metrics of ``model`` on one task, on the configured subset."""
    indices, key = None, None
    if setup.subset is not None:
        try:
            labels = evaluator_call(setup.evaluator, "labels", task.name, task.name, setup.split, setup.params)
        except NotImplementedError:
            labels = None
        size = len(labels) if labels is not None else None
        if size is None:
            raise ConfigError(f"eval_subset needs {setup.evaluator.label} to list the labels of its splits")
        indices, key = subset_indices(setup.subset, task.name, setup.split, labels, size, setup.subset_cache)
    metrics = evaluator_call(setup.evaluator, "evaluate", task.name, model, task.name, setup.split, indices,
                             setup.params)
    if task.metric not in metrics:
        raise ConfigError(f"{setup.evaluator.label} returned no '{task.metric}' for task {task.name}")
    return metrics, key
