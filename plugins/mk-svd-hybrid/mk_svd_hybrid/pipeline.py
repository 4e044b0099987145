"""Compress the tensors a merge sees, one at a time; rebuild merged task vectors from a record.

:class:`Compressor` encodes each tensor group as it comes (the merge method's ``merge``, or
``compress`` over one read of the sources; ``weighting: cluster`` adds one read for the tasks'
cosine similarities) and holds one tensor's task vectors at a time.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergekit_core import (
    ConfigError,
    FormatError,
    MergeError,
    PrepareContext,
    TensorGroup,
)
from mergekit_core.api import DTYPE_SIZES
from mk_svd_hybrid import weighting
from mk_svd_hybrid.codec import CodecSettings, Decoder, Record, encode
from mk_svd_hybrid.diagnostics import Diagnostics
from mk_svd_hybrid.store import ArtifactReader, ArtifactWriter, tensor_sha256

Progress = Callable[[str], None]


def settings(params: Mapping[str, Any], num_tasks: int, clusters: Sequence[Sequence[int]] = ()) -> CodecSettings:
    lam = params["mask_lambda"]
    lambdas = [float(lam)] * num_tasks if isinstance(lam, (int, float)) else [float(x) for x in lam]
    if len(lambdas) != num_tasks:
        raise ConfigError(f"svd_hybrid: mask_lambda has {len(lambdas)} values for {num_tasks} sources")
    return CodecSettings(
        energy=params["energy"], fp16_energy=params["fp16_energy"], max_rank=params["max_rank"],
        svd=params["svd"], oversample_rank=params["oversample_rank"], svd_niter=params["svd_niter"],
        quant=params["quant"], bits=params["bits"], base_bits=params["base_bits"],
        offset_bits=params["offset_bits"], stages=params["stages"], noise=params["noise"],
        mask="none" if params["mask"] == "none" else "tall", mask_lambdas=tuple(lambdas),
        mask_strategy=params["mask_strategy"], keep_task_masks=params["keep_task_masks"],
        clusters=tuple(tuple(c) for c in clusters), block_mb=float(params.get("block_mb", 256)),
    )


# --------------------------------------------------------------------------- task weights


def source_accuracies(context: PrepareContext, tasks: Sequence[str]) -> dict[str, float]:
    """Each source's own accuracy on its task (same name), from the config's evaluator."""
    from mergekit_core.api import individual_metric, setup_from_spec

    spec = context.plan.spec if context.plan is not None else None
    if context.host is None or spec is None or not spec.sweep.get("evaluator"):
        raise ConfigError("svd_hybrid: accuracies: evaluate needs an evaluator in the config "
                          "(evaluator: NAME, evaluator_params: ...)", hint="or give the accuracies as numbers")
    setup = setup_from_spec(context.host, spec, tasks=list(tasks))
    index = spec.output_dir / "svd_hybrid" / "eval" / "index.json"
    by_name = {s.name: s for s in spec.sources}
    return {t.name: individual_metric(setup, context.host, t, by_name[t.name], spec.base_model, index)
            for t in setup.tasks}


def task_gram(context: PrepareContext, num_tasks: int) -> np.ndarray:
    """Inner products of the whole task vectors (one read of the sources)."""
    gram = np.zeros((num_tasks, num_tasks))
    for group in context.groups():
        flat = torch.stack([x.reshape(-1).float() for x in group.tensors])
        gram += (flat @ flat.T).double().numpy()
    return gram


def task_weights(context: PrepareContext, params: Mapping[str, Any], tasks: Sequence[str]
                 ) -> tuple[list[float], list[int], dict[str, Any]]:
    """(weights, cluster label per task, what to record about how they were chosen)."""
    mode = params["weighting"]
    n = len(tasks)
    if mode == "performance":
        given = params["accuracies"]
        if given is None:
            raise ConfigError("svd_hybrid: weighting: performance needs accuracies (a mapping task: accuracy, "
                              "or 'evaluate' to score each source with the config's evaluator)")
        acc_map = source_accuracies(context, tasks) if given == "evaluate" else given
        try:
            accuracies = weighting.task_accuracies(acc_map, tasks)
        except KeyError as exc:
            raise ConfigError(f"svd_hybrid: accuracies has no value for source {exc.args[0]}") from None
        except IndexError:
            raise ConfigError(f"svd_hybrid: accuracies lists {len(acc_map)} values for {n} sources") from None
        w = weighting.performance(accuracies, params["temperature"])
        return w, [0] * n, {"accuracies": dict(zip(tasks, accuracies)), "temperature": params["temperature"]}
    if mode == "cluster":
        gram = task_gram(context, n)
        seed = context.plan.spec.seed if context.plan is not None else 0
        labels = weighting.cluster_tasks(gram, params["n_clusters"], params["cluster_method"], seed=seed)
        return (weighting.cluster_weights(labels), labels,
                {"cosine": weighting.cosine_matrix(gram).round(6).tolist(), "method": params["cluster_method"]})
    return weighting.uniform(n), [0] * n, {}


# --------------------------------------------------------------------------- masks from a file


class MaskFile:
    """Per-task packed masks from an artifact directory or a safetensors file keyed by tensor name."""

    def __init__(self, path: Path, num_tasks: int) -> None:
        self.path = Path(path)
        self.num_tasks = num_tasks
        self._artifact: ArtifactReader | None = None
        self._file: Any = None
        if self.path.is_dir():
            self._artifact = ArtifactReader(self.path)
            if len(self._artifact.tasks) != num_tasks:
                raise ConfigError(f"{self.path}: masks for {len(self._artifact.tasks)} tasks, the merge has {num_tasks}")
        elif self.path.is_file():
            from safetensors import safe_open

            try:
                self._file = safe_open(str(self.path), framework="pt")
            except Exception as exc:  # safetensors raises its own error types
                raise FormatError(f"{self.path}: not a safetensors mask file ({exc})") from None
        else:
            raise ConfigError(f"mask_file {self.path}: no such file or directory")

    def get(self, name: str, shape: Sequence[int]) -> torch.Tensor | None:
        from mk_svd_hybrid.masks import unpack

        if self._artifact is not None:
            if name not in self._artifact.manifest["tensors"]:
                return None
            packed = self._artifact.record(name).tensors.get("task_masks")
            if packed is None:
                raise FormatError(f"{self.path}: {name} has no task masks (compressed with keep_task_masks false)")
        else:
            if name not in self._file.keys():
                return None
            packed = self._file.get_tensor(name)
        numel = int(np.prod(shape))
        if packed.dim() != 2 or packed.shape[0] != self.num_tasks or packed.shape[1] != (numel + 7) // 8:
            raise FormatError(f"{self.path}: masks of {name} have shape {list(packed.shape)}, expected "
                              f"[{self.num_tasks}, {(numel + 7) // 8}] (packed bits of {list(shape)})")
        return torch.stack([unpack(row, shape) for row in packed])


# --------------------------------------------------------------------------- compress


def _itemsize(dtype: str) -> int:
    return DTYPE_SIZES.get(dtype, 4)


class Compressor:
    """Encodes the tensor groups of one merge, one at a time, as the engine hands them over;
    with a ``directory``, also appends each record (and its diagnostics) to an artifact there,
    whose manifest :meth:`finish` writes after the last tensor.

    Building it decides the task weights (``weighting: cluster`` reads the sources once here,
    for the tasks' Gram matrix; ``accuracies: evaluate`` scores the sources).
    """

    def __init__(self, context: PrepareContext, params: Mapping[str, Any], directory: Path | None = None) -> None:
        plan = context.plan
        if plan is not None:
            tasks = [s.name for s in plan.sources]
            if plan.base is None:
                raise ConfigError("svd_hybrid works on task vectors: give base_model")
        else:  # a bare PrepareContext (plugin tests): the groups name the sources
            tasks = list(next(iter(context.groups())).source_names)
        self.params = params
        self.plan = plan
        self.tasks = tasks
        self.weights, labels, self.weight_info = task_weights(context, params, tasks)
        self.clusters = [[t for t in range(len(tasks)) if labels[t] == c] for c in range(max(labels) + 1)]
        self.codec = settings(params, len(tasks), self.clusters if len(self.clusters) > 1 else ())
        self.masks = MaskFile(Path(params["mask_file"]), len(tasks)) if params["mask_file"] else None
        self.dtypes = {t.name: t.dtype for t in plan.tensors} if plan is not None else {}
        self.writer = ArtifactWriter(directory, int(params["shard_mb"] * 2**20)) if directory is not None else None
        self.diag = Diagnostics(tasks)
        self.structure = hashlib.sha256()
        self.started = time.perf_counter()
        self.encoded: set[str] = set()

    def add(self, group: TensorGroup) -> Record:
        """The record of one tensor (appended to the artifact, when there is one)."""
        tasks = self.tasks
        if group.base is None:
            raise MergeError(f"{group.name}: svd_hybrid needs the base model's tensor (it codes task vectors)")
        if len(group.tensors) != len(tasks):
            raise MergeError(f"{group.name}: only {len(group.tensors)} of {len(tasks)} sources have this tensor; "
                             "svd_hybrid codes every task", hint="use merge_mode: union (a missing tensor is a zero delta)")
        base = group.base.cpu()
        tensors = [x.cpu() for x in group.tensors]
        given = self.masks.get(group.name, base.shape) if self.masks is not None and base.dim() >= 2 else None
        t0 = time.perf_counter()
        record = encode(tensors, self.codec, task_masks=given, seed=group.seed, name=group.name)
        t1 = time.perf_counter()
        record.meta["coefficients"] = [float(c) for c in group.coefficients]
        self.encoded.add(group.name)
        if self.writer is None:
            return record
        decoder = Decoder(record)
        rebuilt = [decoder.task(t) for t in range(len(tasks))]
        t2 = time.perf_counter()
        coefficient_parts = {"fp16": torch.cat([record.tensors[k].reshape(-1) for k in record.tensors
                                                if k.startswith("high.")] or [torch.zeros(0)])}
        if record.meta["kind"] == "matrix":
            quantized = [decoder.coefficients(c)[:, info["fp16_rank"]:].reshape(-1)
                         for c, info in enumerate(record.meta["clusters"]) if info["rank"] > info["fp16_rank"]]
            coefficient_parts["quantized"] = torch.cat(quantized) if quantized else torch.zeros(0)
        self.diag.add(group.name, record, tensors, rebuilt,
                      itemsize=_itemsize(self.dtypes.get(group.name, "F32")),
                      compress_s=t1 - t0, reconstruct_s=t2 - t1, coefficients=coefficient_parts)
        self.structure.update(f"{group.name}:{list(base.shape)};".encode())
        self.writer.add(group.name, record, tensor_sha256(base))
        return record

    def finish(self) -> dict[str, Any]:
        """Write the diagnostics and the manifest of the artifact; return the manifest."""
        assert self.writer is not None
        summary = self.diag.summary()
        summary["overall"]["wall_s"] = round(time.perf_counter() - self.started, 3)
        summary["weights"] = dict(zip(self.tasks, self.weights))
        self.writer.add_json("diagnostics.json", summary)
        plan = self.plan
        header = {
            "tasks": self.tasks, "weights": self.weights, "clusters": self.clusters,
            "weighting": {"mode": self.params["weighting"], **self.weight_info},
            "settings": {k: v for k, v in self.params.items() if k != "artifact_dir"},
            "base_model": {"path": str(plan.spec.base_model) if plan is not None else None,
                           "structure_sha256": self.structure.hexdigest()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return self.writer.finish(header)

    def merged_delta(self, record: Record, coefficients: Sequence[float]) -> torch.Tensor:
        """The merged task vector of one record, as :func:`merged_delta` rebuilds it from the artifact."""
        return combine_record(record, merge_weights(self.weights, coefficients), self.params)


def compress(context: PrepareContext, params: Mapping[str, Any], directory: Path,
             progress: Progress | None = None) -> dict[str, Any]:
    """Write the artifact of the merge ``context`` describes into ``directory``; return its manifest."""
    compressor = Compressor(context, params, directory)
    for group in context.groups():
        compressor.add(group)
        if progress is not None:
            progress(group.name)
    return compressor.finish()


# --------------------------------------------------------------------------- merged deltas


def merge_weights(weights: Sequence[float], coefficients: Sequence[float]) -> list[float]:
    """lambda_t * w_t: the policy's coefficient times the task's weight."""
    return [float(c) * w for c, w in zip(coefficients, weights)]


def combine_record(record: Record, weights: Sequence[float], params: Mapping[str, Any]) -> torch.Tensor:
    return Decoder(record).combine(weights, params["signal_weight"], params["noise_weight"])


def merged_delta(reader: ArtifactReader, name: str, coefficients: Sequence[float],
                 base_shape: Sequence[int] | None = None) -> torch.Tensor:
    """The merged task vector of tensor ``name``, rebuilt from an artifact."""
    return combine_record(reader.record(name, base_shape), merge_weights(reader.weights, coefficients),
                          reader.manifest["settings"])
