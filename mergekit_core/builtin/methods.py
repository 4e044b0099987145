"""Built-in merge methods: uniform, weighted, task_arithmetic, weighted_delta, slerp.

The linear ones only declare their coefficients; :class:`LinearMethod` does the arithmetic, and
the engine uses the same coefficients to concatenate adapter factors exactly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from mergekit_core.components import MergeMethod, Param, PrepareContext, TensorGroup
from mergekit_core.errors import ParameterError

if TYPE_CHECKING:  # pragma: no cover
    import torch

NORMALIZE_EPS = 1e-8


class LinearMethod(MergeMethod):
    """merged = sum_t c_t * x_t, with c_t from :meth:`linear_coefficients`."""

    linear = True

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        coefficients = self.linear_coefficients(group, params)
        out = group.tensors[0] * coefficients[0]
        for c, t in zip(coefficients[1:], group.tensors[1:]):
            out.add_(t, alpha=c)
        return out


class Uniform(LinearMethod):
    name = "uniform"
    aliases = ("simple_average",)  # FusionBench: the plain mean of the full weights
    description = "Mean of the sources (model soup); for adapters, the mean of their deltas."
    default_lambda_policy = "scalar"
    benchmark_grid: ClassVar[dict[str, list[Any]] | None] = {}

    def linear_coefficients(self, group: TensorGroup, params: dict[str, Any]) -> list[float]:
        n = len(group.coefficients)
        return [1.0 / n] * n


class Weighted(LinearMethod):
    name = "weighted"
    # mergekit's linear and FusionBench's weighted_average: sum_t w_t theta_t / sum_t w_t, normalised by
    # default, which is this method's default. Without a base, normalize: false is mergekit's plain
    # weighted sum of the weights, sum_t w_t theta_t (the engine's weighted-mean check stands aside);
    # with a base it is theta_0 + sum_t w_t delta_t (mergekit's linear ignores a base: mk config
    # convert makes it a source). Weights summing to 0 are an error here; they come from the lambda
    # policy.
    aliases = ("linear", "weighted_average")
    description = "Weighted mean of the sources; weights come from the lambda policy (per_task by default)."
    default_lambda_policy = "per_task"
    benchmark_grid: ClassVar[dict[str, list[Any]] | None] = {}
    params = (
        Param("normalize", True, "divide by the sum of the weights (as mergekit's linear); false without a "
              "base: the plain weighted sum of the sources' weights (mergekit's normalize: false)", type=bool),
    )

    def linear_coefficients(self, group: TensorGroup, params: dict[str, Any]) -> list[float]:
        weights = list(group.coefficients)
        if params["normalize"]:
            total = sum(weights)
            if abs(total) < NORMALIZE_EPS:
                raise ParameterError(
                    f"weighted: the weights of tensor {group.name} sum to {total}; "
                    "set normalize: false to use weights that cancel out"
                )
            weights = [w / total for w in weights]
        return weights


class PolicyWeighted(LinearMethod):
    """c_t is the lambda policy's coefficient, as is."""

    def linear_coefficients(self, group: TensorGroup, params: dict[str, Any]) -> list[float]:
        return list(group.coefficients)


class TaskArithmetic(PolicyWeighted):
    name = "task_arithmetic"
    aliases = ("task_vector",)
    description = "Task arithmetic (Ilharco et al. 2023): base + lambda * sum of task vectors."
    default_lambda_policy = "scalar"
    benchmark_grid: ClassVar[dict[str, list[Any]] | None] = {"lambda": [0.1, 0.2, 0.3, 0.4, 0.5, 0.7]}
    params = (
        Param(
            "lambda",
            0.3,
            "scaling of the summed task vectors; the default lambda of the scalar policy "
            "(0.3 as in AdaMerging and FusionBench; mergekit uses 1.0)",
            type=float,
        ),
    )


class WeightedDelta(PolicyWeighted):
    name = "weighted_delta"
    description = "base + sum_t lambda_t * delta_t, one lambda per task by default (per_task policy)."
    default_lambda_policy = "per_task"
    benchmark_grid: ClassVar[dict[str, list[Any]] | None] = {"lambda": [0.1, 0.2, 0.3, 0.4, 0.5, 0.7]}
    params = (Param("lambda", 0.3, "initial lambda of every task when the policy gives none", type=float),)


class Slerp(MergeMethod):
    name = "slerp"
    description = "Spherical interpolation between two sources' weights (lerp when nearly parallel)."
    space = "weights"
    min_sources = 2
    max_sources = 2
    params = (
        Param("t", 0.5, "interpolation factor: 0 gives the first source, 1 the second; or rules by tensor-name "
              "pattern [{match: GLOB, value: V}], V a number or a list across layers (mergekit's t)",
              type=(float, list)),
        Param("dot_threshold", 0.9995, "above this |cos| the tensors are treated as parallel (lerp)",
              type=float, min=0.0, max=1.0),
    )
    needs_prepare = True  # only the plan's layers, for t given across layers; no pass over the tensors

    def validate(self, params: dict[str, Any]) -> None:
        from mergekit_core.builtin.tensor_values import check_rules

        check_rules(params["t"], f"{self.label}: t", lo=-math.inf, hi=math.inf)
        if isinstance(params["t"], list) and any("values" in rule for rule in params["t"]):
            raise ParameterError(f"{self.label}: t is one number per tensor; write its rules with 'value', "
                                 "not 'values'")

    def prepare(self, context: PrepareContext, params: dict[str, Any]) -> list[int]:
        plan = getattr(context, "plan", None)
        return list(plan.layers) if plan is not None else []

    def t_for(self, group: TensorGroup, params: dict[str, Any], layers: Any) -> float:
        """``t`` for one tensor: the number, or the first rule that matches its name."""
        from mergekit_core.builtin.tensor_values import value_for

        t = value_for(params["t"], group.name, group.layer, 0, layers or [])
        if t is None:
            raise ParameterError(f"{self.label}: no rule of t matches tensor {group.name}; "
                                 "add a rule without 'match' as the last one")
        return t

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        import torch

        v0, v1 = group.tensors
        t = self.t_for(group, params, state)
        n0, n1 = torch.linalg.vector_norm(v0), torch.linalg.vector_norm(v1)
        u0 = v0 / n0 if n0 > 1e-8 else v0
        u1 = v1 / n1 if n1 > 1e-8 else v1
        dot = float(torch.sum(u0 * u1).clamp(-1.0, 1.0))
        if abs(dot) > params["dot_threshold"]:
            return torch.lerp(v0, v1, t)
        theta0 = math.acos(dot)
        sin0 = math.sin(theta0)
        s0 = math.sin(theta0 - t * theta0) / sin0
        s1 = math.sin(t * theta0) / sin0
        return s0 * v0 + s1 * v1


METHODS = [Uniform(), Weighted(), TaskArithmetic(), WeightedDelta(), Slerp()]
