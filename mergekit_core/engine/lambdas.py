"""Choosing lambda: the optimizer hook's wiring (initial values from the lambda policy, merged
weights and, with an evaluator, task scores for any values)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mergekit_core.components import OptimizerContext
from mergekit_core.engine.plan import MergePlan
from mergekit_core.engine.resolve import Components
from mergekit_core.evaluation.scoring import score, setup_from_spec
from mergekit_core.plugins import PluginHost


def lambda_values(plan: MergePlan, comps: Components, host: PluginHost,
                  build_merged: Callable[[dict[str, float]], dict[str, Any]]) -> dict[str, float]:
    """Ask the optimizer for the lambda policy's values.

    ``build_merged(values)``: the merged weights for any values, in memory (the caller gives it,
    so that this module needs no merge of its own). When the config names an evaluator, the
    optimizer may also score values on its tasks.
    """
    spec = plan.spec
    initial = comps.policy.initial_values(comps.policy_params, len(plan.sources), plan.layers)
    evaluate = None
    if spec.sweep.get("evaluator"):

        setup = setup_from_spec(host, spec)

        def evaluate(values: dict[str, float]) -> dict[str, float]:
            model = build_merged(values)
            return {t.name: score(setup, model, t)[0][t.metric] for t in setup.tasks}

    context = OptimizerContext(plan=plan, policy=comps.policy, policy_params=comps.policy_params,
                               initial_values=initial, evaluate=evaluate, build_merged=build_merged,
                               extras={"host": host})
    return dict(comps.optimizer.optimize(context, comps.optimizer_params))
