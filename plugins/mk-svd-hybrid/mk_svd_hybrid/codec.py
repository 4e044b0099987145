"""Encode one tensor's task vectors into an SVD-Hybrid record, and decode it again.

A record is a dict of small tensors (stored in the artifact) plus a JSON-able ``meta``.
Matrices (2-D, or N-D viewed as [shape[0], -1]) are split by the combined mask M into a signal
region, coded with one shared SVD basis per cluster of tasks (fp16 coefficients for the leading
components, quantized ones for the rest), and a noise region with its own treatment; they are
encoded in column blocks (:mod:`mk_svd_hybrid.blocks`). Vectors (0-D and 1-D tensors) keep each
task's values in fp16 and are averaged when merged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mergekit_core import MergeError
from mk_svd_hybrid import masks as masklib
from mk_svd_hybrid.blocks import MatrixBlocks, as_matrix, noise_slots, packed_masks
from mk_svd_hybrid.quantize import (
    Quantized,
    dequantize_stages,
    pack_codes,
    residual_quantize,
    rtvq,
    stage_codes,
    stage_scale,
    stage_values,
    unpack_codes,
)
from mk_svd_hybrid.rank import (
    Basis,
    add_gram,
    basis_from_gram,
    energy_rank,
    shared_basis,
)

SEP = "::"


@dataclass(frozen=True)
class CodecSettings:
    energy: float = 0.9
    fp16_energy: float = 0.5
    max_rank: int = 0
    svd: str = "exact"
    oversample_rank: int = 128
    svd_niter: int = 2
    quant: str = "rtvq"
    bits: int = 4
    base_bits: int = 3
    offset_bits: int = 2
    stages: int = 2
    noise: str = "rtvq"
    mask: str = "tall"
    mask_lambdas: tuple[float, ...] = ()
    mask_strategy: str = "union"
    keep_task_masks: bool = True
    clusters: tuple[tuple[int, ...], ...] = ()
    """Task indices of each cluster; one basis per cluster."""
    block_mb: float = 256.0
    """Working memory of one column block (MiB); see :mod:`mk_svd_hybrid.blocks`."""


@dataclass
class Record:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


# --------------------------------------------------------------------------- quantized blocks


def _store_stages(record: Record, prefix: str, stages: list[Quantized]) -> None:
    record.meta.setdefault("blocks", {})[prefix] = {"bits": stages[0].bits, "shape": list(stages[0].codes.shape),
                                                    "stages": len(stages)}
    for j, q in enumerate(stages):
        record.tensors[f"{prefix}.s{j}.codes"] = pack_codes(q.codes, q.bits)
        record.tensors[f"{prefix}.s{j}.step"] = q.step.float().contiguous()
        record.tensors[f"{prefix}.s{j}.zero"] = q.zero.contiguous()


def _load_stages(record: Record, prefix: str) -> torch.Tensor:
    info = record.meta["blocks"][prefix]
    shape, bits = info["shape"], info["bits"]
    count = 1
    for d in shape:
        count *= d
    stages = []
    for j in range(info["stages"]):
        codes = unpack_codes(record.tensors[f"{prefix}.s{j}.codes"], bits, count).reshape(shape)
        stages.append(Quantized(codes, record.tensors[f"{prefix}.s{j}.step"],
                                record.tensors[f"{prefix}.s{j}.zero"], bits))
    return dequantize_stages(stages)


def _quantize_tasks(record: Record, prefix: str, x: torch.Tensor, s: CodecSettings, scheme: str) -> None:
    """``x`` is [T, rows, cols]: RTVQ (shared base + offsets) or independent residual stages."""
    if scheme == "rtvq":
        base, offsets = rtvq(x, s.base_bits, s.offset_bits, s.stages)
        _store_stages(record, f"{prefix}.base", base)
        _store_stages(record, f"{prefix}.offset", offsets)
    else:
        _store_stages(record, prefix, residual_quantize(x, s.bits, s.stages))


def _dequantize_tasks(record: Record, prefix: str) -> torch.Tensor:
    if f"{prefix}.base" in record.meta["blocks"]:
        return _load_stages(record, f"{prefix}.base").unsqueeze(0) + _load_stages(record, f"{prefix}.offset")
    return _load_stages(record, prefix)


# --------------------------------------------------------------------------- encoding


def matrix_view(shape: Sequence[int]) -> tuple[int, int, bool]:
    """(rows, cols, transposed) of the 2-D view whose rows are the smaller side (the basis side)."""
    m = shape[0]
    n = 1
    for d in shape[1:]:
        n *= d
    return (n, m, True) if m > n else (m, n, False)


def _half(x: torch.Tensor, name: str, what: str) -> torch.Tensor:
    """``x`` in float16, the artifact's storage dtype; values beyond its range are an error that
    says so (a silent cast would store Inf and rebuild NaN)."""
    out = x.half()
    if out.numel() and not bool(torch.isfinite(out).all()) and bool(torch.isfinite(x).all()):
        raise MergeError(
            f"{name or 'a tensor'}: its {what} reach {float(x.abs().max()):g}, beyond float16's range (65504), "
            "in which SVD-Hybrid artifacts store them",
            hint="exclude the tensor (--exclude), or merge these models with another method")
    return out


def encode(deltas: Sequence[torch.Tensor], s: CodecSettings, *, task_masks: torch.Tensor | None = None,
           seed: int = 0, name: str = "") -> Record:
    """Compress one tensor's task vectors (one per task, same shape); ``name`` is for errors.

    Works in column blocks of about ``s.block_mb`` MiB (see :mod:`mk_svd_hybrid.blocks`): beyond
    ``deltas`` and the record it builds, memory holds one block's temporaries, the rows x rows
    Gram matrix, the coefficients (float32, k x cols per task) before they are quantized, and
    the noise codes unpacked (a byte per noise entry, task and stage) before they are packed.

    Raises:
        MergeError: a stored value (a 1-D task vector, a coefficient, a noise mean) is beyond
            float16's range.
    """
    shape = list(deltas[0].shape)
    record = Record(meta={"shape": shape})
    if len(shape) < 2:
        record.meta["kind"] = "vector"
        record.tensors["values"] = _half(torch.stack([d.float().reshape(-1) for d in deltas]), name, "task vectors")
        return record
    rows, cols, transposed = matrix_view(shape)
    record.meta.update(kind="matrix", transposed=transposed, rows=rows, cols=cols)
    view = MatrixBlocks(deltas, shape, rows, cols, transposed, s.block_mb)
    fraction, all_signal = 1.0, True
    if task_masks is not None or s.mask == "tall":
        packed, task_bits, count, whole = packed_masks(deltas, s.mask_lambdas or [0.4] * len(deltas),
                                                       s.mask_strategy, task_masks, s.keep_task_masks, s.block_mb)
        view.packed_mask = packed
        view.noise_entries = rows * cols - count
        record.tensors["mask"] = torch.from_numpy(packed)
        if task_bits is not None:
            record.tensors["task_masks"] = torch.from_numpy(task_bits)
        numel = rows * cols
        if whole is not None:  # the whole tensor's mask: its float32 mean, as ever
            fraction = float(as_matrix(whole.reshape(shape), transposed).float().mean())
        elif numel:
            fraction = count / numel
        all_signal = count == numel
    record.meta["signal_fraction"] = fraction
    clusters = s.clusters or (tuple(range(len(deltas))),)
    record.meta["clusters"] = []
    for c, members in enumerate(clusters):
        basis = _cluster_basis(view, members, s, seed + c)
        u16 = basis.vectors.half()
        k = u16.shape[1]
        k_high = min(k, energy_rank(basis.sq_singular.sqrt(), s.fp16_energy, basis.total_energy)) if k else 0
        record.tensors[f"basis.{c}"] = u16
        coef = _coefficients(view, members, u16.float())
        record.tensors[f"high.{c}"] = _half(coef[:, :k_high], name, "SVD coefficients").contiguous()
        if k > k_high:
            _quantize_tasks(record, f"low.{c}", coef[:, k_high:], s, s.quant)
        record.meta["clusters"].append({"tasks": list(members), "rank": k, "fp16_rank": k_high,
                                        "energy_kept": basis.energy_kept()})
    record.meta["noise"] = s.noise if view.packed_mask is not None and not all_signal else "none"
    if record.meta["noise"] == "mean":
        _noise_mean(record, view, name)
    elif record.meta["noise"] == "rtvq":
        _noise_rtvq(record, view, s)
    return record


def _cluster_basis(view: MatrixBlocks, members: Sequence[int], s: CodecSettings, seed: int) -> Basis:
    """The shared basis of one cluster's masked task vectors: exact from the Gram matrix summed
    over column blocks; randomized (``torch.svd_lowrank``) on the whole matrix."""
    if s.svd == "randomized" and min(view.rows, s.oversample_rank) < view.rows:
        signal = view.signal(0, view.cols)
        return shared_basis([view.signal_values(t, 0, view.cols, signal) for t in members], s.energy,
                            max_rank=s.max_rank, randomized=True, oversample_rank=s.oversample_rank,
                            niter=s.svd_niter, seed=seed)
    gram = torch.zeros(view.rows, view.rows, dtype=torch.float64)
    energy = [0.0] * len(members)
    for c0, c1 in view.spans():
        signal = view.signal(c0, c1)
        xs = [view.signal_values(t, c0, c1, signal) for t in members]
        for i, x in enumerate(xs):
            energy[i] += float(torch.sum(x.double() ** 2))
        if view.whole:  # one product per task, as the whole-tensor encoder summed them
            for x in xs:
                add_gram(gram, x)
        else:  # the block's tasks side by side: one product, one float64 sum per block
            add_gram(gram, torch.cat(xs, dim=1))
    return basis_from_gram(gram, float(sum(energy)), s.energy, max_rank=s.max_rank)


def _coefficients(view: MatrixBlocks, members: Sequence[int], u: torch.Tensor) -> torch.Tensor:
    """U^T S_t for each task of the cluster: float32 [T_c, k, cols]."""
    k = u.shape[1]
    if not k:
        return torch.zeros(len(members), 0, view.cols)
    coef = torch.empty(len(members), k, view.cols)
    for c0, c1 in view.spans():
        signal = view.signal(c0, c1)
        for i, t in enumerate(members):
            coef[i, :, c0:c1] = u.T @ view.signal_values(t, c0, c1, signal)
    return coef


def _noise_values(view: MatrixBlocks, c0: int, c1: int, outside: torch.Tensor) -> torch.Tensor:
    return torch.stack([m[:, c0:c1].float()[outside] for m in view.mats])  # [T, n_block]


def _noise_mean(record: Record, view: MatrixBlocks, name: str) -> None:
    mean = torch.empty(view.noise_entries, dtype=torch.float16)
    for c0, c1, outside, slots in noise_slots(view):
        mean[slots] = _half(_noise_values(view, c0, c1, outside).mean(0), name, "task vectors")
    record.tensors["noise.mean"] = mean


def _noise_rtvq(record: Record, view: MatrixBlocks, s: CodecSettings) -> None:
    """RTVQ of the noise values x [T, 1, n] (see :func:`quantize.rtvq`), block by block: each
    stage's per-row minimum and maximum in one pass over the blocks, then every code in a last
    pass. Entrywise and min/max only, so the codes are the whole-tensor ones bit for bit."""
    num_tasks = len(view.mats)
    n = view.noise_entries
    bits = [s.base_bits] + [s.offset_bits] * s.stages
    scales: list[tuple[torch.Tensor, torch.Tensor]] = []

    def stages(x: torch.Tensor) -> Iterator[torch.Tensor]:
        """The input of each stage (mean, offsets, residuals) for a block's values [T, 1, nb]."""
        current = x.mean(0)
        for j in range(len(bits)):
            yield current
            if j >= len(scales) or j + 1 == len(bits):
                return
            step, zero = scales[j]
            values = stage_values(stage_codes(current, step, zero, bits[j]), step, zero)
            current = x - values.unsqueeze(0) if j == 0 else current - values

    def blocks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(slots, values [T, 1, nb]) of each block with noise entries."""
        for c0, c1, outside, slots in noise_slots(view):
            if slots.numel():
                yield slots, _noise_values(view, c0, c1, outside).unsqueeze(1)

    gathered = list(blocks()) if view.whole else None  # within the budget: gather once
    for j in range(len(bits)):  # one pass per stage: its rows' ranges
        rows_shape = (1,) if j == 0 else (num_tasks, 1)
        lo = torch.full(rows_shape, torch.inf)
        hi = torch.full(rows_shape, -torch.inf)
        for _, x in gathered if gathered is not None else blocks():
            *_, current = stages(x)
            lo, hi = torch.minimum(lo, current.amin(-1)), torch.maximum(hi, current.amax(-1))
        scales.append(stage_scale(lo, hi, bits[j]))
    codes = [torch.empty(1, n, dtype=torch.uint8)] + [torch.empty(num_tasks, 1, n, dtype=torch.uint8)
                                                      for _ in range(s.stages)]
    for slots, x in gathered if gathered is not None else blocks():
        for j, current in enumerate(stages(x)):
            codes[j][..., slots] = stage_codes(current, *scales[j], bits[j])
    quantized = [Quantized(c, step, zero.to(torch.uint8), b) for c, (step, zero), b in zip(codes, scales, bits)]
    _store_stages(record, "noise.base", quantized[:1])
    _store_stages(record, "noise.offset", quantized[1:])


# --------------------------------------------------------------------------- decoding


class Decoder:
    """Rebuilds task vectors, or their weighted sum, from a record (validated by the store)."""

    def __init__(self, record: Record) -> None:
        self.record = record
        self.meta = record.meta
        self.shape = tuple(record.meta["shape"])
        self._noise: torch.Tensor | None = None
        self._signal: torch.Tensor | None = None
        self._coef: dict[int, torch.Tensor] = {}

    @property
    def num_tasks(self) -> int:
        if self.meta["kind"] == "vector":
            return self.record.tensors["values"].shape[0]
        return sum(len(c["tasks"]) for c in self.meta["clusters"])

    def signal_mask(self) -> torch.Tensor | None:
        if "mask" not in self.record.tensors:
            return None
        if self._signal is None:
            full = masklib.unpack(self.record.tensors["mask"], self.shape)
            self._signal = as_matrix(full, self.meta["transposed"])
        return self._signal

    def coefficients(self, c: int) -> torch.Tensor:
        """[T_c, k, cols] coefficients of cluster ``c`` (fp16 part and dequantized part)."""
        if c not in self._coef:
            high = self.record.tensors[f"high.{c}"].float()
            parts = [high]
            if self.meta["clusters"][c]["rank"] > self.meta["clusters"][c]["fp16_rank"]:
                parts.append(_dequantize_tasks(self.record, f"low.{c}"))
            self._coef[c] = torch.cat(parts, dim=1)
        return self._coef[c]

    def noise_values(self) -> torch.Tensor | None:
        """[T, n_noise] values of the noise region, or None when it is dropped or empty."""
        mode = self.meta.get("noise", "none")
        if mode in ("none", "drop"):
            return None
        if self._noise is None:
            if mode == "mean":
                mean = self.record.tensors["noise.mean"].float()
                self._noise = mean.unsqueeze(0).expand(self.num_tasks, -1)
            else:
                self._noise = _dequantize_tasks(self.record, "noise")[:, 0]
        return self._noise

    def _finish(self, matrix: torch.Tensor) -> torch.Tensor:
        if self.meta["transposed"]:
            matrix = matrix.T
        return matrix.reshape(self.shape).contiguous()

    def combine(self, weights: Sequence[float], signal_weight: float = 1.0, noise_weight: float = 1.0
                ) -> torch.Tensor:
        """sum_t weights[t] * tau_hat_t, with the signal and noise regions scaled separately."""
        if self.meta["kind"] == "vector":
            values = self.record.tensors["values"].float()
            out = torch.zeros(values.shape[1])
            for t, w in enumerate(weights):
                out += float(w) * values[t]
            return out.reshape(self.shape)
        rows, cols = self.meta["rows"], self.meta["cols"]
        out = torch.zeros(rows, cols)
        for c, info in enumerate(self.meta["clusters"]):
            if info["rank"] == 0:
                continue
            coef = self.coefficients(c)
            mixed = torch.zeros(coef.shape[1:])
            for i, t in enumerate(info["tasks"]):
                mixed += float(weights[t]) * coef[i]
            out += self.record.tensors[f"basis.{c}"].float() @ mixed
        out *= signal_weight
        signal = self.signal_mask()
        if signal is not None:
            out.masked_fill_(~signal, 0.0)
            noise = self.noise_values()
            if noise is not None:
                mixed_noise = torch.zeros(noise.shape[1])
                for t, w in enumerate(weights):
                    mixed_noise += float(w) * noise[t]
                out[~signal] = noise_weight * mixed_noise
        return self._finish(out)

    def task(self, t: int) -> torch.Tensor:
        """Task ``t``'s own rebuilt task vector."""
        weights = [0.0] * self.num_tasks
        weights[t] = 1.0
        return self.combine(weights)
