"""One tensor's task vectors, a block at a time: what bounds the codec's working memory.

``encode`` needs, per tensor, the TALL masks, the Gram matrix sum_t S_t S_t^T of the masked
task vectors S_t = M * X_t ([rows, cols] views), the coefficients U^T S_t and the noise values
outside M. All of them are entrywise or sums over columns, so they are computed over blocks:

- masks over contiguous slices of the flattened tensor (packed straight into the stored bits);
- Gram, coefficients and noise over **column blocks** of the [rows, cols] view, with the signal
  mask of a block unpacked from the stored bits (so every phase sees exactly the stored mask).

A block holds about ``block_mb`` MiB of float32 task values, with room for the temporaries of
the TALL masks (4 float32 copies of the T tasks' entries). One block covering the whole tensor
computes exactly what the whole-tensor code did (bit for bit); smaller blocks change only the
order of float sums (the Gram matrix, the energy, the coefficient products): equal within
float32 rounding. Masks, noise values and their quantization are entrywise or min/max: the same
bits whatever the blocks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from mk_svd_hybrid import masks as masklib

BYTES_PER_ENTRY_AND_TASK = 16
"""Working bytes per tensor entry and task in a block: the float32 value and three float32
temporaries (the TALL mask's |x|, |total - x| and its scaled copy)."""


def as_matrix(x: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The [rows, cols] view of ``x`` ([d0, ...] as [d0, prod(...)]); explicit sizes, so that a
    tensor with a zero dimension has a definite view (``reshape(d0, -1)`` is ambiguous there)."""
    inner = 1
    for d in x.shape[1:]:
        inner *= d
    x2 = x.reshape(x.shape[0], inner)
    return x2.T if transposed else x2


def entries_per_block(num_tasks: int, block_mb: float) -> int:
    """Tensor entries per block (a multiple of 8, at least 8) for a ``block_mb`` MiB budget."""
    entries = int(block_mb * 2**20) // (BYTES_PER_ENTRY_AND_TASK * max(1, num_tasks))
    return max(8, entries // 8 * 8)


class MatrixBlocks:
    """The column blocks of T task vectors viewed as [rows, cols], and their signal masks.

    ``packed_mask`` is the combined mask in the stored form (bits of the flattened tensor, numpy's
    ``packbits`` order), or None when every entry is signal.
    """

    def __init__(self, deltas: Sequence[torch.Tensor], shape: Sequence[int], rows: int, cols: int,
                 transposed: bool, block_mb: float) -> None:
        self.shape = tuple(shape)
        self.rows, self.cols, self.transposed = rows, cols, transposed
        self.mats = [as_matrix(d, transposed) for d in deltas]
        self.packed_mask: np.ndarray | None = None
        self.noise_entries = 0
        width = max(8, entries_per_block(len(deltas), block_mb) // max(1, rows) // 8 * 8)
        # a column block must start on a byte of the packed mask: always so for the transposed
        # view (a block is a contiguous run of rows * width entries), per row otherwise
        aligned = transposed or cols % 8 == 0
        self.width = cols if width >= cols or not aligned else width

    @property
    def whole(self) -> bool:
        return self.width >= self.cols

    def spans(self) -> Iterator[tuple[int, int]]:
        if self.cols == 0:
            yield 0, 0
            return
        for c0 in range(0, self.cols, self.width):
            yield c0, min(self.cols, c0 + self.width)

    def signal(self, c0: int, c1: int) -> torch.Tensor | None:
        """The combined mask of columns ``c0:c1``, bool [rows, c1 - c0], or None (no mask)."""
        if self.packed_mask is None:
            return None
        if c0 == 0 and c1 == self.cols:  # the whole-tensor view, laid out as the whole tensor is
            return as_matrix(masklib.unpack(torch.from_numpy(self.packed_mask), self.shape), self.transposed)
        if self.transposed:
            start = c0 * self.rows
            bits = np.unpackbits(self.packed_mask[start // 8:(c1 * self.rows + 7) // 8], count=(c1 - c0) * self.rows)
            return torch.from_numpy(bits.view(bool)).reshape(c1 - c0, self.rows).T
        per_row = self.packed_mask.reshape(self.rows, self.cols // 8)
        bits = np.unpackbits(per_row[:, c0 // 8:(c1 + 7) // 8], axis=1)
        return torch.from_numpy(np.ascontiguousarray(bits[:, :c1 - c0]).view(bool))

    def signal_values(self, t: int, c0: int, c1: int, signal: torch.Tensor | None) -> torch.Tensor:
        """Task ``t``'s masked values M * X_t of columns ``c0:c1`` (float32 [rows, c1 - c0])."""
        x = self.mats[t][:, c0:c1].float()
        return x * signal if signal is not None else x


def packed_masks(deltas: Sequence[torch.Tensor], lambdas: Sequence[float], strategy: str,
                 given: torch.Tensor | None, keep_task_masks: bool, block_mb: float
                 ) -> tuple[np.ndarray, np.ndarray | None, int, torch.Tensor | None]:
    """TALL masks (or the ``given`` bool [T, *shape] ones) over slices of the flattened tensor.

    Returns (combined mask packed, task masks packed [T, ceil(numel / 8)] or None, how many
    entries are signal, the combined bool mask when one slice held the whole tensor, else None).
    """
    numel = deltas[0].numel()
    num_tasks = len(deltas)
    nbytes = (numel + 7) // 8
    combined_bits = np.empty(nbytes, dtype=np.uint8)
    task_bits = np.empty((num_tasks, nbytes), dtype=np.uint8) if keep_task_masks else None
    flats = [d.reshape(-1) for d in deltas]
    given_flat = given.reshape(num_tasks, numel) if given is not None else None
    length = entries_per_block(num_tasks, block_mb)
    count = 0
    whole = None
    for a in range(0, numel, length):
        b = min(numel, a + length)
        if given_flat is None:
            masks = masklib.tall_masks_stacked(torch.stack([f[a:b].float() for f in flats]), lambdas)
        else:
            masks = given_flat[:, a:b]
        combined = masklib.combine(masks, strategy)
        count += int(combined.sum())
        packed = np.packbits(combined.numpy())
        combined_bits[a // 8:a // 8 + packed.size] = packed
        if task_bits is not None:
            task_bits[:, a // 8:a // 8 + packed.size] = np.packbits(masks.numpy(), axis=1)
        if a == 0 and b == numel:
            whole = combined
    return combined_bits, task_bits, count, whole


def noise_slots(blocks: MatrixBlocks) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Per column block: (c0, c1, its noise mask [rows, c1 - c0], the position of each of its
    noise entries in the stored order: row-major over the whole [rows, cols] view)."""
    counts = torch.zeros(blocks.rows, dtype=torch.int64)
    for c0, c1 in blocks.spans():
        counts += (~blocks.signal(c0, c1)).sum(1)
    nxt = torch.cumsum(counts, 0) - counts  # first slot of each row
    for c0, c1 in blocks.spans():
        outside = ~blocks.signal(c0, c1)
        within = torch.cumsum(outside, dim=1)
        yield c0, c1, outside, (nxt.unsqueeze(1) + within - 1)[outside]
        if within.shape[1]:
            nxt += within[:, -1]
