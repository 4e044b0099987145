"""The ``bayes`` optimizer: a direct ``mk merge`` searches its lambda policy's values with GP-EI,
scoring each through the context's evaluator, then the merge is streamed with the best values."""

from __future__ import annotations

import json
from typing import Any

from mergekit_core import (
    ConfigError,
    Optimizer,
    OptimizerContext,
    Param,
    ParameterError,
)
from mk_bayes_sweep.strategy import PARAMS, check_budget, closest

SHARED = tuple(p for p in PARAMS if p.name in ("budget", "init_points", "init_design", "xi", "candidates"))


def objective_value(metrics: dict[str, float], objective: str, higher: dict[str, bool]) -> float:
    """``mean`` or ``worst`` of the direction-adjusted metrics, or one task's."""
    adjusted = {t: (v if higher.get(t, True) else -v) for t, v in metrics.items()}
    if objective == "mean":
        return sum(adjusted.values()) / len(adjusted)
    if objective == "worst":
        return min(adjusted.values())
    return adjusted[objective]


class BayesOptimizer(Optimizer):
    name = "bayes"
    description = "Bayesian optimisation (GP + log EI) of the lambda policy's values on the evaluator's tasks."
    params = SHARED + (
        Param("min", 0.0, "lowest value of every searched lambda", type=float),
        Param("max", 1.0, "highest value of every searched lambda", type=float),
        Param("keys", None, "the policy values to search (default: all, e.g. task.0 ... for per_task); "
              "the others keep their configured value", type=list),
        Param("objective", "mean", "what is maximised: mean or worst of the tasks' metrics, or a task's name",
              type=str),
        Param("seed", None, "seed of the design and the acquisition search (default: the merge's seed)", type=int),
    )

    def validate(self, params: dict[str, Any]) -> None:
        check_budget(params, self.label)
        if params["min"] > params["max"]:
            raise ParameterError(f"{self.label}: min {params['min']:g} is greater than max {params['max']:g}")

    def check(self, context: OptimizerContext, params: dict[str, Any]) -> None:
        """What ``mk merge --dry-run`` can refuse: no evaluator to score merges with."""
        if context.evaluate is None:
            raise ConfigError("optimizer bayes scores merges: the config needs an evaluator "
                              "(evaluator: NAME, evaluator_params, eval_tasks)")

    def optimize(self, context: OptimizerContext, params: dict[str, Any]) -> dict[str, float]:
        from mk_bayes_sweep.search import BayesSearch
        from mk_bayes_sweep.space import Dim, Entry, Space

        if context.evaluate is None:
            raise ConfigError("optimizer bayes scores merges: the config needs an evaluator "
                              "(evaluator: NAME, evaluator_params, eval_tasks)")
        initial = dict(context.initial_values)
        plan = context.plan
        searchable = list(context.policy.space(context.policy_params, len(plan.sources), plan.layers))
        keys = list(params["keys"] or searchable)
        for key in keys:
            if key not in searchable:
                guess = closest(str(key), searchable)
                raise ConfigError(f"optimizer bayes: '{key}' is not a value of lambda policy {context.policy.name} "
                                  f"({', '.join(searchable)})" + (f"; did you mean '{guess}'?" if guess else ""))
        if not keys:
            raise ConfigError(f"optimizer bayes: lambda policy {context.policy.name} has no values to search")
        setup = getattr(context, "setup", None)
        higher = {t.name: t.higher_is_better for t in setup.tasks} if setup is not None else {}
        objective = params["objective"]
        if setup is not None and objective not in ("mean", "worst", *higher):
            guess = closest(objective, ["mean", "worst", *higher])
            raise ConfigError(f"optimizer bayes: objective '{objective}' is neither mean, worst nor one of the "
                              f"tasks ({', '.join(higher)})" + (f"; did you mean '{guess}'?" if guess else ""))
        dim = Dim("float", params["min"], params["max"])
        space = Space([Entry(k, dim) for k in keys])
        seed = params["seed"]
        if seed is None:
            seed = int(getattr(getattr(context, "spec", None), "seed", 0) or 0)
        search = BayesSearch(space, {**params, "batch_size": 1, "batch_strategy": "constant_liar"}, seed)
        progress = getattr(context, "progress", None)
        if progress:
            progress("start", total=search.budget, label="bayes")
        history: list[dict[str, Any]] = []
        while (point := search.ask()) is not None:
            metrics = context.evaluate({**initial, **point})
            if objective not in ("mean", "worst") and objective not in metrics:
                raise ConfigError(f"optimizer bayes: objective '{objective}' is not among the evaluated tasks "
                                  f"({', '.join(metrics)})")
            score = objective_value(metrics, objective, higher)
            search.tell(point, score)
            history.append({"values": point, "score": score, "metrics": metrics, "proposal": search.proposal(point)})
            if progress:
                progress("step", step=len(history), loss=score)
        if progress:
            progress("end")
        best = max(history, key=lambda h: h["score"])
        shown = ", ".join(f"{k}={v:.4g}" for k, v in best["values"].items())
        facts = {"summary": f"best {objective} {best['score']:.4f} after {len(history)} evaluations at {shown}",
                 "objective": objective, "evaluations": len(history), "best": best}
        report = getattr(context, "report", None)
        if isinstance(report, dict):
            report.update(facts)
        artifacts = getattr(context, "artifacts", None)
        if isinstance(artifacts, dict):
            artifacts["bayes_history.json"] = json.dumps({**facts, "history": history}, indent=2).encode()
        context.extras["bayes_history"] = history
        return {**initial, **best["values"]}
