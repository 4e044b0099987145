"""Lazy readers of full checkpoints: safetensors (file, directory, sharded) and torch state dicts.

Opening a reader reads headers only. ``get(name)`` loads one tensor (memory-mapped for
safetensors). Torch pickles are loaded only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import mmap
import os
import reprlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit_core.errors import FormatError
from mergekit_core.io.safetensors_header import (
    SafetensorsHeader,
    TensorInfo,
    read_header,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")


def read_json(path: Path, what: str) -> Any:
    """The parsed JSON of ``path``; FormatError naming the file when missing, unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FormatError(f"{path}: {what} is missing") from None
    except RecursionError:
        raise FormatError(f"{path}: {what} is not valid JSON (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: JSONDecodeError, integers too long
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FormatError(f"{path}: {what} is not valid JSON ({first})") from None


def read_shard_index(directory: Path, name: str) -> tuple[dict[str, str], list[Path]]:
    """The weight map of a shard index and its shard files, each checked to exist."""
    index_path = directory / name
    index = read_json(index_path, "shard index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise FormatError(f"{index_path}: has no 'weight_map' object")
    bad = [v for v in weight_map.values() if not isinstance(v, str) or not v]
    if bad:
        raise FormatError(f"{index_path}: 'weight_map' must map tensor names to shard file names, "
                          f"got {reprlib.repr(bad[0])}")
    shards = []
    for shard in sorted(set(weight_map.values())):
        if not (directory / shard).is_file():
            raise FormatError(f"{index_path}: names shard {shard!r}, which is missing from {directory}")
        shards.append(directory / shard)
    return weight_map, shards


def read_model_config(directory: Path) -> dict[str, Any] | None:
    """``config.json`` of a model directory (a JSON object), or None when there is none."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    config = read_json(path, "config.json")
    if not isinstance(config, dict):
        raise FormatError(f"{path}: config.json must be a JSON object, got {type(config).__name__}")
    return config


class CheckpointReader:
    """A lazy view of one checkpoint's tensors."""

    format_name = "checkpoint"
    owns_tensors = False
    """True when ``get`` returns fresh memory the caller may modify in place."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.model_config: dict[str, Any] | None = None

    def infos(self) -> dict[str, TensorInfo]:
        raise NotImplementedError

    def names(self) -> list[str]:
        return list(self.infos())

    def get(self, name: str) -> torch.Tensor:
        """One tensor. Some readers hand out views that later reads share (memory-mapped torch
        files): never modify it in place without copying (see engine.merger.own)."""
        raise NotImplementedError

    def files(self) -> list[Path]:
        """The files whose bytes make up this checkpoint (for checksums)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


MAP_MIN_BYTES = 1 << 20
"""Smaller tensors are read with ``pread`` (a mapping costs more than copying them)."""
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14; Python 3.11 lacks the name


def _mapped(fd: int, begin: int, nbytes: int) -> torch.Tensor | None:
    """``nbytes`` at ``begin`` as a private mapping (uint8), populated now; None where the file
    cannot be mapped. OSError when the file is shorter than that."""
    import torch

    start = begin - begin % mmap.ALLOCATIONGRANULARITY
    size = os.fstat(fd).st_size
    if begin + nbytes > size:
        raise OSError(f"unexpected end of file: {begin + nbytes} bytes needed, {size} present")
    try:
        mapped = mmap.mmap(fd, nbytes + begin - start, offset=start, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return None
    if hasattr(mapped, "madvise"):
        try:
            mapped.madvise(_MADV_POPULATE_READ)
        except OSError:  # an older kernel: start the read-ahead at least
            mapped.madvise(mmap.MADV_WILLNEED)
    return torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=begin - start)


def _pread(fd: int, begin: int, nbytes: int) -> torch.Tensor:
    import torch

    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy()) if nbytes else memoryview(b"")
    got = 0
    while got < nbytes:
        n = os.preadv(fd, [view[got:]], begin + got)
        if n <= 0:
            raise OSError(f"unexpected end of file after {got} of {nbytes} bytes")
        got += n
    return buf


class SafetensorsReader(CheckpointReader):
    """One or several safetensors files; the tensor -> file map comes from the index when sharded."""

    format_name = "safetensors"
    owns_tensors = True

    def __init__(self, path: Path, headers: list[SafetensorsHeader]) -> None:
        super().__init__(path)
        self.headers = headers
        self._where: dict[str, SafetensorsHeader] = {}
        for header in headers:
            for name in header.tensors:
                if name in self._where:
                    raise FormatError(
                        f"{path}: tensor {name!r} is stored twice ({self._where[name].path.name} "
                        f"and {header.path.name})"
                    )
                self._where[name] = header
        self._infos = {n: h.tensors[n] for n, h in self._where.items()}
        self._handles: dict[Path, Any] = {}

    @classmethod
    def from_file(cls, path: Path) -> SafetensorsReader:
        return cls(path, [read_header(path)])

    @classmethod
    def from_directory(cls, directory: Path) -> SafetensorsReader:
        directory = Path(directory)
        index_path = directory / SAFETENSORS_INDEX
        if index_path.is_file():
            weight_map, shards = read_shard_index(directory, SAFETENSORS_INDEX)
            headers = [read_header(p) for p in shards]
            reader = cls(directory, headers)
            missing = [n for n, shard in weight_map.items()
                       if n not in reader._where or reader._where[n].path.name != shard]
            if missing:
                raise FormatError(
                    f"{index_path}: tensor {missing[0]!r} is not in shard {weight_map[missing[0]]!r} "
                    f"({len(missing)} index entries do not match their shards)"
                )
        else:
            files = sorted(p for p in directory.glob("*.safetensors") if p.name != "adapter_model.safetensors")
            if not files:
                raise FormatError(f"{directory}: no safetensors files")
            reader = cls(directory, [read_header(p) for p in files])
        reader.model_config = read_model_config(directory)
        return reader

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def files(self) -> list[Path]:
        extra = [self.path / SAFETENSORS_INDEX] if (self.path / SAFETENSORS_INDEX).is_file() else []
        return [h.path for h in self.headers] + extra

    def get(self, name: str) -> torch.Tensor:
        """One tensor, memory-mapped privately: the caller may modify it in place (copy on write,
        the file never changes), and the mapping lives as long as the tensor.

        The pages are populated on the calling thread (``MADV_POPULATE_READ``), so a reader
        thread does the disk's work while another computes, and reading a cached file copies
        nothing (``pread`` into fresh memory cost a page fault, a zeroed page and a copy per 4 KiB:
        ``benchmarks/read_paths.py``). Only the tensors in flight are resident, as before. Where
        mapping fails (a file system without mmap, the process's map count at its limit) and for
        tensors under ``MAP_MIN_BYTES``, the tensor is read with ``pread``. As with any mapped
        file, another process truncating a source while a merge reads it stops the merge with
        SIGBUS; mk itself never writes to its inputs.
        """
        from mergekit_core.io.dtypes import torch_dtype

        header = self._where.get(name)
        if header is None:
            raise FormatError(f"{self.path}: has no tensor {name!r}")
        info = header.tensors[name]
        begin = header.data_start + header.offsets[name]
        try:
            fd = self._handles.get(header.path)
            if fd is None:
                fd = os.open(header.path, os.O_RDONLY)
                self._handles[header.path] = fd
            buf = _mapped(fd, begin, info.nbytes) if info.nbytes >= MAP_MIN_BYTES else None
            if buf is None:
                buf = _pread(fd, begin, info.nbytes)
        except OSError as exc:
            raise FormatError(f"{header.path}: cannot read tensor {name!r} ({exc})") from None
        try:
            return buf.view(torch_dtype(info.dtype)).reshape(info.shape)
        except (RuntimeError, ValueError) as exc:  # e.g. more dimensions than torch allows
            raise FormatError(f"{header.path}: cannot load tensor {name!r} of shape {list(info.shape)} "
                              f"{info.dtype} ({str(exc).splitlines()[0]})") from None

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()


class TorchReader(CheckpointReader):
    """PyTorch ``.bin``/``.pt`` state dicts, single or sharded, loaded with ``weights_only=True``.

    Data is memory-mapped where the file uses the zip format (torch >= 1.6), so listing names
    does not read the tensors' bytes.
    """

    format_name = "torch"

    def __init__(self, path: Path, files: list[Path]) -> None:
        super().__init__(path)
        self._files = files
        self._state: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_directory(cls, directory: Path) -> TorchReader:
        directory = Path(directory)
        if (directory / TORCH_INDEX).is_file():
            _, files = read_shard_index(directory, TORCH_INDEX)
        else:
            files = sorted(p for p in directory.iterdir() if p.suffix in TORCH_SUFFIXES
                           and not p.name.startswith(("adapter_model", "training_args", "optimizer")))
        if not files:
            raise FormatError(f"{directory}: no PyTorch state-dict files")
        reader = cls(directory, files)
        reader.model_config = read_model_config(directory)
        return reader

    def _load(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            state: dict[str, torch.Tensor] = {}
            for f in self._files:
                for name, tensor in load_torch_state_dict(f).items():
                    if name in state:
                        raise FormatError(f"{self.path}: tensor {name!r} is stored twice")
                    state[name] = tensor
            self._state = state
        return self._state

    def infos(self) -> dict[str, TensorInfo]:
        from mergekit_core.io.dtypes import safetensors_code

        return {n: TensorInfo(n, tuple(t.shape), safetensors_code(t.dtype)) for n, t in self._load().items()}

    def get(self, name: str) -> torch.Tensor:
        state = self._load()
        if name not in state:
            raise FormatError(f"{self.path}: has no tensor {name!r}")
        return state[name]

    def files(self) -> list[Path]:
        return list(self._files)

    def close(self) -> None:
        self._state = None


def load_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain ``{name: tensor}`` dict from a torch pickle, never unpickling arbitrary objects."""
    import pickle

    import torch

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (pre-zip) files cannot be memory-mapped
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
        raise FormatError(
            f"{path}: refused to load: it is not a plain state dict of tensors ({first}); "
            "convert it to safetensors with a tool you trust"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise FormatError(f"{path}: not a readable PyTorch file ({exc})") from None
    if isinstance(obj, dict) and set(obj) == {"state_dict"} and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise FormatError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    return obj
