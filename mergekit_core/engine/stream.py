"""Stream a planned model merge: one tensor at a time, the next one read while this one computes.

Memory is bounded by a few tensors (the inputs of this tensor and of the next), never by the
model. Output goes to a :class:`StreamingSafetensorsWriter`, or into a dict for in-memory use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mergekit_core.engine.merger import (
    Merged,
    TensorMerger,
    flushed_to_zero,
    loses_small_values,
)
from mergekit_core.engine.plan import TensorPlan
from mergekit_core.io.dtypes import all_finite, check_finite, torch_dtype
from mergekit_core.io.safetensors_header import TensorInfo

if TYPE_CHECKING:  # pragma: no cover
    import torch

Progress = Callable[..., None]


@dataclass
class StreamReport:
    merged: int = 0
    copied: int = 0
    dropped: int = 0
    bytes_written: int = 0
    delta_sq: float = 0.0
    base_sq: float = 0.0
    nonfinite: dict[str, int] = field(default_factory=dict)
    """Tensors written with NaN or Inf (only with ``allow_nonfinite``): name -> count."""
    flushed: dict[str, int] = field(default_factory=dict)
    """Tensors whose values too small for the output dtype were written as 0: name -> count."""

    @property
    def relative_delta_norm(self) -> float | None:
        return (self.delta_sq / self.base_sq) ** 0.5 if self.base_sq > 0 else None


def output_infos(merger: TensorMerger, out_dtype: str | None) -> list[TensorInfo]:
    """Name, shape and dtype of every tensor that will be written, in order."""
    from mergekit_core.io.dtypes import is_float, safetensors_code

    infos = []
    for t in merger.plan.tensors:
        if t.action == "drop":
            continue
        dtype = t.dtype
        if out_dtype and is_float(dtype) and t.action == "merge":
            dtype = safetensors_code(torch_dtype(out_dtype))
        infos.append(TensorInfo(t.name, t.shape, dtype))
    return infos


def _work(merger: TensorMerger, t: TensorPlan) -> tuple[TensorPlan, Any]:
    """What the reader thread does for one tensor: read (and subtract the base)."""
    if t.action == "merge":
        return t, merger.read(t)
    if t.action == "copy":
        return t, merger.read_copy(t)
    return t, None


def _prefetched(merger: TensorMerger, tensors: list[TensorPlan]) -> Iterator[tuple[TensorPlan, Any]]:
    if not tensors:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mk-read") as pool:
        future = pool.submit(_work, merger, tensors[0])
        for nxt in tensors[1:]:
            current = future.result()
            future = pool.submit(_work, merger, nxt)
            yield current
        yield future.result()


def _nonfinite_output(merger: TensorMerger, t: TensorPlan, loaded: Any, out: torch.Tensor,
                      computed: torch.Tensor | None) -> int:
    """The merge, or its cast to the output dtype, must not write NaN or Inf (the same rule as for
    non-finite inputs); returns how many such values ``allow_nonfinite`` lets through."""
    if all_finite(out):
        return 0
    if computed is None:  # the fused path keeps no float32 copy: recompute it to tell why
        computed = merger.merge(t, merger.deltas(t, loaded)).tensor
    already_warned = not all_finite(computed)  # merge() reported it
    return check_finite(t.name, out, allow=merger.allow_nonfinite, computed=computed,
                        warn=None if already_warned else merger.warn)


def finite_by_norms(merged: Merged, computed: torch.dtype, written: torch.dtype) -> bool:
    """Whether the merge's sums of squares (``Merged.delta_sq``, ``base_sq``) already prove the
    written tensor finite.

    Finite sums (of float32 squares, chunk by chunk) bound every |base| and |delta| by the square
    root of the compute dtype's largest value, so |base + delta| is below twice that: finite in any
    output dtype whose largest value is above it (bfloat16 and float32 from float32; not float16).
    Saves a pass over every written tensor, on the fused path and the method path alike.
    """
    import math

    import torch

    bound = 2 * math.sqrt(torch.finfo(computed).max)
    return (merged.normed and math.isfinite(merged.delta_sq) and math.isfinite(merged.base_sq) and written.is_floating_point
            and torch.finfo(written).max > bound)


class _BackgroundSink:
    """Calls ``sink`` on one writer thread, at most one call in flight: the write (and hash) of
    this tensor overlaps the merge of the next; costs one output tensor of memory. An error in the
    sink is raised at the next call or at :meth:`drain`."""

    def __init__(self, sink: Callable[[str, torch.Tensor], None]) -> None:
        self.sink = sink
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mk-write")
        self.pending: Future[None] | None = None

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        self.drain()
        self.pending = self.pool.submit(self.sink, name, tensor)

    def drain(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def close(self) -> None:
        """Wait for the write in flight (without raising its error twice) and stop the thread."""
        if self.pending is not None:
            wait([self.pending])
        self.pool.shutdown()


def stream_merge(
    merger: TensorMerger,
    sink: Callable[[str, torch.Tensor], None],
    planned: list[TensorInfo],
    progress: Progress | None = None,
    *,
    background_writes: bool = False,
) -> StreamReport:
    """Merge every planned tensor and hand it, cast to its planned dtype (``output_infos``), to
    ``sink`` in plan order; with ``background_writes``, on a writer thread (one tensor in flight:
    the sink must not keep the tensor's memory shared with later work, as file writers do not)."""
    if not background_writes:
        return _stream(merger, sink, planned, progress)
    writer = _BackgroundSink(sink)
    try:
        report = _stream(merger, writer, planned, progress)
        writer.drain()
    finally:
        writer.close()
    return report


def _stream(merger: TensorMerger, sink: Callable[[str, torch.Tensor], None], planned: list[TensorInfo],
            progress: Progress | None) -> StreamReport:
    report = StreamReport()
    todo = [t for t in merger.plan.tensors if t.action != "drop"]
    report.dropped = len(merger.plan.tensors) - len(todo)
    infos = {i.name: i for i in planned}
    if progress:
        progress("start", total=len(todo), total_bytes=sum(i.nbytes for i in infos.values()))
    for t, loaded in _prefetched(merger, todo):
        target = torch_dtype(infos[t.name].dtype)
        if t.action == "merge":
            if merger.can_fuse(t):
                merged = merger.fused(t, loaded, target)
                out = merged.tensor
                computed = None
            else:
                merged = merger.merge(t, merger.deltas(t, loaded))
                out = merged.tensor.to(target)
                computed = merged.tensor
            flushed = merged.flushed if computed is None else (
                flushed_to_zero(computed, out) if loses_small_values(computed.dtype, out.dtype) else 0)
            if flushed:
                report.flushed[t.name] = flushed
            bad = 0 if finite_by_norms(merged, merger.dtype, target) else (
                _nonfinite_output(merger, t, loaded, out, computed))
            if bad:
                report.nonfinite[t.name] = bad
            report.delta_sq += merged.delta_sq
            report.base_sq += merged.base_sq
            report.merged += 1
        else:
            out = loaded
            report.copied += 1
        sink(t.name, out)
        report.bytes_written += infos[t.name].nbytes
        if progress:
            progress("tensor", name=t.name, nbytes=infos[t.name].nbytes)
    if progress:
        progress("end")
    return report
