"""The merge report: every output tensor accounted for (merged, copied and why, left out and
why), how far the merge moved from the base, what was written."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mergekit_core.engine.plan import MergePlan
from mergekit_core.engine.stream import StreamReport

if TYPE_CHECKING:  # pragma: no cover
    from mergekit_core.engine.adapter_output import AdapterMerge


def adapter_report_dict(plan: MergePlan, merged: AdapterMerge) -> dict[str, Any]:
    """The report of an adapter output: modules merged exactly or truncated, energy kept."""
    return {
        "merged": len(merged.modules) + len(merged.full_tensors),
        "copied": 0,
        "dropped": len(plan.by_action("drop")) + len(plan.by_action("copy")),
        "exact_modules": len(merged.exact),
        "energy_kept": merged.energy_kept,
        "energy_kept_per_module": merged.energy,
        "left_out": {t.name: t.reason for t in plan.tensors if t.action != "merge"},
        "notes": plan.notes,
    }


def report_dict(plan: MergePlan, report: StreamReport) -> dict[str, Any]:
    """The report of a model output (or of merged tensors kept in memory)."""
    return {
        "merged": report.merged,
        "copied": report.copied,
        "dropped": report.dropped,
        "bytes_written": report.bytes_written,
        "relative_delta_norm": report.relative_delta_norm,
        "nonfinite_written": report.nonfinite,
        "flushed_to_zero": report.flushed,
        "left_out": {t.name: t.reason for t in plan.tensors if t.action == "drop"},
        "copied_why": _count_reasons(plan, "copy"),
        "notes": plan.notes,
    }


def _count_reasons(plan: MergePlan, action: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in plan.by_action(action):
        counts[t.reason] = counts.get(t.reason, 0) + 1
    return counts
