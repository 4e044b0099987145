"""Optimizers that score merges: their context is composed here, one floor above the engine, and
the engine is handed only the lambda values they chose.

``optimize_and_merge(spec, host)`` is what ``mk merge`` runs: resolve, plan, let the optimizer
choose the values (with the config's evaluation, the merged weights for any values and the plugin
host at hand), then ``run_merge`` with those values, the optimizer's files in the run bundle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mergekit_core.components import Optimizer, OptimizerContext, origin
from mergekit_core.config import ComponentRef, MergeSpec
from mergekit_core.engine.lambdas import initial_values
from mergekit_core.engine.plan import build_plan
from mergekit_core.engine.resolve import resolve_components
from mergekit_core.engine.run import MergeResult, merged_weights, run_merge
from mergekit_core.errors import ConfigError, MergekitError, PluginError
from mergekit_core.evaluation.scoring import EvalSetup, score, setup_from_spec
from mergekit_core.plugins import PluginHost


@dataclass
class Chosen:
    """What an optimizer chose: the spec to merge (its lambda policy possibly set by the
    optimizer), the values, and the files and facts it leaves in the run bundle."""

    spec: MergeSpec
    values: dict[str, float]
    artifacts: dict[str, bytes] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


def with_optimizer_policy(spec: MergeSpec, host: PluginHost) -> MergeSpec:
    """The spec with the merge method and the lambda policy its optimizer needs, when the
    optimizer names them (``Optimizer.merge_method``, ``Optimizer.lambda_policy``).

    Raises:
        ConfigError: the config names a different lambda policy than the optimizer's.
    """
    optimizer = host.get("optimizer", spec.optimizer.name)
    params = optimizer.resolve_params(spec.optimizer.params)
    method = optimizer.merge_method(params, spec.method.name)
    if method is not None:
        spec = replace(spec, method=ComponentRef(method[0], dict(method[1])))
    wanted = optimizer.lambda_policy(params)
    if wanted is None:
        return spec
    if spec.lambda_policy is None:
        return replace(spec, lambda_policy=ComponentRef(wanted))
    if spec.lambda_policy.name != wanted:
        raise ConfigError(f"optimizer {optimizer.name} learns the values of lambda policy {wanted}, but the config "
                          f"names lambda_policy {spec.lambda_policy.name}",
                          hint=f"leave lambda_policy out (mk sets {wanted}) or change the optimizer's parameters")
    return spec


def _setup(spec: MergeSpec, host: PluginHost) -> EvalSetup | None:
    if not spec.sweep.get("evaluator"):
        return None
    return setup_from_spec(host, spec, split=spec.sweep.get("split") or "validation")


@contextmanager
def optimizer_context(spec: MergeSpec, host: PluginHost, progress: Callable[..., None] | None = None
                      ) -> Iterator[tuple[OptimizerContext, Optimizer, dict[str, Any]]]:
    """The context ``mk merge`` gives the spec's optimizer, the optimizer and its resolved
    parameters (for ``choose_values``, and for tests of an optimizer plugin).

    Raises:
        ConfigError: the optimizer's policy conflicts with the config's, or the evaluation is
            misconfigured.
    """
    spec = with_optimizer_policy(spec, host)
    comps = resolve_components(spec, host)
    plan = build_plan(spec, host, comps.method)
    try:
        setup = _setup(spec, host)
        build = merged_weights(spec, host)
        evaluate = None
        if setup is not None:
            def evaluate(values: dict[str, float]) -> dict[str, float]:
                model = build(values)
                return {t.name: score(setup, model, t)[0][t.metric] for t in setup.tasks}

        yield (OptimizerContext(plan=plan, policy=comps.policy, policy_params=comps.policy_params,
                                initial_values=initial_values(plan, comps), evaluate=evaluate, build_merged=build,
                                extras={"host": host}, spec=spec, setup=setup, host=host, progress=progress),
               comps.optimizer, comps.optimizer_params)
    finally:
        plan.close()


def choose_values(spec: MergeSpec, host: PluginHost, progress: Callable[..., None] | None = None) -> Chosen:
    """Run the spec's optimizer with the full context and return what it chose.

    Raises:
        ConfigError: the optimizer's policy conflicts with the config's, or the evaluation is
            misconfigured.
        PluginError: the optimizer failed, or asked for files with names that are not plain file
            names.
    """
    with optimizer_context(spec, host, progress) as (context, optimizer, params):
        optimizer.check(context, params)
        try:
            values = optimizer.optimize(context, params)
        except (MergekitError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise PluginError(f"optimizer {optimizer.name} ({origin(optimizer)}) failed: "
                              f"{type(exc).__name__}: {exc}") from exc
        values = {str(k): float(v) for k, v in dict(values).items()}
        for name in context.artifacts:
            if not name or Path(name).name != name or name.startswith("."):
                raise PluginError(f"optimizer {optimizer.name} asked to write {name!r} into the run bundle; "
                                  "files there must be plain file names")
        return Chosen(context.spec, values, dict(context.artifacts), dict(context.report))


def optimize_and_merge(spec: MergeSpec, host: PluginHost, *, progress: Callable[..., None] | None = None,
                       optimizer_progress: Callable[..., None] | None = None, **run_kwargs: Any) -> MergeResult:
    """``mk merge``: let the optimizer choose the lambda values, then stream the merge with them.

    With the ``none`` optimizer this is ``run_merge`` itself. ``run_kwargs`` go to ``run_merge``
    (``in_memory``, ``force``, ``hash_inputs``, ...).
    """
    if spec.optimizer.name == "none":
        return run_merge(spec, host, progress=progress, **run_kwargs)
    from mergekit_core.engine.write import check_outputs

    check_outputs(spec, save=spec.output.save and not run_kwargs.get("in_memory", False),
                  write_bundle=run_kwargs.get("write_bundle", True), force=run_kwargs.get("force", False))
    chosen = choose_values(spec, host, optimizer_progress)
    return run_merge(chosen.spec, host, progress=progress, values=chosen.values, artifacts=chosen.artifacts,
                     optimizer_report=chosen.report, **run_kwargs)
