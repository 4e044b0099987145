"""The artifact directory: records in safetensors shards, a JSON manifest, sha256 of every file.

    manifest.json                 format, tasks, weights, clusters, settings, per-tensor meta,
                                  base-model fingerprint, sha256 of every other file
    records-00001.safetensors     record tensors, keyed "<tensor name>::<part>"
    diagnostics.json

Nothing is pickled. Opening an artifact checks every file against its sha256 before any tensor
is used; decoding a tensor checks its parts against the manifest and the base tensor's shape.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mergekit_core import FormatError
from mergekit_core.api import save_tensors, sha256_file
from mk_svd_hybrid.codec import SEP, Decoder, Record

FORMAT = "mk-svd-hybrid/1"
MANIFEST = "manifest.json"


def tensor_sha256(x: torch.Tensor) -> str:
    """Fingerprint of a base tensor: sha256 of its float32 bytes (the dtype the merge computes in)."""
    return hashlib.sha256(x.detach().float().contiguous().numpy().tobytes()).hexdigest()


class ArtifactWriter:
    """Collects records and writes them in shards of about ``shard_bytes``; ``finish`` writes the
    manifest last, so a directory without one is not an artifact."""

    def __init__(self, directory: Path, shard_bytes: int = 1 << 30) -> None:
        self.directory = Path(directory)
        self.shard_bytes = shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._pending_names: list[str] = []
        self.files: dict[str, str] = {}
        self.tensors: dict[str, dict[str, Any]] = {}
        self.bytes = 0

    def add(self, name: str, record: Record, base_sha256: str) -> None:
        for part, tensor in record.tensors.items():
            self._pending[f"{name}{SEP}{part}"] = tensor
        self._pending_names.append(name)
        self.tensors[name] = {**record.meta, "parts": sorted(record.tensors), "base_sha256": base_sha256}
        self._pending_bytes += record.nbytes
        self.bytes += record.nbytes
        if self._pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending_names:
            return
        file = f"records-{len([f for f in self.files if f.startswith('records-')]) + 1:05d}.safetensors"
        path = self.directory / file
        self.files[file] = save_tensors(path, self._pending)
        for name in self._pending_names:
            self.tensors[name]["file"] = file
        self._pending, self._pending_bytes, self._pending_names = {}, 0, []

    def add_json(self, file: str, data: Any) -> None:
        path = self.directory / file
        path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
        self.files[file] = sha256_file(path)

    def finish(self, header: dict[str, Any]) -> dict[str, Any]:
        self._flush()
        manifest = {"format": FORMAT, **header, "tensors": self.tensors, "files": self.files}
        (self.directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        return manifest


class ArtifactReader:
    """A checked artifact. Records are read shard by shard, in the order they were written."""

    def __init__(self, directory: Path | str, *, verify: bool = True) -> None:
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise FormatError(f"{self.directory}: not an SVD-Hybrid artifact (no {MANIFEST})",
                              hint="make one with 'mk svd-hybrid compress'")
        try:
            self.manifest = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{path}: unreadable manifest ({exc})") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise FormatError(f"{path}: not a {FORMAT} manifest (format "
                              f"{self.manifest.get('format') if isinstance(self.manifest, dict) else None!r})")
        for key in ("tasks", "weights", "tensors", "files", "settings"):
            if key not in self.manifest:
                raise FormatError(f"{path}: manifest has no '{key}'")
        if verify:
            self.verify()
        self._shard_name: str | None = None
        self._shard: dict[str, torch.Tensor] = {}

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest["tasks"])

    @property
    def weights(self) -> list[float]:
        return [float(w) for w in self.manifest["weights"]]

    @property
    def names(self) -> list[str]:
        return list(self.manifest["tensors"])

    def verify(self) -> None:
        for file, expected in self.manifest["files"].items():
            path = self.directory / file
            if Path(file).name != file or not path.is_file():
                raise FormatError(f"{path}: listed in the artifact's manifest but missing",
                                  hint="the artifact is incomplete; compress again")
            if sha256_file(path) != expected:
                raise FormatError(f"{path}: sha256 does not match the manifest (the file was changed or corrupted)",
                                  hint="compress again")

    def json_file(self, file: str) -> Any:
        return json.loads((self.directory / file).read_text())

    def _load_shard(self, file: str) -> dict[str, torch.Tensor]:
        if file != self._shard_name:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                self._shard = load_file(str(self.directory / file))
            except (OSError, SafetensorError) as exc:
                raise FormatError(f"{self.directory / file}: unreadable ({exc})") from None
            self._shard_name = file
        return self._shard

    def record(self, name: str, base_shape: Sequence[int] | None = None) -> Record:
        meta = self.manifest["tensors"].get(name)
        if meta is None:
            raise FormatError(f"{self.directory}: the artifact has no tensor {name}")
        shard = self._load_shard(meta["file"])
        tensors = {}
        for part in meta["parts"]:
            key = f"{name}{SEP}{part}"
            if key not in shard:
                raise FormatError(f"{self.directory / meta['file']}: missing {key}")
            tensors[part] = shard[key]
        record = Record(tensors, meta)
        check_record(record, name, self.directory / meta["file"], base_shape, len(self.tasks))
        return record

    def decoder(self, name: str, base_shape: Sequence[int] | None = None) -> Decoder:
        return Decoder(self.record(name, base_shape))

    def records(self) -> Iterator[tuple[str, Decoder]]:
        for name in self.names:
            yield name, self.decoder(name)


def check_record(record: Record, name: str, file: Path, base_shape: Sequence[int] | None, num_tasks: int) -> None:
    """The parts of a record have the shapes its meta (and the base tensor) imply."""
    meta, t = record.meta, record.tensors
    shape = tuple(meta["shape"])

    def bad(what: str) -> FormatError:
        return FormatError(f"{file}: {name}: {what}", hint="the artifact does not match its manifest; compress again")

    if base_shape is not None and tuple(base_shape) != shape:
        raise FormatError(f"{file}: {name} has shape {list(shape)} in the artifact but {list(base_shape)} in the "
                          f"base model", hint="reconstruct with the base model the artifact was made from")
    if meta["kind"] == "vector":
        numel = 1
        for d in shape:
            numel *= d
        if tuple(t["values"].shape) != (num_tasks, numel):
            raise bad(f"values have shape {list(t['values'].shape)}, expected {[num_tasks, numel]}")
        return
    rows, cols = meta["rows"], meta["cols"]
    for c, info in enumerate(meta["clusters"]):
        basis = t[f"basis.{c}"]
        if tuple(basis.shape) != (rows, info["rank"]):
            raise bad(f"basis {c} has shape {list(basis.shape)}, expected {[rows, info['rank']]}")
        high = t[f"high.{c}"]
        if tuple(high.shape) != (len(info["tasks"]), info["fp16_rank"], cols):
            raise bad(f"fp16 coefficients {c} have shape {list(high.shape)}, "
                      f"expected {[len(info['tasks']), info['fp16_rank'], cols]}")
    numel = rows * cols
    if "mask" in t and t["mask"].numel() != (numel + 7) // 8:
        raise bad(f"mask has {t['mask'].numel()} bytes, expected {(numel + 7) // 8}")
    for prefix, block in meta.get("blocks", {}).items():
        count = 1
        for d in block["shape"]:
            count *= d
        for j in range(block["stages"]):
            codes = t[f"{prefix}.s{j}.codes"]
            if codes.numel() != (count * block["bits"] + 7) // 8:
                raise bad(f"{prefix} stage {j} has {codes.numel()} code bytes, expected "
                          f"{(count * block['bits'] + 7) // 8}")
            if tuple(t[f"{prefix}.s{j}.step"].shape) != tuple(block["shape"][:-1]):
                raise bad(f"{prefix} stage {j} scales have shape {list(t[f'{prefix}.s{j}.step'].shape)}")
