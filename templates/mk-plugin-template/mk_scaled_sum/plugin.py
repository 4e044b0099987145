"""The plugin module the entry point names: components and the hook that returns them.

It is imported by ``mk --help`` and ``mk plugins list``: keep it light (torch is imported inside
``merge``) and import only ``mergekit_core`` and ``mergekit_core.api``.
"""

from __future__ import annotations

from typing import Any

from mergekit_core import MergeMethod, Param, TensorGroup, hookimpl


class ScaledSum(MergeMethod):
    """``merged = scale * sum_t lambda_t * delta_t``.

    ``group.tensors[t]`` is source t's task vector (float32, the tensor's shape) and
    ``group.coefficients[t]`` its lambda from the lambda policy (``--lambda``, ``per_task``, ...):
    a method that ignores the coefficients silently ignores every lambda policy.
    """

    name = "scaled_sum"
    description = "The sum of the task vectors, each times its lambda, times a scale."
    params = (
        # a 'lambda' parameter is the lambda policy's default value: `--lambda 0.3` sets every coefficient
        Param("lambda", 1.0, "lambda of every source unless a lambda policy says otherwise", type=float),
        Param("scale", 1.0, "factor applied to the weighted sum", type=float, min=0.0),
    )
    linear = True  # merged = sum(c_t * delta_t): the engine merges LoRA adapters exactly

    def linear_coefficients(self, group: TensorGroup, params: dict[str, Any]) -> list[float]:
        return [params["scale"] * c for c in group.coefficients]

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> Any:
        import torch

        out = torch.zeros_like(group.tensors[0])
        for c, delta in zip(self.linear_coefficients(group, params), group.tensors):
            out.add_(delta, alpha=c)
        return out


@hookimpl
def mk_merge_methods() -> list[MergeMethod]:
    return [ScaledSum()]
