"""Writing a merge's output: the destination checks before anything is read, then the merged
model (sharded safetensors, config and tokenizer files) or the merged LoRA adapter, written
atomically; or the merged tensors in memory."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergekit_core.config import MergeSpec
from mergekit_core.engine.merger import TensorMerger
from mergekit_core.engine.model_card import write_model_card
from mergekit_core.engine.plan import MergePlan
from mergekit_core.engine.report import adapter_report_dict, report_dict
from mergekit_core.engine.stream import output_infos, stream_merge
from mergekit_core.errors import UsageError
from mergekit_core.io.destination import (
    AtomicDirectory,
    check_destination,
    check_inside_nothing,
    relation,
)
from mergekit_core.io.writer import StreamingSafetensorsWriter, copy_model_files


def input_paths(spec: MergeSpec) -> list[Path]:
    """Every file or directory a merge of ``spec`` reads, its config file included."""
    return ([spec.base_model] if spec.base_model else []) + [s.path for s in spec.sources] + (
        [spec.config_file] if spec.config_file else [])


def check_outputs(spec: MergeSpec, *, save: bool = True, write_bundle: bool = True,
                  force: bool = False) -> list[str]:
    """Check, before anything is read, that the merge's output and run-bundle root replace
    nothing they should not (:func:`~mergekit_core.io.destination.check_destination`); returns
    what ``force`` will replace."""
    inputs = input_paths(spec)
    if write_bundle:
        check_inside_nothing(spec.output_dir, inputs, "run-bundle root (output_dir)")
    if not (save and spec.output.path):
        return []
    check_destination(spec.output.path, inputs=inputs, force=True)  # inputs and files first: never forceable
    if write_bundle and relation(spec.output.path, spec.output_dir) in ("is", "contains"):
        raise UsageError(f"output {spec.output.path} {relation(spec.output.path, spec.output_dir)} the "
                         f"run-bundle root {spec.output_dir}; replacing it would delete the run records",
                         hint="choose another place for the output, outside output_dir (--output-dir)")
    kind = "adapter" if spec.output.kind == "adapter" else "model"  # auto: either, they replace each other
    return check_destination(spec.output.path, inputs=inputs, force=force, kind=kind)


def write_output(plan: MergePlan, merger: TensorMerger, spec: MergeSpec, out_path: Path | None,
                 recipe: dict[str, Any], progress: Callable[..., None] | None, *, force: bool = False,
                 merged: Callable[[], None] | None = None,
                 ) -> tuple[dict[str, Any] | None, dict[str, Any], dict[str, str]]:
    """Merge every tensor and write the output at ``out_path`` (None: keep the tensors in memory).

    Returns ``(state dict or None, report, file -> sha256)``; ``recipe`` goes into every output
    file's header. ``merged()`` runs once every tensor is merged and written, before the output
    is published: an error there publishes nothing.
    """
    done = merged or (lambda: None)
    inputs = input_paths(spec)
    if plan.output_kind == "adapter":
        return write_adapter(plan, merger, spec, out_path, recipe, progress, inputs=inputs, force=force, merged=done)
    header = {"mergekit_recipe": json.dumps(recipe, default=str, sort_keys=True)}
    if out_path is None:
        state: dict[str, Any] = {}
        report = stream_merge(merger, state.__setitem__, output_infos(merger, spec.output.dtype), progress)
        done()
        return state, report_dict(plan, report), {}
    with AtomicDirectory(out_path, inputs=inputs, force=force, kind="model") as tmp:
        planned = output_infos(merger, spec.output.dtype)
        writer = StreamingSafetensorsWriter(tmp, planned, max_shard_bytes=spec.output.shard_bytes, metadata=header)
        try:
            report = stream_merge(merger, writer.write, planned, progress, background_writes=True)
            hashes = writer.close()
        finally:
            writer.abort()
        config_dir = spec.base_model if spec.base_model else plan.sources[0].spec.path
        if config_dir.is_dir():
            hashes.update(copy_model_files(config_dir, tmp))
            hashes.update(plan.finish_model_files(tmp))
        hashes.update(write_model_card(tmp, out_path.name, spec, plan.method.name, merger.params,
                                       recipe["lambda_values"], "model"))
        done()
    return None, report_dict(plan, report), hashes


def write_adapter(plan: MergePlan, merger: TensorMerger, spec: MergeSpec, out_path: Path | None,
                  recipe: dict[str, Any], progress: Callable[..., None] | None, *,
                  inputs: list[Path], force: bool, merged: Callable[[], None]
                  ) -> tuple[dict[str, Any] | None, dict[str, Any], dict[str, str]]:
    """:func:`write_output` for an adapter output: merged LoRA factors, in the sources' dtype."""
    import torch

    from mergekit_core.engine.adapter_output import merge_adapters
    from mergekit_core.io.peft_writer import lora_keys, write_lora_adapter

    factors = merge_adapters(merger, spec.output.adapter_rank, progress)
    report = adapter_report_dict(plan, factors)
    first = plan.sources[0].reader
    dtype = torch.float32
    if spec.output.dtype:
        dtype = getattr(torch, spec.output.dtype)
    else:
        from mergekit_core.io.dtypes import torch_dtype

        codes = {i.dtype for i in first.infos().values()}
        if len(codes) == 1:
            dtype = torch_dtype(codes.pop())
    if out_path is None:
        state = {}
        for m in factors.modules:
            key_a, key_b = lora_keys(m.module, m.layer_type)
            state[key_a], state[key_b] = m.A, m.B
        state.update(factors.full_tensors)
        merged()
        return state, report, {}
    with AtomicDirectory(out_path, inputs=inputs, force=force, kind="adapter") as tmp:
        hashes = write_lora_adapter(
            tmp, factors.modules, dtype=dtype,
            base_model_name_or_path=first.config.base_model_name_or_path,
            task_type=first.config.task_type, fan_in_fan_out=first.config.fan_in_fan_out,
            full_tensors=factors.full_tensors, modules_to_save=factors.modules_to_save,
            metadata={"mergekit_recipe": json.dumps(recipe, default=str, sort_keys=True)},
            allow_nonfinite=merger.allow_nonfinite, warn=merger.warn,
        )
        hashes.update(write_model_card(tmp, out_path.name, spec, plan.method.name, merger.params,
                                       recipe["lambda_values"], "adapter"))
        merged()
    return None, report, hashes
