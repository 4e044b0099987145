"""Streaming, sharded safetensors output, written atomically.

Every output tensor's name, shape and dtype is known before the first byte is written, so each
shard's header is written first and its tensors are streamed after it, one at a time, in the
planned order. Peak memory is one tensor, whatever the shard size. Files are hashed (sha256) as
they are written: a large tensor's bytes on a hashing thread while the calling thread writes them;
and each large tensor's bytes are handed to the kernel's writeback at once
(:mod:`~mergekit_core.io.writeback`), so the final fsync does not wait for the whole file.

:class:`~mergekit_core.io.destination.AtomicDirectory` (re-exported here) writes into a temporary
directory beside the destination and swaps it into place at the end; on failure the destination
is left as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from mergekit_core.errors import FormatError, MergekitError
from mergekit_core.io.destination import AtomicDirectory, default_mode, naming  # noqa: F401  (re-exported)
from mergekit_core.io.safetensors_header import TensorInfo
from mergekit_core.io.writeback import start_writeback

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_SHARD_BYTES = 5 * 1000**3
PARALLEL_HASH_BYTES = 1 << 20
"""Tensors of this size and larger are hashed on a second thread while they are written: sha256
costs about as much as the copy into the page cache, and both calls release the GIL."""
COPIED_MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
    "added_tokens.json", "chat_template.jinja", "preprocessor_config.json",
)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _header_bytes(infos: Sequence[TensorInfo], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for info in infos:
        header[info.name] = {
            "dtype": info.dtype,
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def plan_shards(infos: Sequence[TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards if shards[0] else []


@dataclass
class _OpenShard:
    path: Path
    file: IO[bytes]
    digest: hashlib._Hash
    remaining: list[TensorInfo]
    written: int = 0
    """Bytes written to the file so far."""
    handed_to_writeback: int = 0
    """Bytes before this offset have been handed to the kernel's writeback (``start_writeback``)."""


class StreamingSafetensorsWriter:
    """Writes planned tensors, in plan order, into one or more safetensors shards in ``directory``.

    ``shard_name='model'`` gives ``model.safetensors`` or ``model-00001-of-0000N.safetensors``
    plus ``model.safetensors.index.json``, the layout ``transformers`` loads.
    """

    def __init__(
        self,
        directory: Path,
        infos: Sequence[TensorInfo],
        *,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
        shard_name: str = "model",
    ) -> None:
        self.directory = Path(directory)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(list(infos), max_shard_bytes)
        n = len(self.shards)
        self.shard_files = (
            [f"{shard_name}.safetensors"] if n <= 1
            else [f"{shard_name}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.index_name = f"{shard_name}.safetensors.index.json" if n > 1 else None
        self._order = [info for shard in self.shards for info in shard]
        self._next = 0
        self._shard_index = -1
        self._open: _OpenShard | None = None
        self.hashes: dict[str, str] = {}
        self._hasher: ThreadPoolExecutor | None = None

    def _start_shard(self) -> None:
        self._shard_index += 1
        infos = self.shards[self._shard_index]
        path = self.directory / self.shard_files[self._shard_index]
        f = path.open("wb")
        digest = hashlib.sha256()
        header = _header_bytes(infos, self.metadata)
        self._open = _OpenShard(path, f, digest, list(infos))
        with naming(path):
            f.write(header)
        digest.update(header)
        self._open.written = len(header)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor; it must match the plan's name, shape and dtype."""
        from mergekit_core.io.dtypes import safetensors_code

        if self._next >= len(self._order):
            raise MergekitError(f"writer: tensor {name!r} was not planned")
        info = self._order[self._next]
        if name != info.name:
            raise MergekitError(f"writer: expected tensor {info.name!r} next, got {name!r}")
        if tuple(tensor.shape) != info.shape or safetensors_code(tensor.dtype) != info.dtype:
            raise MergekitError(
                f"writer: tensor {name!r} is {list(tensor.shape)} {safetensors_code(tensor.dtype)}, "
                f"planned {list(info.shape)} {info.dtype}"
            )
        if self._open is None:
            self._start_shard()
        assert self._open is not None
        if info.nbytes:
            data = memoryview(tensor.detach().contiguous().reshape(-1).view(dtype=_uint8()).numpy())
            with naming(self._open.path):
                self._write_and_hash(data)
        self._open.remaining.pop(0)
        self._next += 1
        if not self._open.remaining:
            self._close_shard()

    def _write_and_hash(self, data: memoryview) -> None:
        """Write ``data`` to the open shard and add it to the shard's digest, in file order."""
        shard = self._open
        assert shard is not None
        shard.written += data.nbytes
        if data.nbytes < PARALLEL_HASH_BYTES:
            shard.file.write(data)
            shard.digest.update(data)
            return
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mk-hash")
        hashed = self._hasher.submit(shard.digest.update, data)
        try:
            shard.file.write(data)
        finally:
            hashed.result()  # the digest is never left mid-update, even when the write failed
        shard.file.flush()  # the smaller tensors before it too: all of it in the kernel's hands
        start_writeback(shard.file.fileno(), shard.handed_to_writeback, shard.written - shard.handed_to_writeback)
        shard.handed_to_writeback = shard.written

    def _close_shard(self) -> None:
        assert self._open is not None
        with naming(self._open.path):
            self._open.file.close()
        self.hashes[self._open.path.name] = self._open.digest.hexdigest()
        self._open = None

    def close(self) -> dict[str, str]:
        """Finish: check every planned tensor was written, write the index; returns file -> sha256."""
        if self._next != len(self._order):
            missing = self._order[self._next].name
            raise MergekitError(f"writer: closed before tensor {missing!r} was written")
        if not self._order:  # an empty model is still a valid file
            path = self.directory / self.shard_files[0] if self.shard_files else self.directory / "model.safetensors"
            path.write_bytes(_header_bytes([], self.metadata))
            self.hashes[path.name] = sha256_file(path)
        if self.index_name:
            index = {
                "metadata": {"total_size": sum(i.nbytes for i in self._order)},
                "weight_map": {
                    info.name: self.shard_files[s] for s, shard in enumerate(self.shards) for info in shard
                },
            }
            path = self.directory / self.index_name
            path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            self.hashes[path.name] = sha256_file(path)
        self._stop_hasher()
        return dict(self.hashes)

    def abort(self) -> None:
        """Close what is open after a failure; the caller discards the files, so a failing flush
        (a full disk) is not raised again over the error that ended the write."""
        if self._open is not None:
            try:
                self._open.file.close()
            except OSError:
                pass
            self._open = None
        self._stop_hasher()

    def _stop_hasher(self) -> None:
        if self._hasher is not None:
            self._hasher.shutdown()
            self._hasher = None


def _uint8() -> torch.dtype:
    import torch

    return torch.uint8


def copy_model_files(source: Path, dest: Path, names: Iterable[str] = COPIED_MODEL_FILES) -> dict[str, str]:
    """Copy config, tokenizer and generation files that exist in ``source``; returns file -> sha256."""
    copied = {}
    for name in names:
        src = Path(source) / name
        if src.is_file():
            shutil.copyfile(src, Path(dest) / name)
            copied[name] = sha256_file(Path(dest) / name)
    return copied


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Small outputs (adapters, artifacts) that fit in memory: one safetensors file; returns sha256."""
    try:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
        os.chmod(path, default_mode())
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path}: cannot write ({exc})") from None
    return sha256_file(path)
