"""Compute one merged tensor: read its inputs, make deltas, transform, merge, add the base back.

Reading (``load``) and computing (``merge``) are separate so that the executor can read the next
tensor on another thread while this one is computed.
"""

from __future__ import annotations

import math
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mergekit_core.components import (
    LambdaPolicy,
    MergeMethod,
    PrepareContext,
    TensorGroup,
    Transform,
    origin,
)
from mergekit_core.engine.plan import MergePlan, TensorPlan
from mergekit_core.engine.threads import map_slices
from mergekit_core.errors import MergeError, PluginError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

SUM_TOLERANCE = 1e-6


READ_THREADS = 4
PARALLEL_READ_MIN = 1 << 20
"""Tensors of at least this many elements are read from their files concurrently."""

FUSED_CHUNK = 1 << 20
"""Elements per chunk of the fused linear path: 4 MiB float32 buffers, reused across tensors."""


@dataclass
class Raw:
    """The stored tensors of one output tensor, as read: the base and one per source (for an
    adapter delta, its saved ``base_layer`` copy or None; None for missing sources)."""

    base: torch.Tensor | None
    tensors: list[torch.Tensor | None]


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
    flushed: int = 0
    """Values that were not 0 before the cast to the output dtype and are 0 after it (too small
    for it); counted by the fused path, which keeps no copy in the compute dtype."""
    normed: bool = True
    """``delta_sq`` and ``base_sq`` are the sums of squares of the merged delta and of the base
    (False where the tensor has no base and they are left 0)."""


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
        self.device = merge_device(getattr(plan.spec, "device", "auto"))
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None
        self._workers: tuple[int, ThreadPoolExecutor] | None = None
        self.prepared = False
        """The method's ``prepare`` ran and its ``finish`` is still due."""

    # ----------------------------------------------------------------------- reading

    def read(self, t: TensorPlan) -> Raw:
        """Read the stored tensors one output tensor needs (the I/O part; runs on the reader thread).

        Adapter deltas are computed later, from their (small) factors.
        """
        keys = [None if c is None else (c.copy if c.kind == "delta" else c.key) for c in t.contributions]
        jobs = [(self.plan.base, t.base_key or t.name)] if self.plan.base is not None else []
        jobs += [(self.plan.sources[i].reader, key) for i, key in enumerate(keys) if key is not None]
        if len(jobs) > 1 and t.numel >= PARALLEL_READ_MIN:  # several files at once keep the disk busy
            got = list(self._readers().map(lambda job: job[0].get(job[1]), jobs))
        else:
            got = [reader.get(key) for reader, key in jobs]
        base = got.pop(0) if self.plan.base is not None else None
        tensors = [None if key is None else got.pop(0) for key in keys]
        return Raw(base, tensors)

    def read_copy(self, t: TensorPlan) -> torch.Tensor:
        """The stored value of a tensor the merge copies: from the base, or from the one source
        that has it."""
        if t.copy_from is None:
            return self.plan.base.get(t.base_key or t.name)
        return self.plan.sources[t.copy_from].reader.get(t.contributions[t.copy_from].key)

    def _readers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="mk-pread")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._workers is not None:
            self._workers[1].shutdown()
            self._workers = None

    def _owned(self, reader: Any, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype) if getattr(reader, "owns_tensors", False) else own(x, self.dtype)

    def deltas(self, t: TensorPlan, raw: Raw, skip: frozenset[int] = frozenset()) -> Inputs:
        """Per-source deltas (or weights, without a base) in the compute dtype; the sources in
        ``skip`` are left out (their deltas are computed elsewhere)."""
        import torch

        basef = raw.base.to(self.dtype) if raw.base is not None else None
        tensors, indices = [], []
        for i, c in enumerate(t.contributions):
            if i in skip:
                continue
            if c is None:
                if not self.weights_without_base:  # a missing source adds a zero delta (union)
                    tensors.append(torch.zeros(t.shape, dtype=self.dtype))
                    indices.append(i)
                continue
            if c.kind == "delta" and raw.tensors[i] is not None:  # applied to its base_layer copy, as peft does
                copy = self._owned(self.plan.sources[i].reader, raw.tensors[i])
                x = self.plan.sources[i].reader.delta(c.key, copy).to(self.dtype).reshape(t.shape).add_(copy)
                if basef is not None:
                    x.sub_(basef)
            elif c.kind == "delta":
                x = self.plan.sources[i].reader.delta(c.key, basef).to(self.dtype)
                if x.shape != tuple(t.shape):
                    x = x.reshape(t.shape)
            else:
                x = self._owned(self.plan.sources[i].reader, raw.tensors[i])
                if basef is not None:
                    x.sub_(basef)
            tensors.append(x)
            indices.append(i)
        return Inputs(basef, tensors, indices)

    def load(self, t: TensorPlan) -> Inputs:
        return self.deltas(t, self.read(t))

    def can_fuse(self, t: TensorPlan) -> bool:
        """Linear methods on full tensors are computed chunk by chunk without holding every delta."""
        return (self.method.linear and not self.transforms and self.plan.base is not None
                and all(c is None or c.kind != "delta" for c in t.contributions))

    def fused(self, t: TensorPlan, raw: Raw, out_dtype: torch.dtype) -> Merged:
        """``base + sum_t c_t (x_t - base)``, in chunks of reused float32 buffers, cast on the fly."""
        import torch

        indices = list(range(len(t.contributions)))
        if self.plan.spec.merge_mode != "union":
            indices = [i for i, c in enumerate(t.contributions) if c is not None]
        names = [self.plan.sources[i].name for i in indices]
        group = TensorGroup(t.name, t.layer, None, [], self.coefficients(t, indices), names, self.tensor_seed(t))
        pairs = [(raw.tensors[i].reshape(-1), float(c)) for i, c in
                 zip(indices, self.linear_coefficients(group)) if raw.tensors[i] is not None]
        base = raw.base.reshape(-1)
        n = base.numel()
        out = torch.empty(n, dtype=out_dtype)
        narrower = loses_small_values(self.dtype, out_dtype)
        host = self.device.type == "cpu"

        def chunk(start: int) -> tuple[float, float, int]:
            """Merge one chunk into ``out``: its delta and base sums of squares, values flushed."""
            k = min(FUSED_CHUNK, n - start)
            bk, ak, tk = (self._buffer(slot, min(n, FUSED_CHUNK))[:k] for slot in range(3))
            bk.copy_(base[start:start + k])
            ak.zero_()
            for x, c in pairs:
                tk.copy_(x[start:start + k]).sub_(bk)  # faster than one mixed-dtype torch.sub (dynamic casts)
                ak.add_(tk, alpha=c)
            dsq, bsq = float(torch.dot(ak, ak)), float(torch.dot(bk, bk))
            ok = out[start:start + k]
            if host:
                ok.copy_(ak.add_(bk))
                return dsq, bsq, flushed_to_zero(ak, ok) if narrower else 0
            cast = ak.add_(bk).to(out_dtype)
            ok.copy_(cast)
            return dsq, bsq, flushed_to_zero(ak, cast) if narrower else 0

        starts = list(range(0, n, FUSED_CHUNK))
        parts = self._map_chunks(chunk, starts) if host else [chunk(s) for s in starts]
        delta_sq = base_sq = 0.0
        flushed = 0
        for dsq, bsq, f in parts:  # summed in chunk order, as one loop would
            delta_sq += dsq
            base_sq += bsq
            flushed += f
        if not math.isfinite(delta_sq):  # name the culprit; the slow path knows how
            self.merge(t, self.deltas(t, raw))
        return Merged(out.reshape(t.shape), delta_sq, base_sq, flushed)

    def _buffer(self, slot: int, size: int) -> torch.Tensor:
        """A reused buffer of at least ``size`` elements, one set per thread."""
        import torch

        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        buf = buffers.get(slot)
        if buf is None or buf.numel() < size:
            buf = torch.empty(size, dtype=self.dtype, device=self.device)
            buffers[slot] = buf
        return buf

    def _map_chunks(self, fn: Callable[[int], Any], starts: list[int]) -> list[Any]:
        """``[fn(s) for s in starts]`` on this merger's worker threads (``threads.map_slices``); the
        pool lives across tensors, so each thread keeps its chunk buffers (``_buffer``)."""
        import torch

        threads = torch.get_num_threads()
        if self._workers is None or self._workers[0] != threads:
            if self._workers is not None:
                self._workers[1].shutdown()
            self._workers = (threads, ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mk-chunk"))
        return map_slices(fn, starts, pool=self._workers[1])

    # ----------------------------------------------------------------------- computing

    def coefficients(self, t: TensorPlan, indices: list[int]) -> list[float]:
        return [float(self.policy.resolve(t.name, t.layer, i, self.values)) for i in indices]

    def linear_coefficients(self, group: TensorGroup) -> list[float]:
        """The linear method's coefficient of each source, checked: one finite number per source."""
        out = self._call(self.method, "linear_coefficients", group, self.params)
        try:
            values = [float(c) for c in out]
        except (TypeError, ValueError):
            values = []
        if len(values) != len(group.source_names) or not all(math.isfinite(v) for v in values):
            raise PluginError(f"{self.method.label} ({origin(self.method)}) returned {out!r} as linear_coefficients "
                              f"for tensor {group.name}; expected {len(group.source_names)} finite numbers, one "
                              "per source")
        return values

    def transformed(self, t: TensorPlan, inputs: Inputs) -> list[torch.Tensor]:
        import torch

        if not self.transforms:
            return inputs.tensors
        out = []
        for i, x in zip(inputs.indices, inputs.tensors):
            rng = torch.Generator().manual_seed(self.tensor_seed(t) + i)
            for transform, params in self.transforms:
                x = checked_output(transform, t.name, self._call(transform, "apply", t.name, x, params, rng), t.shape)
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
                f"{component.label} ({origin(component)}) failed on tensor "
                f"{args[0] if isinstance(args[0], str) else args[0].name}: {type(exc).__name__}: {exc}"
            ) from exc

    def tensor_seed(self, t: TensorPlan) -> int:
        return (self.plan.spec.seed * 1_000_003 + zlib.crc32(t.name.encode()) * 131) % 2**62

    def group(self, t: TensorPlan, inputs: Inputs) -> TensorGroup:
        """What the method's ``merge`` receives for tensor ``t``: transformed tensors, coefficients."""
        tensors = self.transformed(t, inputs)
        if self.method.space == "weights" and inputs.base is not None:
            tensors = [x + inputs.base for x in tensors]
        names = [self.plan.sources[i].name for i in inputs.indices]
        return TensorGroup(t.name, t.layer, inputs.base, tensors, self.coefficients(t, inputs.indices), names,
                           self.tensor_seed(t))

    def merge(self, t: TensorPlan, inputs: Inputs, add_base: bool = True) -> Merged:
        """The merged tensor: weights (``add_base``) or the merged delta."""
        if self.device.type != "cpu":  # the arithmetic on the device; the result comes back to the host
            inputs = Inputs(None if inputs.base is None else inputs.base.to(self.device),
                            [x.to(self.device) for x in inputs.tensors], inputs.indices)
            merged = self._merge(t, inputs, add_base)
            merged.tensor = merged.tensor.cpu()
            return merged
        return self._merge(t, inputs, add_base)

    def _merge(self, t: TensorPlan, inputs: Inputs, add_base: bool) -> Merged:
        import torch

        base = inputs.base
        weights_space = self.method.space == "weights" and base is not None
        names = [self.plan.sources[i].name for i in inputs.indices]
        group = self.group(t, inputs)
        if self.weights_without_base and self.method.linear and self.params.get("normalize") is not False:
            # normalize: false (weighted, mergekit's linear) asks for the plain weighted sum
            total = sum(self.linear_coefficients(group))
            if abs(total - 1.0) > SUM_TOLERANCE:
                raise MergeError(
                    f"{t.name}: without base_model a linear merge must be a weighted mean, but its "
                    f"coefficients sum to {total:g}; give base_model or normalise the weights"
                )
        out = checked_output(self.method, t.name, self._call(self.method, "merge", group, self.params, self.state),
                             t.shape).to(self.dtype)
        flat = out.reshape(-1)
        out_sq = float(torch.dot(flat, flat)) if flat.numel() else 0.0
        if not math.isfinite(out_sq) and not bool(torch.isfinite(out).all()):  # NaN and Inf reach the dot
            bad = [n for n, x in zip(names, inputs.tensors) if not bool(torch.isfinite(x).all())]
            where = (f" (non-finite values in source {', '.join(bad)})" if bad else
                     f" ({self.method.label} ({origin(self.method)}) made them from finite inputs)")
            message = f"{t.name}: the merged tensor has NaN or Inf{where}"
            if not self.allow_nonfinite:
                raise MergeError(message, hint="check the sources, or pass --allow-nonfinite to write it anyway")
            self.warn(message)
        if base is None:
            return Merged(out, 0.0, 0.0, normed=False)
        base_flat = base.reshape(-1)
        base_sq = float(torch.dot(base_flat, base_flat)) if base_flat.numel() else 0.0
        if weights_space:
            delta = out - base
            return Merged(out if add_base else delta, float(torch.sum(delta * delta)), base_sq)
        return Merged(out.add_(base) if add_base else out, out_sq, base_sq)


def merge_device(name: str) -> torch.device:
    """The torch device of the merge option ``device``: auto (the current CUDA GPU when torch
    sees one, else the CPU), cpu, cuda or cuda:N.

    Raises:
        UsageError: a CUDA device was asked for and torch sees none (or not that index).
    """
    import torch

    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda")
    if not torch.cuda.is_available():
        raise UsageError(f"device {name}: torch {torch.__version__} sees no CUDA GPU",
                         hint="use --device cpu (or auto, which picks a GPU only when there is one)")
    index = int(name.partition(":")[2] or torch.cuda.current_device())
    if index >= torch.cuda.device_count():
        raise UsageError(f"device {name}: torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0",
                         hint="give cuda:N with N below that, or cuda for the current one")
    return torch.device("cuda", index)


def loses_small_values(computed: torch.dtype, written: torch.dtype) -> bool:
    """Whether casting ``computed`` to ``written`` can turn small values into 0: a smaller
    exponent range (fp32 -> fp16 can; fp32 -> bf16 keeps fp32's range, so it is not checked)."""
    import torch

    return (written.is_floating_point and computed.is_floating_point
            and torch.finfo(written).tiny > torch.finfo(computed).tiny)


def flushed_to_zero(computed: torch.Tensor, written: torch.Tensor) -> int:
    """How many values are 0 in ``written`` (the output dtype) but not in ``computed``."""
    import torch

    return int(torch.count_nonzero((written == 0) & (computed != 0)))


def checked_output(component: Any, name: str, out: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """What a method's ``merge`` or a transform's ``apply`` returned, if it keeps the contract: a
    floating-point ``torch.Tensor`` of the tensor's ``shape``.

    Raises:
        PluginError: naming the component, where it comes from, the tensor and what was wrong.
    """
    import torch

    if isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(shape) and out.is_floating_point():
        return out  # the usual case: origin() below reads package metadata (0.5 s), only for the message
    what = f"{component.label} ({origin(component)}) returned"
    hint = "merge() and apply() must return a floating-point torch.Tensor of the input's shape"
    if not isinstance(out, torch.Tensor):
        raise PluginError(f"{what} a {type(out).__name__} for tensor {name}, not a torch.Tensor", hint=hint)
    if tuple(out.shape) != tuple(shape):
        raise PluginError(f"{what} shape {list(out.shape)} for tensor {name}, expected {list(shape)}", hint=hint)
    if not out.is_floating_point():
        raise PluginError(f"{what} dtype {str(out.dtype).removeprefix('torch.')} for tensor {name}, "
                          "not a floating-point dtype", hint=hint)
    return out


class EnginePrepareContext(PrepareContext):
    """Gives ``prepare`` the groups ``merge`` will see; each pass re-reads the sources."""

    def __init__(self, merger: TensorMerger, host: Any = None, progress: Any = None) -> None:
        self.plan = merger.plan
        self.host = host
        self._merger = merger
        self._progress = progress
        self._passes = 0

    def groups(self) -> Iterator[TensorGroup]:
        yield from self._groups(None)

    def groups_of(self, names: set[str]) -> Iterator[TensorGroup]:
        """The groups of the tensors ``names`` only, in plan order (reads nothing else)."""
        yield from self._groups(names)

    def _groups(self, names: set[str] | None) -> Iterator[TensorGroup]:
        """Groups in plan order; the next tensor is read on a thread while this one is used."""
        todo = [t for t in self.plan.tensors if t.action == "merge" and (names is None or t.name in names)]
        self._passes += 1
        if self._progress:
            self._progress("phase", label=f"{self._merger.method.name}: preparing, pass {self._passes}",
                           total=len(todo))
        if not todo:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mk-prepare-read") as pool:
            future = pool.submit(self._merger.read, todo[0])
            for i, t in enumerate(todo):
                raw = future.result()
                if i + 1 < len(todo):
                    future = pool.submit(self._merger.read, todo[i + 1])
                yield self._merger.group(t, self._merger.deltas(t, raw))
                if self._progress:
                    self._progress("step", name=t.name)


def own(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` as a tensor the caller may change in place.

    Readers may hand out views of a memory-mapped file that later reads share, so a tensor that
    is already in ``dtype`` is copied rather than modified.
    """
    return x.to(dtype, copy=True) if x.dtype == dtype else x.to(dtype)

