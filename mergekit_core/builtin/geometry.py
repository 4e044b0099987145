"""Geometry merge methods: Model Stock, multi-model SLERP, the Karcher mean, NuSLERP, NearSwap.

Each works per tensor on the angles or distances between the sources' tensors (task vectors
when there is a base, weights otherwise); the math, the defaults and where it differs from
mergekit 0.1.5 (``mergekit/merge_methods/{model_stock,multislerp,karcher,nuslerp,nearswap}.py``,
whose conventions are followed so that a translated mergekit config gives mergekit's numbers)
are in docs/methods.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from mergekit_core.components import MergeMethod, Param, TensorGroup
from mergekit_core.errors import MergeError, ParameterError

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _about_base(group: TensorGroup) -> list[torch.Tensor]:
    """The sources as task vectors when the merge has a base, else as weights (weights-space
    methods that work on either, as mergekit's multislerp and nuslerp with an optional base)."""
    return [x - group.base for x in group.tensors] if group.base is not None else list(group.tensors)


def _needs_base(method: MergeMethod, group: TensorGroup) -> None:
    if group.base is None:
        raise ParameterError(f"{method.label}: tensor {group.name}: {method.name} moves the base along its "
                             "sources' task vectors; give base_model")


class ModelStock(MergeMethod):
    """Model Stock (Jang et al. 2024, arXiv 2403.19522, eq. 3 for N fine-tunes).

    With offsets ``delta_i`` (shape of the tensor, float), ``cos`` the mean over pairs i < j of
    ``<delta_i, delta_j> / max(|delta_i| |delta_j|, 1e-6)`` clamped to [-1, 1], and
    ``t = N cos / (1 + (N - 1) cos)`` (0 where the denominator is under 1e-6 in magnitude, as
    mergekit), the merged delta is ``t * sum_i c_i delta_i / sum_i c_i``: with equal lambdas (the
    default) the paper's ``t * mean_i delta_i``; unequal lambdas weight the average, not the angle.
    """

    name = "model_stock"
    description = "Model Stock (Jang et al. 2024): move from the base towards the mean by a ratio from the angles."
    min_sources = 2
    benchmark_grid: ClassVar[dict[str, list[Any]] | None] = {"filter_wise": [False, True]}
    params = (
        Param("filter_wise", False, "one ratio per row (the last axis; a 1-D tensor is one row) instead of per "
              "tensor (mergekit's filter_wise)", type=bool),
    )

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        import torch

        _needs_base(self, group)
        shape = group.tensors[0].shape
        if params["filter_wise"]:
            offsets = [d.unsqueeze(0) if d.dim() == 1 else d for d in group.tensors]
        else:
            offsets = [d.reshape(-1) for d in group.tensors]
        cosines = []
        for i, a in enumerate(offsets):
            for b in offsets[i + 1:]:
                norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
                cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
        cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
        n = len(offsets)
        denominator = 1 + (n - 1) * cos
        singular = denominator.abs() < 1e-6
        t = torch.where(singular, torch.zeros_like(cos),
                        (n * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
        total = sum(group.coefficients)
        if abs(total) < 1e-8:
            raise ParameterError(f"{self.label}: the lambdas of tensor {group.name} sum to {total:g}; "
                                 "Model Stock averages the fine-tunes with them")
        if len(set(group.coefficients)) == 1:
            mean = sum(offsets) / n
        else:
            mean = sum(c * o for c, o in zip(group.coefficients, offsets)) / total
        return (t * mean).reshape(shape)


class MultiSlerp(MergeMethod):
    """Multi-model SLERP (C. Goddard, "multislerp", the blog post mergekit cites; mergekit's
    ``multislerp``): barycentric interpolation on the hypersphere by one tangent-space step.

    With weights ``w_t`` (the coefficients, divided by their sum when ``normalize_weights``),
    norms ``r_t = |x_t|`` and directions ``u_t = x_t / (r_t + eps)`` of the flattened tensors:
    ``m = sum w_t u_t / |sum w_t u_t|``, tangent ``v = sum w_t (u_t - (u_t . m) m)``,
    ``s = |v| + eps``, result ``(m cos s + v sin s / s) * sum w_t r_t``. One source is returned as
    it is; two opposite sources whose weighted directions cancel fall back to ``sum w_t x_t``;
    all-zero sources give zeros.
    """

    name = "multislerp"
    description = "Multi-model SLERP: weighted barycentre on the hypersphere (mergekit's multislerp)."
    space = "weights"  # of the task vectors when there is a base, of the weights otherwise
    benchmark_grid: ClassVar[dict[str, list[Any]] | None] = {}
    params = (
        Param("normalize_weights", True, "divide the weights (the lambdas) by their sum", type=bool),
        Param("eps", 1e-8, "added to norms before dividing", type=float, min=0.0),
    )

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:

        if len(group.tensors) == 1:
            return group.tensors[0].clone()
        out = self._merged(group, _about_base(group), params)
        return out + group.base if group.base is not None else out

    def _merged(self, group: TensorGroup, tensors: list[torch.Tensor], params: dict[str, Any]) -> torch.Tensor:
        import torch

        eps = params["eps"]
        stack = torch.stack(tensors)
        flat = stack.reshape(stack.shape[0], -1)
        weights = torch.tensor(list(group.coefficients), dtype=flat.dtype)
        if params["normalize_weights"]:
            total = weights.sum()
            if abs(float(total)) < 1e-8:
                raise ParameterError(f"{self.label}: the weights of tensor {group.name} sum to {float(total):g}; "
                                     "set normalize_weights: false to use weights that cancel out")
            weights = weights / total
        norms = torch.norm(flat, dim=-1, keepdim=True)
        units = flat / (norms + eps)
        mean = (units * weights.view(-1, 1)).sum(0)
        mean_norm = torch.norm(mean)
        if mean_norm < eps:
            if not bool(norms.any()):  # every source zero (a tensor no fine-tune changed); mergekit raises
                return torch.zeros_like(stack[0])
            if len(group.tensors) == 2:
                return (flat[0] * weights[0] + flat[1] * weights[1]).view(stack.shape[1:])
            raise MergeError(f"{self.label}: tensor {group.name}: the weighted mean of the sources' directions is "
                             "zero (opposite sources whose weights balance out); change the weights")
        mean = mean / mean_norm
        tangents = units - (units * mean).sum(-1, keepdim=True) * mean
        tangent = (tangents * weights.view(-1, 1)).sum(0)
        s = torch.norm(tangent) + eps
        result = mean * torch.cos(s) + tangent * (torch.sin(s) / s)
        return (result * (norms.squeeze(-1) * weights).sum()).view(stack.shape[1:])


class Karcher(MergeMethod):
    """Weighted Karcher (Riemannian, Fréchet) mean of the sources' directions on the unit sphere,
    scaled by their weighted mean norm (mergekit's ``karcher``, reference arXiv 2603.04972).

    ``m`` minimises ``sum a_t d(m, u_t)^2`` (``d`` the angle): starting from the normalised
    weighted Euclidean mean, ``m <- Exp_m(sum a_t theta_t / sin(theta_t) (u_t - cos(theta_t) m))``
    until the step is under ``tol`` or ``max_iter`` steps; sources with norm <= tol take no part
    in the direction. ``a_t = c_t / sum c`` (equal lambdas: 1/N, as mergekit).
    """

    name = "karcher"
    description = "Karcher mean on the hypersphere of the sources' weights, scaled by their mean norm."
    space = "weights"
    min_sources = 2
    benchmark_grid: ClassVar[dict[str, list[Any]] | None] = {}
    params = (
        Param("max_iter", 10, "gradient steps on the sphere", type=int, min=1),
        Param("tol", 1e-5, "stop when the tangent step is shorter; norms below it count as zero", type=float,
              min=0.0),
    )

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        import torch

        tol = params["tol"]
        total = sum(group.coefficients)
        if abs(total) < 1e-8:
            raise ParameterError(f"{self.label}: the weights of tensor {group.name} sum to {total:g}; "
                                 "the Karcher mean needs weights with a non-zero sum")
        alphas = [c / total for c in group.coefficients]
        tensors = group.tensors
        norms = [torch.linalg.vector_norm(x) for x in tensors]
        units = [x / n if float(n) != 0.0 else torch.zeros_like(x) for x, n in zip(tensors, norms)]
        valid = [i for i, n in enumerate(norms) if float(n) > tol]
        if not valid:
            return torch.zeros_like(tensors[0])
        vsum = sum(alphas[i] for i in valid)
        a = [alphas[i] / vsum for i in valid]
        u = [units[i] for i in valid]
        mean = torch.zeros_like(u[0])
        for ai, ui in zip(a, u):
            mean += ai * ui
        mean_norm = torch.linalg.vector_norm(mean)
        mean = u[0].clone() if float(mean_norm) < tol else mean / mean_norm
        for _ in range(params["max_iter"]):
            tangent = torch.zeros_like(mean)
            for ai, ui in zip(a, u):
                dot = torch.clamp(torch.dot(mean.flatten(), ui.flatten()), -1.0, 1.0)
                theta = torch.arccos(dot)
                if float(theta) < tol:
                    continue
                tangent += ai * (theta / torch.sin(theta)) * (ui - dot * mean)
            step = torch.linalg.vector_norm(tangent)
            if float(step) < tol:
                break
            mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
            unit_norm = torch.linalg.vector_norm(mean)
            if float(unit_norm) > tol:
                mean = mean / unit_norm
        return sum(ai * n for ai, n in zip(alphas, norms)) * mean


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, flatten: bool, row_wise: bool,
            eps: float = 1e-8) -> torch.Tensor:
    """SLERP of ``v0`` and ``v1`` (same shape, float) at ``t``: over the flattened tensors, or per
    last-axis row (``row_wise``: per first-axis column); lerp where ``1 - cos^2 <= eps^2``."""
    import torch

    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


class NuSlerp(MergeMethod):
    """NuSLERP (mergekit's ``nuslerp``): SLERP of two task vectors (two weights without a base)
    at ``t = c_2 / (c_1 + c_2)`` (0.5 when that sum is under 1e-6), optionally per row."""

    name = "nuslerp"
    description = "SLERP of two task vectors (or weights without a base) at t from their two lambdas, per row or whole."
    space = "weights"  # of the task vectors when there is a base, of the weights otherwise
    min_sources = 2
    max_sources = 2
    default_lambda_policy = "per_task"
    params = (
        Param("flatten", True, "one angle for the whole tensor (false: one per row)", type=bool),
        Param("row_wise", False, "without flatten: one angle per column (first axis) instead of per row",
              type=bool),
    )

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        c0, c1 = group.coefficients
        t = 0.5 if abs(c0 + c1) < 1e-6 else c1 / (c0 + c1)
        v0, v1 = _about_base(group)
        out = nuslerp(t, v0, v1, flatten=params["flatten"], row_wise=params["row_wise"])
        return out + group.base if group.base is not None else out


class NearSwap(MergeMethod):
    """NearSwap (alchemonaut, QuartetAnemoi-70B; mergekit's ``nearswap``): take the source's
    value where it is close to the base. Per entry, ``w = clamp(t / max(|delta|, 1e-6), 0, 1)``
    and the merged delta is ``w * delta`` (entries within ``t`` of the base are taken whole,
    farther ones interpolated towards the base by ``t / |delta|``), times the source's lambda
    (1 by default, mergekit's method)."""

    name = "nearswap"
    description = "NearSwap: per entry, move the base to the source by min(1, t / |source - base|)."
    max_sources = 1
    params = (Param("t", 0.0001, "distance below which the source's entry is taken whole", type=float, min=0.0),)

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        _needs_base(self, group)
        (delta,) = group.tensors
        weight = (params["t"] / delta.abs().clamp(min=1e-6)).clamp(min=0, max=1)
        c = group.coefficients[0]
        return weight * delta if c == 1.0 else (weight * delta).mul_(c)


METHODS = [ModelStock(), MultiSlerp(), Karcher(), NuSlerp(), NearSwap()]
