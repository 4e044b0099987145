"""Read and validate a safetensors header without loading any tensor data (and without torch).

The checks here are what turns a truncated file or a header that lies about sizes into a
FormatError naming the file, instead of a crash deep inside a merge.
"""

from __future__ import annotations

import json
import reprlib
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
    """A checked header: tensor ``offsets`` count from ``data_start``, the file offset of the data
    section; each tensor's bytes lie inside that section and overlap no other tensor's."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    offsets: dict[str, int]


def _short(value: object) -> str:
    """A bounded repr of a JSON value for an error message."""
    return reprlib.repr(value)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(path: Path, name: str, entry: object, data_len: int) -> tuple[TensorInfo, int, int]:
    """One header entry as (info, begin, end), every field checked against the data section."""
    def bad(what: str) -> FormatError:
        return FormatError(f"{path}: corrupt header entry for tensor {name!r} ({what})")

    if not isinstance(entry, dict):
        raise bad(f"expected a JSON object, got {_short(entry)}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise bad(f"no {key!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise FormatError(f"{path}: tensor {name!r} has unsupported dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"shape must be a list of non-negative integers, got {_short(shape)}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise bad(f"data_offsets must be [begin, end] in bytes, got {_short(offsets)}")
    begin, end = offsets
    nbytes = 0 if 0 in shape else DTYPE_SIZES[dtype]
    exact = True
    for i, d in enumerate(shape):
        nbytes *= d
        if nbytes > data_len:  # stop before multiplying absurd dimensions out
            exact = i == len(shape) - 1
            break
    if not (begin <= end <= data_len) or end - begin != nbytes:
        needs = f"{nbytes} bytes" if exact else f"more than the whole data section ({data_len} bytes)"
        if begin <= end and end - begin == nbytes:  # the right size, past the end: cut short
            why = f"but the data section has {data_len} bytes; the file is truncated (download or save it again)"
        else:
            why = f"but shape {_short(shape)} {dtype} needs {needs}; the header is wrong"
        raise FormatError(f"{path}: tensor {name!r} claims bytes {begin}..{end} ({end - begin} bytes), {why}")
    return TensorInfo(name, tuple(shape), dtype), begin, end


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and check the header of ``path``; raise FormatError (naming the file) on anything
    inconsistent.

    Checked: the 8-byte little-endian header length against the file size; a JSON object of
    ``{name: {"dtype", "shape", "data_offsets"}}`` plus an optional ``"__metadata__"`` object of
    strings; known dtypes; shapes of non-negative ints; each tensor's ``[begin, end)`` inside the
    data section, exactly ``numel * itemsize`` bytes long, and overlapping no other tensor's.
    """
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
    except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: bad JSON, integers too long
        raise FormatError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    data_len = size - 8 - length
    tensors: dict[str, TensorInfo] = {}
    offsets: dict[str, int] = {}
    spans = []
    for name, entry in header.items():
        info, begin, end = _entry(path, name, entry, data_len)
        tensors[name] = info
        offsets[name] = begin
        if end > begin:
            spans.append((begin, end, name))
    spans.sort()
    for (_, end0, name0), (begin1, _, name1) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise FormatError(f"{path}: tensors {name0!r} and {name1!r} claim overlapping bytes; "
                              "the header is corrupt")
    return SafetensorsHeader(path, tensors, dict(metadata), 8 + length, offsets)
