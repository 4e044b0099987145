"""Which components a spec names: look each one up in the plugin host, validate its parameters,
and record the versions of the plugins that provide them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mergekit_core.components import LambdaPolicy, MergeMethod, Optimizer, Transform
from mergekit_core.config import MergeSpec
from mergekit_core.errors import MergekitError, UsageError
from mergekit_core.plugins import PluginHost
from mergekit_core.version import __version__


@dataclass
class Components:
    """The resolved components of a spec, with validated parameters."""

    method: MergeMethod
    params: dict[str, Any]
    transforms: list[tuple[Transform, dict[str, Any]]]
    policy: LambdaPolicy
    policy_params: dict[str, Any]
    optimizer: Optimizer
    optimizer_params: dict[str, Any]


def resolve_components(spec: MergeSpec, host: PluginHost) -> Components:
    """Look up every named component and validate its parameters; report all problems at once."""
    problems: list[MergekitError] = []

    def attempt(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except UsageError as exc:
            problems.append(exc)
            return None

    method = attempt(lambda: host.get("merge_method", spec.method.name))
    params = attempt(lambda: method.resolve_params(spec.method.params)) if method else None
    transforms = []
    for ref in spec.transforms:
        comp = attempt(lambda ref=ref: host.get("transform", ref.name))
        tparams = attempt(lambda c=comp, r=ref: c.resolve_params(r.params)) if comp else None
        if comp is not None and tparams is not None:
            transforms.append((comp, tparams))
    policy_name = spec.lambda_policy.name if spec.lambda_policy else (
        method.default_lambda_policy if method else "scalar")
    policy = attempt(lambda: host.get("lambda_policy", policy_name))
    policy_params = None
    if policy is not None:
        given = dict(spec.lambda_policy.params) if spec.lambda_policy else {}
        declared = {p.name for p in policy.params}
        if params and "lambda" in params:  # the method's lambda is the policy's default value
            for key in ("lambda", "default"):
                if key in declared and given.get(key) is None:
                    given[key] = params["lambda"]
        policy_params = attempt(lambda: policy.resolve_params(given))
    optimizer = attempt(lambda: host.get("optimizer", spec.optimizer.name))
    opt_params = attempt(lambda: optimizer.resolve_params(spec.optimizer.params)) if optimizer else None
    if problems:
        hints = [p.hint for p in problems if p.hint]
        raise UsageError("; ".join(p.message for p in problems), hint="; ".join(hints) or None)
    return Components(method, params, transforms, policy, policy_params, optimizer, opt_params)



def versions(host: PluginHost, comps: Components) -> dict[str, str | None]:
    used = [("merge_method", comps.method.name), ("lambda_policy", comps.policy.name),
            ("optimizer", comps.optimizer.name)] + [("transform", t.name) for t, _ in comps.transforms]
    out: dict[str, str | None] = {"mergekit-core": __version__}
    for kind, name in used:
        for p in host.index[kind].get(name, []):
            out[p.plugin.distribution or p.plugin.name] = p.plugin.version
    return out
