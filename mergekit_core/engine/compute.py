"""Compute one merged tensor: read its inputs, make deltas, transform, merge, add the base back.

Reading (``load``) and computing (``merge``) are separate so that the executor can read the next
tensor on another thread while this one is computed.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mergekit_core.components import LambdaPolicy, MergeMethod, TensorGroup, Transform
from mergekit_core.engine.plan import MergePlan, TensorPlan
from mergekit_core.errors import MergeError, PluginError

if TYPE_CHECKING:  # pragma: no cover
    import torch

SUM_TOLERANCE = 1e-6


@dataclass
class Inputs:
    """What ``load`` read for one tensor: the base (or None) and one tensor per present source
    (deltas when there is a base, weights otherwise), in the compute dtype."""

    base: torch.Tensor | None
    tensors: list[torch.Tensor]
    indices: list[int]


@dataclass
class Merged:
    tensor: torch.Tensor
    delta_sq: float
    base_sq: float


class TensorMerger:
    def __init__(
        self,
        plan: MergePlan,
        method: MergeMethod,
        params: dict[str, Any],
        transforms: list[tuple[Transform, dict[str, Any]]],
        policy: LambdaPolicy,
        values: dict[str, float],
        *,
        compute_dtype: str = "float32",
        state: Any = None,
        allow_nonfinite: bool = False,
        warn: Any = None,
    ) -> None:
        import torch

        self.plan, self.method, self.params = plan, method, params
        self.transforms = [(t, p) for t, p in transforms if t.name != "identity"]
        self.policy, self.values, self.state = policy, values, state
        self.dtype = getattr(torch, compute_dtype)
        self.allow_nonfinite = allow_nonfinite
        self.warn = warn or (lambda message: None)
        self.weights_without_base = plan.base is None and plan.output_kind == "model"

    # ----------------------------------------------------------------------- reading

    def read_base(self, t: TensorPlan) -> torch.Tensor | None:
        return self.plan.base.get(t.name) if self.plan.base is not None else None

    def load(self, t: TensorPlan) -> Inputs:
        base = self.read_base(t)
        basef = base.to(self.dtype) if base is not None else None
        tensors, indices = [], []
        for i, c in enumerate(t.contributions):
            if c is None:
                if not self.weights_without_base:  # a missing source adds a zero delta (union)
                    tensors.append(zeros(t.shape, self.dtype))
                    indices.append(i)
                continue
            reader = self.plan.sources[i].reader
            if c.kind == "delta":
                x = reader.delta(c.key, basef).to(self.dtype)
                if x.shape != tuple(t.shape):
                    x = x.reshape(t.shape)
            else:
                x = own(reader.get(c.key), self.dtype)
                if basef is not None:
                    x.sub_(basef)
            tensors.append(x)
            indices.append(i)
        return Inputs(basef, tensors, indices)

    # ----------------------------------------------------------------------- computing

    def coefficients(self, t: TensorPlan, indices: list[int]) -> list[float]:
        return [float(self.policy.resolve(t.name, t.layer, i, self.values)) for i in indices]

    def transformed(self, t: TensorPlan, inputs: Inputs) -> list[torch.Tensor]:
        import torch

        if not self.transforms:
            return inputs.tensors
        out = []
        for i, x in zip(inputs.indices, inputs.tensors):
            seed = (self.plan.spec.seed * 1_000_003 + zlib.crc32(t.name.encode()) * 131 + i) % 2**63
            rng = torch.Generator().manual_seed(seed)
            for transform, params in self.transforms:
                x = self._call(transform, "apply", t.name, x, params, rng)
            out.append(x)
        return out

    def _call(self, component: Any, fn: str, *args: Any) -> Any:
        try:
            return getattr(component, fn)(*args)
        except MergeError:
            raise
        except Exception as exc:  # a plugin's bug: name it and the tensor
            if type(exc).__module__.startswith("mergekit_core"):
                raise
            raise PluginError(
                f"{component.label} failed on tensor {args[0] if isinstance(args[0], str) else args[0].name}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def merge(self, t: TensorPlan, inputs: Inputs, add_base: bool = True) -> Merged:
        """The merged tensor: weights (``add_base``) or the merged delta."""
        import torch

        base = inputs.base
        tensors = self.transformed(t, inputs)
        coefficients = self.coefficients(t, inputs.indices)
        weights_space = self.method.space == "weights" and base is not None
        if weights_space:
            tensors = [x + base for x in tensors]
        names = [self.plan.sources[i].name for i in inputs.indices]
        group = TensorGroup(t.name, t.layer, base, tensors, coefficients, names)
        if self.weights_without_base and self.method.linear:
            total = sum(self.method.linear_coefficients(group, self.params))
            if abs(total - 1.0) > SUM_TOLERANCE:
                raise MergeError(
                    f"{t.name}: without base_model a linear merge must be a weighted mean, but its "
                    f"coefficients sum to {total:g}; give base_model or normalise the weights"
                )
        out = self._call(self.method, "merge", group, self.params, self.state)
        if tuple(out.shape) != tuple(t.shape):
            raise PluginError(f"{self.method.label} returned shape {list(out.shape)} for {t.name}, "
                              f"expected {list(t.shape)}")
        out = out.to(self.dtype)
        if not bool(torch.isfinite(out).all()):
            bad = [n for n, x in zip(names, inputs.tensors) if not bool(torch.isfinite(x).all())]
            where = f" (non-finite values in source {', '.join(bad)})" if bad else ""
            message = f"{t.name}: the merged tensor has NaN or Inf{where}"
            if not self.allow_nonfinite:
                raise MergeError(message, hint="check the sources, or pass --allow-nonfinite to write it anyway")
            self.warn(message)
        if base is None:
            return Merged(out, 0.0, 0.0)
        base_sq = float(torch.sum(base * base))
        if weights_space:
            delta = out - base
            return Merged(out if add_base else delta, float(torch.sum(delta * delta)), base_sq)
        delta_sq = float(torch.sum(out * out))
        return Merged(out.add_(base) if add_base else out, delta_sq, base_sq)


def own(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` as a tensor the caller may change in place.

    Readers may hand out views of a memory-mapped file that later reads share, so a tensor that
    is already in ``dtype`` is copied rather than modified.
    """
    return x.to(dtype, copy=True) if x.dtype == dtype else x.to(dtype)


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    import torch

    return torch.zeros(shape, dtype=dtype)
