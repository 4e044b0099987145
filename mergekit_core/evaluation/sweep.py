"""Sweeps: ask a search strategy for points, merge and evaluate each, rank by max-min interference.

The score of a point is the worst task's direction-adjusted interference delta (merged metric
minus the task's own fine-tuned metric): a point is only as good as the task it hurts most.
Every finished point is appended to a journal (one JSON line) as soon as it completes;
``resume=True`` replays the journal into the strategy and skips those points, so a sweep
interrupted by a crash or Ctrl-C continues where it stopped.

Point keys: a parameter of the method (``lambda``, ``k``, ...), or ``policy.<name>`` for a
lambda-policy parameter (``policy.lambdas``); a bare name that only the policy has also works.

``search.objective`` changes the score: ``worst`` (the default, max-min as above), ``mean`` (the
mean metric over the tasks) or a task's name (that task's metric, direction-adjusted).

A strategy may do more than ``ask``/``tell`` (docs/hooks/mk_search_strategies.md): with
``start_sweep(space, params, seed, sweep)`` it receives a :class:`SweepContext` (what is swept,
for warm starts); its search may take the journal of an interrupted run (``resume``), say what it
predicted for a point (``proposal``, recorded with the point) and add to the summary (``finish``).

Trials run through the config's executor (``executor: NAME`` or ``{name, params}``, default
``local``: one after another in this process). The executor gets a picklable
:class:`~mergekit_core.evaluation.trials.TrialRunner` and the points (iterated, or taken in batches
with ``take(n)``, which asks a search's ``ask_batch``); this process, the driver, records every
outcome: it alone writes the journal, the evaluation results and the index. An executor that
gives up on a trial yields a :class:`~mergekit_core.evaluation.trials.TrialFailure`: the point is
journaled with its error, told with score None, and the sweep goes on (``--resume`` runs it again).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_core.components import closest
from mergekit_core.config import MergeConfig, MergeSpec
from mergekit_core.engine.resolve import resolve_components
from mergekit_core.engine.write import input_paths
from mergekit_core.errors import ConfigError
from mergekit_core.evaluation.evaluate import evaluate_merge, individual_match
from mergekit_core.evaluation.index import append_index, find_latest
from mergekit_core.evaluation.scoring import EvalSetup, setup_from_spec
from mergekit_core.evaluation.trials import TrialFailure, TrialRunner, point_tag
from mergekit_core.evaluation.trials import point_config as trial_config
from mergekit_core.io.destination import check_inside_nothing
from mergekit_core.outputs import combo_dir, write_json
from mergekit_core.plugins import PluginHost

SEARCH_KEYS = ("type", "grid", "space", "objective")
OBJECTIVES = ("worst", "mean")


@dataclass
class SweepPlan:
    config: MergeConfig
    spec: MergeSpec
    setup: EvalSetup
    strategy: Any
    strategy_params: dict[str, Any]
    space: dict[str, Any]
    seed: int
    targets: dict[str, str]  # point key -> "method" | "policy"
    policy_name: str
    journal: Path
    save_merged: bool
    nonnegative: bool
    objective: str = "worst"
    executor: Any = None
    executor_params: dict[str, Any] | None = None
    evaluator: str | None = None


@dataclass
class SweepContext:
    """What a strategy's ``start_sweep`` learns about the sweep (all known before any merge).

    ``identity``: the fields two sweeps must share for their points to be comparable (method,
    sources, merge_mode, split, eval_tasks, constraint_nonnegative, objective). ``score(record)``:
    the objective of any sweep record (one from an earlier sweep's summary too), or None.
    """

    identity: dict[str, Any]
    num_sources: int
    score: Callable[[dict[str, Any]], float | None]
    layers: Callable[[], list[int]]
    """The merge's layer indices (reads headers only, when called)."""
    base_dir: Path
    """Where relative paths in the search block start: the config file's folder (else the cwd)."""


def _targets(space: dict[str, Any], spec: MergeSpec, host: PluginHost) -> tuple[dict[str, str], str]:
    comps = resolve_components(spec, host)
    method_params = {p.name for p in comps.method.params}
    policy_params = {p.name for p in comps.policy.params}
    out = {}
    for key in space:
        if key.startswith("policy."):
            if key.removeprefix("policy.") not in policy_params:
                raise ConfigError(f"search: '{key}' is not a parameter of lambda policy {comps.policy.name} "
                                  f"(its parameters: {', '.join(sorted(policy_params)) or 'none'})")
            out[key] = "policy"
        elif key in method_params:
            out[key] = "method"
        elif key in policy_params:
            out[key] = "policy"
        else:
            guess = closest(key, [*method_params, *(f"policy.{p}" for p in policy_params)])
            raise ConfigError(f"search: '{key}' is neither a parameter of {comps.method.label} "
                              f"({', '.join(sorted(method_params)) or 'none'}) nor of lambda policy "
                              f"{comps.policy.name} ({', '.join(sorted(policy_params)) or 'none'})"
                              + (f"; did you mean '{guess}'?" if guess else ""))
    return out, comps.policy.name


def plan_sweep(config: MergeConfig, host: PluginHost, *, evaluator: str | None = None) -> SweepPlan:
    """Validate the whole sweep (components, search space, evaluator, tasks) before any merge."""
    spec = config.to_spec()
    search = dict(spec.sweep.get("search") or {"type": "grid", "grid": {}})
    kind = search.get("type", "grid")
    strategy = host.get("search_strategy", kind)
    space = search.get("grid") if kind == "grid" else search.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"search: give the {'grid' if kind == 'grid' else 'space'} to search, "
                          "e.g. grid: {lambda: [0.1, 0.2, 0.3]}")
    seed = int(search.get("seed", spec.seed))
    objective = str(search.get("objective", "worst"))
    strategy_params = strategy.resolve_params({k: v for k, v in search.items() if k not in (*SEARCH_KEYS, "seed")})
    targets, policy_name = _targets(space, spec, host)
    setup = setup_from_spec(host, spec, evaluator=evaluator)
    task_names = [t.name for t in setup.tasks]
    if objective not in (*OBJECTIVES, *task_names):
        guess = closest(objective, [*OBJECTIVES, *task_names])
        raise ConfigError(f"search: objective '{objective}' is neither worst, mean nor one of the evaluated "
                          f"tasks ({', '.join(task_names)})" + (f"; did you mean '{guess}'?" if guess else ""))
    executor, executor_params = _executor(spec.sweep.get("executor"), host)
    spec_json = spec.to_json()
    spec_json["sweep"].pop("executor", None)  # where trials run does not change their results

    def same_points(s: Any) -> Any:  # a larger budget goes on from the same journal
        return {k: v for k, v in s.items() if k != "budget"} if isinstance(s, dict) else s

    spec_json["sweep"]["search"] = same_points(spec_json["sweep"].get("search"))
    identity = json.dumps({"spec": spec_json, "search": same_points(search)}, sort_keys=True, default=str)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    journal = combo_dir(spec.output_dir, spec.method.name, spec.task_combo) / "sweeps" / f"journal_{digest}.jsonl"
    return SweepPlan(config, spec, setup, strategy, strategy_params, space, seed, targets, policy_name, journal,
                     bool(spec.sweep.get("save_merged", False)), bool(spec.sweep.get("constraint_nonnegative", False)),
                     objective, executor, executor_params, evaluator)


def _executor(raw: Any, host: PluginHost) -> tuple[Any, dict[str, Any]]:
    """The executor of ``executor: NAME`` or ``executor: {name, params}`` (default ``local``)."""
    if raw is None or isinstance(raw, str):
        name, params = raw or "local", {}
    elif isinstance(raw, dict) and isinstance(raw.get("name"), str) and set(raw) <= {"name", "params"}:
        name, params = raw["name"], raw.get("params") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"executor: params must be a mapping, got {type(params).__name__}")
    else:
        raise ConfigError(f"executor: give a name or {{name: NAME, params: {{...}}}}, got {raw!r}")
    executor = host.get("executor", name)
    return executor, executor.resolve_params(params)


def sweep_identity(plan: SweepPlan) -> dict[str, Any]:
    """The fields that make two sweeps' scores comparable (the warm-start matching rule)."""
    return {"method": plan.spec.method.name, "sources": [s.name for s in plan.spec.sources],
            "merge_mode": plan.spec.merge_mode, "split": plan.setup.split,
            "eval_tasks": [t.name for t in plan.setup.tasks], "constraint_nonnegative": plan.nonnegative,
            "objective": plan.objective}


def objective_score(plan: SweepPlan, record: dict[str, Any]) -> float | None:
    """A record's score under the plan's objective (higher is better), None without one."""
    summary = record.get("summary") or {}
    if plan.objective == "worst":
        score = summary.get("min_interference_delta")
        return summary.get("min_metric") if score is None else score
    if plan.objective == "mean":
        return summary.get("mean_metric")
    value = (record.get("metrics") or {}).get(plan.objective)
    task = next(t for t in plan.setup.tasks if t.name == plan.objective)
    return None if value is None else (value if task.higher_is_better else -value)


RANKINGS = {"worst": "max-min interference delta (the worst task's merged minus own metric)",
            "mean": "mean metric over the tasks"}


def _layers(plan: SweepPlan, host: PluginHost) -> list[int]:
    from mergekit_core.engine.plan import build_plan

    merge_plan = build_plan(plan.spec, host, resolve_components(plan.spec, host).method)
    try:
        return merge_plan.layers
    finally:
        merge_plan.close()


def start_search(plan: SweepPlan, host: PluginHost) -> Any:
    """The strategy's search, given the sweep's context when the strategy takes it."""
    start_sweep = getattr(plan.strategy, "start_sweep", None)
    if start_sweep is None:
        return plan.strategy.start(plan.space, plan.strategy_params, plan.seed)
    context = SweepContext(identity=sweep_identity(plan), num_sources=len(plan.spec.sources),
                           score=lambda record: objective_score(plan, record),
                           layers=lambda: _layers(plan, host),
                           base_dir=plan.spec.config_file.parent if plan.spec.config_file else Path.cwd())
    return start_sweep(plan.space, plan.strategy_params, plan.seed, context)


def point_config(plan: SweepPlan, point: dict[str, Any]) -> MergeConfig:
    return trial_config(plan.config, plan.targets, plan.policy_name, point)


def _negative(point: dict[str, Any]) -> bool:
    def neg(v: Any) -> bool:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return v < 0
        if isinstance(v, (list, tuple)):
            return any(neg(x) for x in v)
        if isinstance(v, dict):
            return any(neg(x) for x in v.values())
        return False

    return any(neg(v) for v in point.values())


def _key(point: dict[str, Any]) -> str:
    return json.dumps(point, sort_keys=True, default=str)


def read_journal(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a crashed write
            continue
    return out


def run_sweep(config: MergeConfig, host: PluginHost, *, resume: bool = False,
              progress: Callable[..., None] | None = None, evaluator: str | None = None) -> dict[str, Any]:
    plan = plan_sweep(config, host, evaluator=evaluator)
    check_inside_nothing(plan.spec.output_dir, input_paths(plan.spec), "run-bundle root (output_dir)")
    plan.journal.parent.mkdir(parents=True, exist_ok=True)
    set_aside = None
    if not resume and plan.journal.exists():  # a fresh start keeps the old journal's results
        stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime())
        set_aside = plan.journal.with_name(f"{plan.journal.stem}.before_{stamp}.jsonl")
        os.replace(plan.journal, set_aside)
    repair_journal(plan.journal)
    # a failed trial is evaluated again when a resumed search proposes it again
    journaled = [r for r in read_journal(plan.journal) if not r.get("error")]
    search = start_search(plan, host)
    loop = _SweepLoop(plan, host, search, journaled, progress)
    started = time.time()
    if progress:
        progress("start", total=getattr(search, "size", None), resumed=len(loop.done))
    runner = TrialRunner(plan.config, plan.targets, plan.policy_name, plan.evaluator, plan.save_merged, host,
                         setup=plan.setup)
    outcomes = plan.executor.map(runner, loop, plan.executor_params)
    try:
        for outcome in outcomes:
            loop.finish(outcome)
    finally:
        close = getattr(outcomes, "close", None)
        if close is not None:  # a generator's cleanup (cancelling running trials) runs now
            close()
    records = loop.records
    result = {
        "method": plan.spec.method.name,
        "sources": [s.name for s in plan.spec.sources],
        "search": {"type": plan.strategy.name, "space": plan.space, "params": plan.strategy_params},
        "executor": {"name": plan.executor.name, "params": plan.executor_params},
        "split": plan.setup.split, "eval_tasks": [t.name for t in plan.setup.tasks],
        "merge_mode": plan.spec.merge_mode, "constraint_nonnegative": plan.nonnegative,
        "objective": plan.objective,
        "ranking": RANKINGS.get(plan.objective, f"task {plan.objective}'s metric"),
        "points": records, "best": _best(records), "failed": sum(1 for r in records if r.get("error")),
        "wall_time_s": round(time.time() - started, 2),
        "journal": str(plan.journal),
        "previous_journal": str(set_aside) if set_aside else None,
    }
    stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime())
    path = plan.journal.parent / f"sweep_{stamp}.json"
    if hasattr(search, "finish"):
        result.update(search.finish(result, path.with_suffix("")) or {})
    write_json(path, result)
    result["path"] = str(path)
    if progress:
        progress("end")
    return result


class _SweepLoop:
    """The driver's side of a sweep: the points an executor iterates over (or takes in batches
    with :meth:`take`), and :meth:`finish` for each outcome it yields. Journaled and skipped points
    are settled here without a trial; only the driver writes the journal and the index."""

    def __init__(self, plan: SweepPlan, host: PluginHost, search: Any, journaled: list[dict[str, Any]],
                 progress: Callable[..., None] | None) -> None:
        self.plan, self.host, self.search, self.progress = plan, host, search, progress
        self.done = {_key(r["point"]): r for r in journaled}
        self.records: list[dict[str, Any]] = []
        if journaled and hasattr(search, "resume"):  # the search refits from the journal, in its order
            search.resume(journaled)
            self.records = list(self.done.values())
        self.listed = {_key(r["point"]) for r in self.records}
        self.running = 0
        self.exhausted = False

    def __iter__(self) -> _SweepLoop:
        return self

    def __next__(self) -> dict[str, Any]:
        """The next point to evaluate (the search's ``ask``, one at a time)."""
        while not self.exhausted:
            point = self.search.ask()
            if point is None:
                self.exhausted = True
            elif not self._settled(point):
                self._started(1)
                return point
        raise StopIteration

    def take(self, n: int) -> list[dict[str, Any]]:
        """Up to ``n`` points to evaluate at once (the search's ``ask_batch(n)`` when it has one);
        an empty list when the search is done. For executors that run trials in parallel: use
        either iteration or ``take``, not both."""
        out: list[dict[str, Any]] = []
        batched = hasattr(self.search, "ask_batch")
        while len(out) < n and not self.exhausted:
            if batched:
                points = self.search.ask_batch(n - len(out))
            else:
                point = self.search.ask()
                points = [] if point is None else [point]
            if not points:
                self.exhausted = True
            out.extend(p for p in points if not self._settled(p))
        self._started(len(out))
        return out

    def _started(self, n: int) -> None:
        self.running += n
        if self.progress and n:
            self.progress("running", running=self.running)

    def _settled(self, point: dict[str, Any]) -> bool:
        """Whether ``point`` needs no trial: journaled by an interrupted run, or skipped."""
        key = _key(point)
        if key in self.done:
            if key not in self.listed:  # a resumed search proposed a journaled point again: nothing to do
                self._record(self.done[key])
            return True
        if self.plan.nonnegative and _negative(point):
            record = {"point": point, "skipped": "negative values (constraint_nonnegative)", "score": None}
            _append(self.plan.journal, record)
            self._record(record)
            return True
        return False

    def finish(self, outcome: Any) -> None:
        """Record what the executor yielded for one point: a trial's outcome or a failure."""
        self.running -= 1
        if isinstance(outcome, TrialFailure):
            point = outcome.item
            record = {"point": point, "score": None, "error": outcome.error, "attempts": outcome.attempts}
        else:
            point = outcome["point"]
            record = record_trial(self.plan, self.host, outcome)
        proposal = self.search.proposal(point) if hasattr(self.search, "proposal") else None
        if proposal is not None:
            record["proposal"] = proposal
        _append(self.plan.journal, record)
        self._record(record, told=record.get("error") is not None)

    def _record(self, record: dict[str, Any], told: bool = False) -> None:
        self.records.append(record)
        self.listed.add(_key(record["point"]))
        if record.get("score") is not None or told:  # a failed trial is told with score None
            self.search.tell(record["point"], record.get("score"))
        if self.progress:
            self.progress("point", record=record, best=_best(self.records), running=self.running)


def record_trial(plan: SweepPlan, host: PluginHost, outcome: dict[str, Any]) -> dict[str, Any]:
    """The sweep record of a finished trial; its evaluation written and indexed (by the driver)."""
    point = outcome["point"]
    spec = point_config(plan, point).to_spec()
    combo = combo_dir(spec.output_dir, outcome["method"], spec.task_combo)
    index_path = combo / "eval" / "index.json"
    by_name = {s.name: s for s in spec.sources}
    for task in plan.setup.tasks:
        metrics = (outcome.get("individual") or {}).get(task.name)
        if metrics is None or task.name not in by_name:
            continue
        match = individual_match(plan.setup, task, by_name[task.name])
        if find_latest(index_path, **match) is None:  # two trials may both have computed it
            append_index(index_path, [{**match, "metric": task.metric, "metric_value": metrics[task.metric],
                                       "metrics": metrics, "time": time.time()}])
    run_dir = Path(outcome["run_dir"]) if outcome.get("run_dir") else None
    scores = {task: (metrics, subset) for task, (metrics, subset) in outcome["scores"].items()}
    result = evaluate_merge(plan.setup, host, None, method=outcome["method"], sources=spec.sources,
                            base_model=spec.base_model, combo_dir=combo, tag=run_dir.name if run_dir else point_tag(point),
                            params=point, run_dir=run_dir, scores=scores)
    summary = result["summary"]
    record = {"point": point, "summary": summary, "metrics": {t: e["value"] for t, e in result["tasks"].items()}}
    # worst: without a source named after a task, the worst task's own metric ranks
    out = {"point": point, "score": objective_score(plan, record), "summary": summary,
           "metrics": record["metrics"],
           "interference_delta": {t: e["interference_delta"] for t, e in result["tasks"].items()},
           "lambda_values": outcome["lambda_values"], "merge_s": outcome["merge_s"], "eval_s": outcome["eval_s"]}
    worker = outcome.get("worker") or {}
    if worker and worker.get("pid") != os.getpid():
        out["worker"] = worker
    return out


def repair_journal(path: Path) -> None:
    """Cut a partial last line (a write that a crash interrupted), so the next record starts on a
    line of its own; every complete record is kept."""
    if not path.is_file():
        return
    with path.open("rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def _append(path: Path, record: dict[str, Any]) -> None:
    """One record, one line, on disk before the sweep moves on (``--resume`` relies on it)."""
    with path.open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _best(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    scored = [r for r in records if r.get("score") is not None]
    # ties on the worst task's score go to the better mean, then to the earlier point
    return max(scored, key=lambda r: (r["score"], (r.get("summary") or {}).get("mean_metric") or float("-inf")),
               default=None)
