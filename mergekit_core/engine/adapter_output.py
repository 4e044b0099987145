"""Merge adapters into one LoRA adapter.

Where the method is linear and every source is plain LoRA, the scaled factors are concatenated:
exact, rank = sum of ranks (or a factored truncated SVD when ``output.adapter_rank`` is smaller).
Otherwise the exact dense deltas are merged and the result is truncated by SVD to the output
rank (default: the largest source rank). The fraction of energy kept is recorded per module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mergekit_core.components import TensorGroup
from mergekit_core.engine.merger import TensorMerger
from mergekit_core.engine.plan import MergePlan, TensorPlan
from mergekit_core.errors import MergeError
from mergekit_core.io.lowrank import (
    Truncation,
    concat_factors,
    factored_svd_truncate,
    svd_truncate,
)
from mergekit_core.io.peft_reader import PREFIX, AdapterReader
from mergekit_core.io.peft_writer import LoraModuleOut

if TYPE_CHECKING:  # pragma: no cover
    import torch


DEFAULT_DENSE_RANK = 16
"""Output rank for modules whose sources have no LoRA rank (IA3), unless output.adapter_rank is set."""


@dataclass
class AdapterMerge:
    modules: list[LoraModuleOut] = field(default_factory=list)
    full_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    energy: dict[str, float] = field(default_factory=dict)
    exact: list[str] = field(default_factory=list)
    kept_sq: float = 0.0
    total_sq: float = 0.0

    @property
    def energy_kept(self) -> float:
        return self.kept_sq / self.total_sq if self.total_sq > 0 else 1.0


def _layer_type(merger: TensorMerger, t: TensorPlan) -> str:
    for i, c in enumerate(t.contributions):
        if c is None:
            continue
        reader: AdapterReader = merger.plan.sources[i].reader
        mod, _ = reader.targets()[c.key]
        if mod.layer_type == "embedding":
            return "embedding"
    return "conv" if len(t.shape) > 2 else "linear"


def _to_ba(delta: torch.Tensor, layer: str, fan_in_fan_out: bool) -> torch.Tensor:
    if layer == "embedding" or (layer == "linear" and fan_in_fan_out):
        return delta.T
    return delta.flatten(1)


def _module_out(t: TensorPlan, layer: str, A: torch.Tensor, B: torch.Tensor) -> LoraModuleOut:
    if layer == "conv":
        A = A.reshape(A.shape[0], *t.shape[1:])
        B = B.reshape(B.shape[0], B.shape[1], *([1] * (len(t.shape) - 2)))
    assert t.module is not None
    return LoraModuleOut(t.module, A.contiguous(), B.contiguous(), layer)


def _is_exact(merger: TensorMerger, t: TensorPlan) -> bool:
    if not merger.method.linear or merger.transforms:
        return False
    for i, c in enumerate(t.contributions):
        if c is None:
            continue
        reader: AdapterReader = merger.plan.sources[i].reader
        if c.kind != "delta" or not reader.is_low_rank(reader.targets()[c.key][0]):
            return False
    return True


def _record(result: AdapterMerge, name: str, trunc: Truncation) -> None:
    total = float((trunc.singular_values.double() ** 2).sum())
    result.energy[name] = trunc.energy_kept
    result.kept_sq += trunc.energy_kept * total
    result.total_sq += total


def check_base_copies(plan: MergePlan) -> None:
    """Every ``base_layer`` copy a source adapter saved must be the base's own tensor (up to the
    dtype the adapter was saved in): a LoRA output can carry its delta, not a changed base."""
    for copy in plan.base_copies:
        source = plan.sources[copy.source]
        saved = source.reader.get(copy.key)
        base = plan.base.get(copy.base_key)
        if tuple(saved.shape) != tuple(base.shape) or not bool((saved == base.to(saved.dtype)).all()):
            raise MergeError(
                f"{copy.name}: source {source.name} ({source.spec.path}) saved a base_layer copy {copy.key!r} that "
                f"differs from the base model's {copy.base_key}; a LoRA adapter cannot carry that change: write a "
                "full model instead (output.kind: model, or --kind model)"
            )


def merge_adapters(merger: TensorMerger, out_rank: int | None, progress: Any = None) -> AdapterMerge:
    plan = merger.plan
    check_base_copies(plan)
    fan_in_fan_out = plan.sources[0].reader.config.fan_in_fan_out
    result = AdapterMerge()
    todo = [t for t in plan.tensors if t.action == "merge"]
    if progress:
        progress("start", total=len(todo), total_bytes=0)
    for t in todo:
        kinds = {c.kind for c in t.contributions if c is not None}
        if "replacement" in kinds:  # modules_to_save: a full merged tensor
            merged = merger.merge(t, merger.load(t)).tensor
            src = next(i for i, c in enumerate(t.contributions) if c is not None)
            rel = t.contributions[src].key.removeprefix(PREFIX)
            result.full_tensors[rel] = merged
            result.modules_to_save.append(rel.rsplit(".", 1)[0])
        elif _is_exact(merger, t):
            _exact(merger, t, out_rank, result)
        else:
            _dense(merger, t, out_rank, fan_in_fan_out, result)
        if progress:
            progress("tensor", name=t.name, nbytes=0)
    if progress:
        progress("end")
    result.modules_to_save = sorted(set(result.modules_to_save))
    return result


def _exact(merger: TensorMerger, t: TensorPlan, out_rank: int | None, result: AdapterMerge) -> None:
    indices = list(range(len(t.contributions)))
    if merger.plan.spec.merge_mode != "union":
        indices = [i for i, c in enumerate(t.contributions) if c is not None]
    names = [merger.plan.sources[i].name for i in indices]
    group = TensorGroup(t.name, t.layer, None, [], merger.coefficients(t, indices), names)
    coefficients = merger.linear_coefficients(group)
    factors, weights = [], []
    for i, c in zip(indices, coefficients):
        contribution = t.contributions[i]
        if contribution is None:
            continue
        reader: AdapterReader = merger.plan.sources[i].reader
        f = reader.lora_factors(reader.targets()[contribution.key][0], tuple(t.shape))
        factors.append((f.B, f.A))
        weights.append(c * f.scale)
    B, A = concat_factors(factors, weights)
    layer = _layer_type(merger, t)
    if out_rank is not None and out_rank < A.shape[0]:
        trunc = factored_svd_truncate(B, A, out_rank)
        _record(result, t.name, trunc)
        B, A = trunc.B, trunc.A
    else:
        result.energy[t.name] = 1.0
        result.exact.append(t.name)
    result.modules.append(_module_out(t, layer, A, B))


def _dense(merger: TensorMerger, t: TensorPlan, out_rank: int | None, fan_in_fan_out: bool,
           result: AdapterMerge) -> None:
    delta = merger.merge(t, merger.load(t), add_base=False).tensor
    layer = _layer_type(merger, t)
    ranks = []
    for i, c in enumerate(t.contributions):
        if c is not None:
            reader: AdapterReader = merger.plan.sources[i].reader
            ranks.append(reader.targets()[c.key][0].rank or DEFAULT_DENSE_RANK)
    trunc = svd_truncate(_to_ba(delta, layer, fan_in_fan_out), out_rank or max(ranks))
    _record(result, t.name, trunc)
    result.modules.append(_module_out(t, layer, trunc.A, trunc.B))
