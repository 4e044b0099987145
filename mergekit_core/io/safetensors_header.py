"""Read and validate a safetensors header without loading any tensor data (and without torch).

The checks here are what turns a truncated file or a header that lies about sizes into a
FormatError naming the file, instead of a crash deep inside a merge.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from mergekit_core.errors import FormatError

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype (safetensors spelling: F32, BF16, ...) of one stored tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    offsets: dict[str, int]


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and check the header of ``path``; raise FormatError on anything inconsistent."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise FormatError(
                    f"{path}: corrupt or truncated safetensors file (header of {length} bytes "
                    f"in a file of {size} bytes)"
                )
            raw = f.read(length)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - length
    tensors: dict[str, TensorInfo] = {}
    offsets: dict[str, int] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise FormatError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if dtype not in DTYPE_SIZES:
            raise FormatError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        info = TensorInfo(name, tuple(int(d) for d in shape), dtype)
        if not (0 <= begin <= end <= data_len) or end - begin != info.nbytes:
            raise FormatError(
                f"{path}: tensor {name!r} claims bytes {begin}..{end} for shape {list(shape)} {dtype}, "
                f"but the data section has {data_len} bytes; the file is truncated or its header is wrong"
            )
        tensors[name] = info
        offsets[name] = begin
    return SafetensorsHeader(path, tensors, dict(metadata), 8 + length, offsets)
