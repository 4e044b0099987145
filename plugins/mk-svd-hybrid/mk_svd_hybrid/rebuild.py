"""``reconstruct``: the merged model (or one task's model) from an artifact and the base model,
without the source checkpoints. Tensors are written one at a time, into a temporary directory
that becomes the output only when everything was checked and written."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergekit_core import FormatError, PluginHost, UsageError
from mergekit_core.api import (
    AtomicDirectory,
    StreamingSafetensorsWriter,
    TensorInfo,
    check_destination,
    check_finite,
    copy_model_files,
    is_float,
    open_checkpoint,
    parse_user_dtype,
    safetensors_code,
    torch_dtype,
)
from mk_svd_hybrid.pipeline import merged_delta
from mk_svd_hybrid.store import ArtifactReader, tensor_sha256


def _check_base(reader: ArtifactReader, infos: dict[str, TensorInfo], base_path: Path) -> None:
    """Names and shapes first, so a wrong base fails before any tensor is read."""
    structure = hashlib.sha256()
    for name, meta in reader.manifest["tensors"].items():
        info = infos.get(name)
        if info is None:
            raise FormatError(f"{base_path}: has no tensor {name}, which the artifact {reader.directory} codes",
                              hint="reconstruct with the base model the artifact was made from")
        if list(info.shape) != list(meta["shape"]):
            raise FormatError(f"{base_path}: {name} has shape {list(info.shape)}, the artifact {reader.directory} "
                              f"was made for {meta['shape']}",
                              hint="reconstruct with the base model the artifact was made from")
        structure.update(f"{name}:{list(info.shape)};".encode())
    expected = reader.manifest.get("base_model", {}).get("structure_sha256")
    if expected and structure.hexdigest() != expected:
        raise FormatError(f"{reader.directory}: the artifact's tensor list does not match its manifest",
                          hint="compress again")


def task_index(reader: ArtifactReader, task: str) -> int:
    if task not in reader.tasks:
        raise UsageError(f"{reader.directory}: no task {task!r}; its tasks: {', '.join(reader.tasks)}")
    return reader.tasks.index(task)


def reconstruct(artifact: Path | str, base_model: Path | str, out: Path | str, host: PluginHost, *,
                task: str | None = None, lam: float | None = None, dtype: str | None = None,
                shard_bytes: int = 5 * 2**30, progress: Callable[[str], None] | None = None,
                force: bool = False) -> dict[str, Any]:
    """Write base + rebuilt delta for every tensor; returns a summary (output path, sha256 of files).

    The merged delta uses the coefficients recorded at compression (the lambda policy's values)
    unless ``lam`` is given; ``task`` rebuilds that task's own model instead. ``out`` follows the
    rules of :func:`mergekit_core.io.destination.check_destination` (``force`` as there).
    """
    inputs = [Path(artifact), Path(base_model)]
    check_destination(out, inputs=inputs, force=force, kind="model")
    reader = ArtifactReader(artifact)
    base = open_checkpoint(base_model, host)
    try:
        infos = base.infos()
        _check_base(reader, infos, Path(base_model))
        target = task_index(reader, task) if task is not None else None
        coded = reader.manifest["tensors"]
        out_infos = []
        for name, info in infos.items():
            code = info.dtype
            if dtype and is_float(code) and name in coded:
                code = safetensors_code(torch_dtype(parse_user_dtype(dtype, "--dtype")))
            out_infos.append(TensorInfo(name, info.shape, code))
        recipe = {"svd_hybrid_artifact": str(Path(artifact).resolve()), "task": task, "lambda": lam}
        with AtomicDirectory(Path(out), inputs=inputs, force=force, kind="model") as tmp:
            writer = StreamingSafetensorsWriter(tmp, out_infos, max_shard_bytes=shard_bytes,
                                                metadata={"mergekit_recipe": json.dumps(recipe)})
            try:
                for info in out_infos:
                    x = base.get(info.name)
                    if info.name in coded:
                        rebuilt = _rebuilt(reader, info.name, x, target, lam)
                        x = rebuilt.to(torch_dtype(info.dtype))
                        check_finite(info.name, x, computed=rebuilt)
                    writer.write(info.name, x)
                    if progress is not None:
                        progress(info.name)
                hashes = writer.close()
            finally:
                writer.abort()
            if Path(base_model).is_dir():
                hashes.update(copy_model_files(Path(base_model), tmp))
    finally:
        base.close()
    return {"output": str(out), "task": task, "lambda": lam, "tensors": len(out_infos),
            "rebuilt": len(coded), "sha256": hashes}


def _rebuilt(reader: ArtifactReader, name: str, base: Any, target: int | None, lam: float | None) -> Any:
    meta = reader.manifest["tensors"][name]
    basef = base.float()
    if tensor_sha256(basef) != meta["base_sha256"]:
        raise FormatError(f"{name}: the base model's tensor differs from the one the artifact {reader.directory} "
                          f"was made from", hint="reconstruct with the base model the artifact was made from")
    if target is not None:
        delta = reader.decoder(name, tuple(base.shape)).task(target)
    else:
        coefficients = meta["coefficients"] if lam is None else [lam] * len(reader.tasks)
        delta = merged_delta(reader, name, coefficients, tuple(base.shape))
    return delta.add_(basef)
