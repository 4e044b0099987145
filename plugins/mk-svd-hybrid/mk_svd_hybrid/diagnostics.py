"""What ``diagnostics.json`` holds: per-tensor error, rank, energy and size; totals; histograms."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from mk_svd_hybrid.codec import Record

HIST_EDGES = [10.0**e for e in range(-8, 3)]
"""Bin edges of the coefficient-magnitude histograms: decades from 1e-8 to 100 (plus under/over)."""


def _histogram(x: torch.Tensor) -> list[int]:
    if x.numel() == 0:
        return [0] * (len(HIST_EDGES) + 1)
    edges = torch.tensor(HIST_EDGES, dtype=torch.float32)
    idx = torch.bucketize(x.abs().float().reshape(-1), edges)
    return torch.bincount(idx, minlength=len(HIST_EDGES) + 1).tolist()


class Diagnostics:
    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = list(tasks)
        self.tensors: dict[str, dict[str, Any]] = {}
        self.hist = {"fp16": [0] * (len(HIST_EDGES) + 1), "quantized": [0] * (len(HIST_EDGES) + 1)}
        self.sq_error = [0.0] * len(tasks)
        self.sq_norm = [0.0] * len(tasks)
        self.artifact_bytes = 0
        self.original_bytes = 0
        self.fp32_bytes = 0
        self.compress_s = 0.0
        self.reconstruct_s = 0.0

    def add(self, name: str, record: Record, originals: Sequence[torch.Tensor], rebuilt: Sequence[torch.Tensor],
            *, itemsize: int, compress_s: float, reconstruct_s: float,
            coefficients: dict[str, torch.Tensor]) -> None:
        errors = []
        for t, (x, y) in enumerate(zip(originals, rebuilt)):
            err = float(torch.sum((x.float() - y) ** 2))
            norm = float(torch.sum(x.float() ** 2))
            self.sq_error[t] += err
            self.sq_norm[t] += norm
            errors.append(math.sqrt(err / norm) if norm > 0 else (0.0 if err == 0 else math.inf))
        numel = originals[0].numel()
        original = len(originals) * numel * itemsize
        self.artifact_bytes += record.nbytes
        self.original_bytes += original
        self.fp32_bytes += len(originals) * numel * 4
        self.compress_s += compress_s
        self.reconstruct_s += reconstruct_s
        for region, values in coefficients.items():
            self.hist[region] = [a + b for a, b in zip(self.hist[region], _histogram(values))]
        meta = record.meta
        entry: dict[str, Any] = {
            "kind": meta["kind"], "shape": meta["shape"],
            "relative_error": {task: e for task, e in zip(self.tasks, errors)},
            "mean_relative_error": sum(errors) / len(errors),
            "artifact_bytes": record.nbytes, "original_bytes": original,
            "compression_ratio": original / record.nbytes if record.nbytes else None,
            "compress_s": round(compress_s, 6), "reconstruct_s": round(reconstruct_s, 6),
        }
        if meta["kind"] == "matrix":
            entry.update(rank=[c["rank"] for c in meta["clusters"]],
                         fp16_rank=[c["fp16_rank"] for c in meta["clusters"]],
                         energy_kept=[c["energy_kept"] for c in meta["clusters"]],
                         signal_fraction=meta["signal_fraction"], noise=meta["noise"])
        self.tensors[name] = entry

    def summary(self) -> dict[str, Any]:
        per_task = {t: math.sqrt(e / n) if n > 0 else 0.0 for t, e, n in zip(self.tasks, self.sq_error, self.sq_norm)}
        return {
            "overall": {
                "tensors": len(self.tensors),
                "artifact_bytes": self.artifact_bytes,
                "original_bytes": self.original_bytes,
                "compression_ratio": self.original_bytes / self.artifact_bytes if self.artifact_bytes else None,
                "compression_ratio_vs_fp32": self.fp32_bytes / self.artifact_bytes if self.artifact_bytes else None,
                "bits_per_entry_per_task": 8 * self.artifact_bytes / (self.fp32_bytes / 4) if self.fp32_bytes else None,
                "relative_error": per_task,
                "mean_relative_error": sum(per_task.values()) / len(per_task) if per_task else 0.0,
                "compress_s": round(self.compress_s, 4),
                "reconstruct_s": round(self.reconstruct_s, 4),
            },
            "coefficient_histograms": {"bin_edges": HIST_EDGES, "counts": self.hist,
                                       "note": "counts of |coefficient| per decade; first bin below 1e-8"},
            "tensors": self.tensors,
        }
