"""``open_task_vectors``: the base and every source's task vector, tensor by tensor, for code that
learns coefficients from them (AdaMerging) instead of merging once.

Reading is the engine's (formats, adapters, transforms, the plan's tensor choices); LoRA deltas can
stay factored (``LowRankDelta``: ``scale * B @ A``), so nothing needs the dense ``T x (out x in)``
deltas of an adapter set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from mergekit_core.config import MergeSpec
from mergekit_core.engine.lambdas import initial_values
from mergekit_core.engine.merger import TensorMerger
from mergekit_core.engine.plan import MergePlan, TensorPlan, build_plan
from mergekit_core.engine.resolve import resolve_components
from mergekit_core.errors import UsageError
from mergekit_core.plugins import PluginHost

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class LowRankDelta:
    """A LoRA task vector kept factored: ``scale * B @ A``, transposed when ``transpose``, then
    reshaped to ``shape`` (the base tensor's). ``B``: (out, r), ``A``: (r, in), float32."""

    B: torch.Tensor
    A: torch.Tensor
    scale: float
    transpose: bool
    shape: tuple[int, ...]

    def dense(self) -> torch.Tensor:
        """The dense delta, float32, of ``shape``."""
        delta = (self.B @ self.A) * self.scale
        return (delta.T if self.transpose else delta).reshape(self.shape)


@dataclass
class TensorVectors:
    """One merged tensor: its base value and one task vector per source (float32, the base's
    shape, or a ``LowRankDelta``); ``layer``: the architecture's layer index, or None."""

    name: str
    layer: int | None
    base: torch.Tensor
    deltas: list[torch.Tensor | LowRankDelta]


class TaskVectors:
    """The task vectors of a merge's sources, read on demand.

    ``names``: the tensors the merge changes, in plan order (``layers``: their layer index,
    ``dtypes``: their stored dtype code); ``fixed()`` holds every other tensor
    of the output model (copied from the base or the one source that has it), so that
    ``fixed() | {name: merged}`` is the whole merged model.
    """

    def __init__(self, plan: MergePlan, merger: TensorMerger) -> None:
        self.plan, self.merger = plan, merger
        self._plans: dict[str, TensorPlan] = {t.name: t for t in plan.by_action("merge")}
        self.names: list[str] = list(self._plans)
        self.source_names: list[str] = [s.name for s in plan.sources]
        self.layers: dict[str, int | None] = {n: t.layer for n, t in self._plans.items()}
        self.dtypes: dict[str, str] = {n: t.dtype for n, t in self._plans.items()}
        """The stored dtype code of each tensor (``BF16``, ``F32``, ...)."""

    def load(self, name: str, *, factored: bool = True) -> TensorVectors:
        """Read tensor ``name``'s base and task vectors; plain LoRA deltas stay factored unless
        ``factored`` is False or the merge has transforms (which need dense deltas).

        Raises:
            KeyError: ``name`` is not a tensor the merge changes.
        """
        t = self._plans[name]
        raw = self.merger.read(t)
        low_rank = {} if (not factored or self.merger.transforms) else self._low_rank(t, raw.tensors)
        dense = self.merger.deltas(t, raw, skip=frozenset(low_rank))
        if dense.base is None:
            raise UsageError("task vectors need a base model (base_model)")
        by_index = dict(zip(dense.indices, self.merger.transformed(t, dense)))
        deltas: list[torch.Tensor | LowRankDelta] = [low_rank[i] if i in low_rank else by_index[i]
                                                     for i in range(len(t.contributions))]
        return TensorVectors(name, t.layer, dense.base, deltas)

    def _low_rank(self, t: TensorPlan, stored: list[torch.Tensor | None]) -> dict[int, LowRankDelta]:
        out: dict[int, LowRankDelta] = {}
        for i, c in enumerate(t.contributions):
            if c is None or c.kind != "delta" or stored[i] is not None:  # a base_layer copy: dense
                continue
            reader = self.plan.sources[i].reader
            mod, role = reader.targets()[c.key]
            if role != "weight" or not reader.is_low_rank(mod):
                continue
            f = reader.lora_factors(mod, tuple(t.shape))
            out[i] = LowRankDelta(f.B.float(), f.A.float(), float(f.scale), f.transpose, tuple(t.shape))
        return out

    def fixed(self) -> dict[str, torch.Tensor]:
        """Every tensor of the output model the merge does not change (copied from the base or the
        one source that has it), as float32."""
        return {t.name: self.merger.read_copy(t).float() for t in self.plan.by_action("copy")}


@contextmanager
def open_task_vectors(spec: MergeSpec, host: PluginHost) -> Iterator[TaskVectors]:
    """The task vectors of ``spec``'s sources (against its base model), read lazily.

    Raises:
        UsageError: the spec has no base model (task vectors are differences to it).
    """
    if spec.base_model is None:
        raise UsageError("task vectors need a base model: give base_model")
    spec = replace(spec, output=replace(spec.output, kind="model"))  # the whole model, also for adapters
    comps = resolve_components(spec, host)
    plan = build_plan(spec, host, comps.method)
    merger = TensorMerger(plan, comps.method, comps.params, comps.transforms, comps.policy,
                          initial_values(plan, comps), compute_dtype="float32")
    try:
        yield TaskVectors(plan, merger)
    finally:
        merger.close()
        plan.close()

