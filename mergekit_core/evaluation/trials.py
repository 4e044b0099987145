"""Sweep trials: what an executor runs for one point, in this process or in another one.

A trial merges one point's config and scores the merged model on every task; it writes no shared
file. It returns the metrics (and the run bundle's path when ``save_merged`` writes one), and the
sweep's driver records them: the journal, the evaluation files and the index have one writer.
What travels to a worker is a :class:`TrialRunner` (the config, the plugins as module names) and
a point: paths and configs, never tensors.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mergekit_core.config import MergeConfig
from mergekit_core.plugins import PluginHost


@dataclass
class TrialFailure:
    """What an executor yields in place of a trial's result when it gave up on the trial.

    ``item``: the point it was given; ``error``: one line (exception type and message);
    ``attempts``: how many times it ran.
    """

    item: Any
    error: str
    attempts: int = 1


@dataclass(frozen=True)
class HostRecipe:
    """How a worker rebuilds the driver's plugin host: the entry-point plugins by name (``None``:
    the driver loaded none) and the plugins registered by hand as (name, module, distribution)."""

    entry_points: tuple[str, ...] | None
    modules: tuple[tuple[str, str, str | None], ...]

    @classmethod
    def of(cls, host: PluginHost) -> HostRecipe:
        loaded = [r for r in host.records if not r.builtin and r.entry_point]
        by_hand = [r for r in host.records if not r.builtin and not r.entry_point and r.status != "error"]
        return cls(tuple(sorted({r.name for r in loaded})) if loaded else None,
                   tuple((r.name, r.module, r.distribution) for r in by_hand))

    def build(self) -> PluginHost:
        if self.entry_points is None:
            host = PluginHost(load_entry_points=False, environ={})
        else:
            host = PluginHost(environ={"MK_LOAD_PLUGINS": ",".join(self.entry_points)})
        for name, module, distribution in self.modules:
            host.register(importlib.import_module(module), name, distribution=distribution)
        return host


_HOSTS: dict[HostRecipe, PluginHost] = {}
_SETUPS: dict[str, Any] = {}
"""A worker's evaluation setups, one per sweep (an evaluator's data is loaded once per process)."""


def point_config(config: MergeConfig, targets: dict[str, str], policy_name: str,
                 point: dict[str, Any]) -> MergeConfig:
    """The config of one point: method parameters and lambda-policy parameters replaced."""
    method = dict(config.data.get("method_params") or {})
    policy_raw = config.data.get("lambda_policy")
    policy = {"name": policy_raw, "params": {}} if isinstance(policy_raw, str) else dict(policy_raw or {})
    policy.setdefault("name", policy_name)
    policy_params = dict(policy.get("params") or {})
    for key, value in point.items():
        if targets[key] == "method":
            method[key] = value
        else:
            policy_params[key.removeprefix("policy.")] = value
    overrides: dict[str, Any] = {"method_params": method, "output.kind": "model"}
    overrides["lambda_policy"] = {"name": policy["name"], "params": policy_params}
    return config.with_overrides(overrides)


@contextmanager
def _working_dir(path: str | None) -> Iterator[None]:
    """Relative paths of a config without a file resolve where the driver ran (workers run elsewhere)."""
    if path is None or os.getcwd() == path:
        yield
        return
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def point_tag(point: dict[str, Any]) -> str:
    """The evaluation tag of a point merged in memory."""
    return "sweep_" + hashlib.sha256(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:8]


class TrialRunner:
    """``runner(point) -> outcome``: merge one point and score it, writing nothing shared.

    The outcome (plain JSON types): ``point``, ``method``, ``scores`` (task -> [metrics, subset
    key]), ``individual`` (task -> its own source's metrics, for the tasks whose cached value the
    trial did not find in the index), ``lambda_values``, ``run_dir`` (None in memory),
    ``merge_s``, ``eval_s``, ``worker`` (host name, process id, GPUs given). Pickled, it keeps the config
    and the plugins' module names; a worker rebuilds the plugin host and the evaluation setup once
    per process.
    """

    def __init__(self, config: MergeConfig, targets: dict[str, str], policy_name: str,
                 evaluator: str | None, save_merged: bool, host: PluginHost, setup: Any = None) -> None:
        self.config = MergeConfig(config.data, config.path.absolute()) if config.path else config
        self.base_dir = None if config.path else os.getcwd()
        self.targets = dict(targets)
        self.policy_name = policy_name
        self.evaluator = evaluator
        self.save_merged = save_merged
        self.recipe = HostRecipe.of(host)
        self._host: PluginHost | None = host
        self._setup = setup

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_host": None, "_setup": None}

    def host(self) -> PluginHost:
        if self._host is None:
            if self.recipe not in _HOSTS:
                _HOSTS[self.recipe] = self.recipe.build()
            self._host = _HOSTS[self.recipe]
        return self._host

    def setup(self) -> Any:
        if self._setup is None:
            from mergekit_core.evaluation.scoring import setup_from_spec

            key = json.dumps([self.recipe.entry_points, self.recipe.modules, self.config.data,
                              str(self.config.path), self.evaluator], sort_keys=True, default=str)
            if key not in _SETUPS:
                with _working_dir(self.base_dir):
                    spec = self.config.to_spec()
                _SETUPS[key] = setup_from_spec(self.host(), spec, evaluator=self.evaluator)
            self._setup = _SETUPS[key]
        return self._setup

    def __call__(self, point: dict[str, Any]) -> dict[str, Any]:
        from mergekit_core.evaluation.evaluate import individual_match, source_model
        from mergekit_core.evaluation.index import find_latest
        from mergekit_core.evaluation.optimize import optimize_and_merge
        from mergekit_core.evaluation.scoring import score
        from mergekit_core.outputs import combo_dir

        host, setup = self.host(), self.setup()
        t0 = time.time()
        with _working_dir(self.base_dir):
            spec = point_config(self.config, self.targets, self.policy_name, point).to_spec()
        merged = optimize_and_merge(spec, host, in_memory=not self.save_merged, write_bundle=self.save_merged)
        model = merged.state_dict if merged.state_dict is not None else merged.output_path
        t1 = time.time()
        scores = {task.name: list(score(setup, model, task)) for task in setup.tasks}
        del model
        index = combo_dir(spec.output_dir, merged.method, spec.task_combo) / "eval" / "index.json"
        sources = {s.name: s for s in spec.sources}
        individual = {}
        for task in setup.tasks:
            own = sources.get(task.name)
            if own is not None and find_latest(index, **individual_match(setup, task, own)) is None:
                individual[task.name] = score(setup, source_model(host, own, spec.base_model), task)[0]
        return {"point": point, "method": merged.method, "scores": scores, "individual": individual,
                "lambda_values": merged.lambda_values,
                "run_dir": str(merged.run_dir) if merged.run_dir else None,
                "merge_s": round(t1 - t0, 3), "eval_s": round(time.time() - t1, 3),
                "worker": _worker()}


def _worker() -> dict[str, Any]:
    """Where a trial ran: host name, process id, and the GPUs it was given (when an executor set
    ``CUDA_VISIBLE_DEVICES``)."""
    out: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        out["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return out
