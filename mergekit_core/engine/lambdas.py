"""Lambda values for a merge: the policy's initial values, or what an optimizer that needs no
evaluation chooses (``none``). Optimizers that score merges get their context one floor up, in
``mergekit_core.evaluation.optimize``, and hand the engine only the values they chose."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mergekit_core.components import OptimizerContext
from mergekit_core.engine.plan import MergePlan
from mergekit_core.engine.resolve import Components
from mergekit_core.plugins import PluginHost


def initial_values(plan: MergePlan, comps: Components) -> dict[str, float]:
    """The lambda policy's values as configured."""
    return dict(comps.policy.initial_values(comps.policy_params, len(plan.sources), plan.layers))


def lambda_values(plan: MergePlan, comps: Components, host: PluginHost,
                  build_merged: Callable[[dict[str, float]], dict[str, Any]]) -> dict[str, float]:
    """Ask the optimizer for the lambda policy's values, with a context that has no evaluation.

    ``build_merged(values)``: the merged weights for any values, in memory (the caller gives it,
    so that this module needs no merge of its own).
    """
    context = OptimizerContext(plan=plan, policy=comps.policy, policy_params=comps.policy_params,
                               initial_values=initial_values(plan, comps), build_merged=build_merged,
                               extras={"host": host}, spec=plan.spec, host=host)
    comps.optimizer.check(context, comps.optimizer_params)
    return dict(comps.optimizer.optimize(context, comps.optimizer_params))
