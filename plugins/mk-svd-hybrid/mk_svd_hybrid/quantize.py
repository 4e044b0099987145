"""Asymmetric (scale + zero-point) quantization of task vectors: TVQ, residual stages, RTVQ.

One scale and zero-point per row. The range always includes 0 (as PyTorch's MinMaxObserver
does; the TVQ paper uses the plain min-max): zero stays exactly representable and a constant row
survives. For b bits: step = (max(x, 0) - min(x, 0)) / (2^b - 1), zero = round(-min / step),
q = clamp(round(x / step) + zero, 0, 2^b - 1), x_hat = step * (q - zero), so |x - x_hat| <= step / 2.
An all-zero row gets step 1 and zero 0.

Residual stages quantize what the previous stages left: x_hat = sum_s Q(r_s), r_{s+1} = r_s - Q(r_s).
RTVQ (Kim et al. 2025) quantizes the tasks' mean once (``base_bits``) and each task's offset from
that *quantized* base (``offset_bits``), so the base's error is corrected by the offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Quantized:
    """Codes of one stage: ``codes`` uint8 [rows, cols] (unpacked), per-row ``step`` and ``zero``."""

    codes: torch.Tensor
    step: torch.Tensor
    zero: torch.Tensor
    bits: int

    def dequantize(self) -> torch.Tensor:
        return self.step.unsqueeze(-1) * (self.codes.float() - self.zero.float().unsqueeze(-1))


def quantize(x: torch.Tensor, bits: int) -> Quantized:
    """One stage over the last dimension of ``x`` ([..., cols]): one step and zero per row."""
    x = x.float()
    lo = x.amin(-1) if x.shape[-1] else torch.zeros(x.shape[:-1])
    hi = x.amax(-1) if x.shape[-1] else torch.zeros(x.shape[:-1])
    step, zero = stage_scale(lo, hi, bits)
    return Quantized(stage_codes(x, step, zero, bits), step, zero.to(torch.uint8), bits)


def stage_scale(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, zero) of one stage from each row's minimum and maximum (float32 [...]); ``zero``
    stays float32 here (integer-valued), as :func:`stage_codes` uses it."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be between 1 and 8, got {bits}")
    levels = 2**bits - 1
    step = (hi.clamp_min(0.0) - lo.clamp_max(0.0)) / levels
    step = torch.where(step > 0, step, torch.ones_like(step))
    return step, torch.round(-lo.clamp_max(0.0) / step).clamp(0, levels)


def stage_codes(x: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of ``x`` ([..., cols], float32) with each row's ``step`` and ``zero``: the same
    values whether ``x`` holds a whole row or a slice of it."""
    levels = 2**bits - 1
    return (torch.round(x / step.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, levels).to(torch.uint8)


def stage_values(codes: torch.Tensor, step: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """What :meth:`Quantized.dequantize` gives, for a slice of a stage's codes."""
    return step.unsqueeze(-1) * (codes.float() - zero.float().unsqueeze(-1))


def residual_quantize(x: torch.Tensor, bits: int, stages: int) -> list[Quantized]:
    out: list[Quantized] = []
    residual = x.float()
    for _ in range(stages):
        q = quantize(residual, bits)
        out.append(q)
        residual = residual - q.dequantize()
    return out


def dequantize_stages(stages: list[Quantized]) -> torch.Tensor:
    total = stages[0].dequantize()
    for q in stages[1:]:
        total = total + q.dequantize()
    return total


def rtvq(x: torch.Tensor, base_bits: int, offset_bits: int, stages: int
         ) -> tuple[list[Quantized], list[Quantized]]:
    """``x`` is [T, rows, cols]: the base (mean over T) in one stage, the offsets in ``stages``."""
    base = residual_quantize(x.float().mean(0), base_bits, 1)
    offsets = residual_quantize(x.float() - dequantize_stages(base).unsqueeze(0), offset_bits, stages)
    return base, offsets


PACK_CHUNK = 1 << 20
"""Codes packed or unpacked at a time (a multiple of 8: each chunk fills whole bytes), so the
8-byte-per-code bit planes stay a few MiB whatever the tensor."""


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes below 2^bits -> ``bits`` bits each, little-endian, as a flat uint8 tensor."""
    flat = codes.reshape(-1).numpy()
    out = np.empty((flat.size * bits + 7) // 8, dtype=np.uint8)
    for start in range(0, flat.size, PACK_CHUNK):
        part = flat[start:start + PACK_CHUNK]
        planes = np.unpackbits(part[:, None], axis=1, bitorder="little")[:, :bits]
        packed = np.packbits(planes.reshape(-1), bitorder="little")
        out[start * bits // 8:start * bits // 8 + packed.size] = packed
    return torch.from_numpy(out)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    data = packed.numpy()
    out = np.empty(count, dtype=np.uint8)
    for start in range(0, count, PACK_CHUNK):
        n = min(PACK_CHUNK, count - start)
        planes = np.unpackbits(data[start * bits // 8:], count=n * bits, bitorder="little").reshape(n, bits)
        out[start:start + n] = np.packbits(planes, axis=1, bitorder="little")[:, 0]
    return torch.from_numpy(out)
