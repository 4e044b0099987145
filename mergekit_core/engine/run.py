"""``run_merge(spec, host) -> MergeResult``: the one entry point for the CLI, sweeps and optimizers."""

from __future__ import annotations

import hashlib
import json
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_core.components import (
    LambdaPolicy,
    MergeMethod,
    Optimizer,
    OptimizerContext,
    PrepareContext,
    Transform,
)
from mergekit_core.config import MergeSpec
from mergekit_core.engine.compute import EnginePrepareContext, TensorMerger
from mergekit_core.engine.execute import StreamReport, output_infos, stream_merge
from mergekit_core.engine.plan import MergePlan, build_plan
from mergekit_core.errors import MergekitError, UsageError
from mergekit_core.io.destination import AtomicDirectory, check_destination, check_inside_nothing, relation
from mergekit_core.io.writer import StreamingSafetensorsWriter, copy_model_files, sha256_file
from mergekit_core.outputs import new_run_dir, write_json
from mergekit_core.plugins import PluginHost

FULL_HASH_LIMIT = 256 * 2**20
"""Input files up to this size get a full sha256; larger ones a fingerprint (size + header hash)
unless ``hash_inputs`` is set: hashing a 140 GB model would double the merge's reading."""


@dataclass
class Components:
    """The resolved components of a spec, with validated parameters."""

    method: MergeMethod
    params: dict[str, Any]
    transforms: list[tuple[Transform, dict[str, Any]]]
    policy: LambdaPolicy
    policy_params: dict[str, Any]
    optimizer: Optimizer
    optimizer_params: dict[str, Any]


@dataclass
class MergeResult:
    spec: MergeSpec
    method: str
    params: dict[str, Any]
    lambda_values: dict[str, float]
    output_kind: str
    output_path: Path | None
    run_dir: Path | None
    metadata: dict[str, Any]
    state_dict: dict[str, Any] | None = None
    report: dict[str, Any] = field(default_factory=dict)


def resolve_components(spec: MergeSpec, host: PluginHost) -> Components:
    """Look up every named component and validate its parameters; report all problems at once."""
    problems: list[MergekitError] = []

    def attempt(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except UsageError as exc:
            problems.append(exc)
            return None

    method = attempt(lambda: host.get("merge_method", spec.method.name))
    params = attempt(lambda: method.resolve_params(spec.method.params)) if method else None
    transforms = []
    for ref in spec.transforms:
        comp = attempt(lambda ref=ref: host.get("transform", ref.name))
        tparams = attempt(lambda c=comp, r=ref: c.resolve_params(r.params)) if comp else None
        if comp is not None and tparams is not None:
            transforms.append((comp, tparams))
    policy_name = spec.lambda_policy.name if spec.lambda_policy else (
        method.default_lambda_policy if method else "scalar")
    policy = attempt(lambda: host.get("lambda_policy", policy_name))
    policy_params = None
    if policy is not None:
        given = dict(spec.lambda_policy.params) if spec.lambda_policy else {}
        declared = {p.name for p in policy.params}
        if params and "lambda" in params:  # the method's lambda is the policy's default value
            for key in ("lambda", "default"):
                if key in declared and given.get(key) is None:
                    given[key] = params["lambda"]
        policy_params = attempt(lambda: policy.resolve_params(given))
    optimizer = attempt(lambda: host.get("optimizer", spec.optimizer.name))
    opt_params = attempt(lambda: optimizer.resolve_params(spec.optimizer.params)) if optimizer else None
    if problems:
        hints = [p.hint for p in problems if p.hint]
        raise UsageError("; ".join(p.message for p in problems), hint="; ".join(hints) or None)
    return Components(method, params, transforms, policy, policy_params, optimizer, opt_params)


_ALLOCATOR_BOUNDED = False


def bound_allocator() -> None:
    """Make glibc hand large tensor buffers straight back to the OS when they are freed.

    Tensors are read on one thread and freed on another; with glibc's default (a threshold that
    grows up to 32 MB) such buffers are recycled through per-thread heaps that fragment, and peak
    RSS creeps up with the number of tensors merged. A fixed 1 MiB mmap threshold keeps it
    bounded by the tensors in flight (measured in benchmarks/merge_speed.py).
    """
    global _ALLOCATOR_BOUNDED
    if _ALLOCATOR_BOUNDED or not sys.platform.startswith("linux"):
        return
    _ALLOCATOR_BOUNDED = True
    try:
        import ctypes

        M_MMAP_THRESHOLD = -3
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _fingerprint(path: Path, full: bool) -> dict[str, Any]:
    size = path.stat().st_size
    if full or size <= FULL_HASH_LIMIT:
        return {"size": size, "sha256": sha256_file(path)}
    with path.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        digest = hashlib.sha256(head + f.read(min(length, 100_000_000))).hexdigest()
    return {"size": size, "header_sha256": digest}


def input_hashes(plan: MergePlan, full: bool = False,
                 progress: Callable[..., None] | None = None) -> dict[str, dict[str, Any]]:
    readers = ([plan.base] if plan.base is not None else []) + [s.reader for s in plan.sources]
    files = [p for r in readers for p in r.files()]
    if progress:
        progress("phase", label="hashing inputs", total=len(files))
    out = {}
    for p in files:
        out[str(p)] = _fingerprint(p, full)
        if progress:
            progress("step", name=p.name)
    return out


def versions(host: PluginHost, comps: Components) -> dict[str, str | None]:
    from mergekit_core import __version__

    used = [("merge_method", comps.method.name), ("lambda_policy", comps.policy.name),
            ("optimizer", comps.optimizer.name)] + [("transform", t.name) for t, _ in comps.transforms]
    out: dict[str, str | None] = {"mergekit-core": __version__}
    for kind, name in used:
        for p in host.index[kind].get(name, []):
            out[p.plugin.distribution or p.plugin.name] = p.plugin.version
    return out


def lambda_values(plan: MergePlan, comps: Components, host: PluginHost) -> dict[str, float]:
    """Ask the optimizer for the policy's values. It may build merged weights for any values
    (in memory) and, when the config names an evaluator, score them on its tasks."""
    spec = plan.spec
    initial = comps.policy.initial_values(comps.policy_params, len(plan.sources), plan.layers)

    def build_merged(values: dict[str, float]) -> dict[str, Any]:
        merged = run_merge(_model_spec(spec), host, in_memory=True, values=values, write_bundle=False)
        return merged.state_dict

    evaluate = None
    if spec.sweep.get("evaluator"):
        from mergekit_core.evaluation.evaluate import score, setup_from_spec

        setup = setup_from_spec(host, spec)

        def evaluate(values: dict[str, float]) -> dict[str, float]:
            model = build_merged(values)
            return {t.name: score(setup, model, t)[0][t.metric] for t in setup.tasks}

    context = OptimizerContext(plan=plan, policy=comps.policy, policy_params=comps.policy_params,
                               initial_values=initial, evaluate=evaluate, build_merged=build_merged,
                               extras={"host": host})
    return dict(comps.optimizer.optimize(context, comps.optimizer_params))


@contextmanager
def prepare_context(spec: MergeSpec, host: PluginHost) -> Iterator[tuple[PrepareContext, Components]]:
    """The tensor groups a merge of ``spec`` would hand its method, without merging anything.

    For commands that analyse or compress the sources with the engine's reading, transforms and
    lambda policy (``mk svd-hybrid compress``): ``context.groups()`` streams them, one read of the
    sources per call.
    """
    bound_allocator()
    comps = resolve_components(spec, host)
    plan = build_plan(spec, host, comps.method)
    merger: TensorMerger | None = None
    try:
        chosen = lambda_values(plan, comps, host)
        merger = TensorMerger(plan, comps.method, comps.params, comps.transforms, comps.policy, chosen,
                              compute_dtype=spec.compute_dtype)
        yield EnginePrepareContext(merger, host), comps
    finally:
        if merger is not None:
            merger.close()
        plan.close()


def _model_spec(spec: MergeSpec) -> MergeSpec:
    """The same merge, as full weights in memory (what an optimizer evaluates)."""
    from dataclasses import replace

    return replace(spec, output=replace(spec.output, kind="model"))


def run_merge(
    spec: MergeSpec,
    host: PluginHost,
    *,
    in_memory: bool = False,
    progress: Callable[..., None] | None = None,
    allow_nonfinite: bool = False,
    hash_inputs: bool = False,
    values: dict[str, float] | None = None,
    write_bundle: bool = True,
    force: bool = False,
) -> MergeResult:
    """Plan, choose lambdas, stream the merge, and record it.

    ``in_memory``: return the merged tensors in ``result.state_dict`` and write no model files.
    ``values``: lambda-policy values to use instead of asking the optimizer (sweeps do this).
    ``force``: replace a non-empty ``output.path`` that ``mk`` did not write (never an input).

    Raises:
        UsageError: the output or the run-bundle root would replace or lie inside an input, or
            the output is a non-empty directory ``mk`` did not write (without ``force``).
    """
    started = time.time()
    bound_allocator()
    save = spec.output.save and not in_memory
    replaced = check_outputs(spec, save=save, write_bundle=write_bundle, force=force)
    comps = resolve_components(spec, host)
    plan = build_plan(spec, host, comps.method)
    warnings: list[str] = list(plan.notes)  # tensors a source has but the output cannot hold
    run_dir: Path | None = None
    merger: TensorMerger | None = None
    try:
        with ExitStack() as stack:
            chosen = dict(values) if values is not None else lambda_values(plan, comps, host)
            merger = TensorMerger(plan, comps.method, comps.params, comps.transforms, comps.policy, chosen,
                                  compute_dtype=spec.compute_dtype, allow_nonfinite=allow_nonfinite,
                                  warn=warnings.append)
            if comps.method.needs_prepare:
                merger.state = comps.method.prepare(EnginePrepareContext(merger, host, progress), comps.params)
            out_path = write_to = spec.output.path
            staging: Path | None = None
            if write_bundle:  # written under a hidden name, published whole when the merge succeeded
                run_dir = new_run_dir(spec.output_dir, comps.method.name, spec.task_combo)
                staging = stack.enter_context(AtomicDirectory(run_dir, kind="run_bundle", what="run bundle"))
            if replaced:
                warnings.append(f"--force: replaced the {len(replaced)} entries of {out_path} ("
                                + ", ".join(replaced[:5]) + (", ..." if len(replaced) > 5 else "") + ")")
            if save and out_path is None:
                if run_dir is None or staging is None:
                    raise UsageError("nowhere to write the merge: give output.path (--out) or keep the run bundle")
                out_path, write_to = run_dir / plan.output_kind, staging / plan.output_kind
            recipe = {"spec": spec.to_json(), "lambda_values": chosen, "versions": versions(host, comps)}
            state_dict, report, hashes = _execute(plan, merger, spec, write_to if save else None, recipe, progress,
                                                  force=force)
            metadata = {
                "method": comps.method.name,
                "params": comps.params,
                "lambda_policy": {"name": comps.policy.name, "params": comps.policy_params},
                "lambda_values": chosen,
                "transforms": [{"name": t.name, "params": p} for t, p in comps.transforms],
                "optimizer": {"name": comps.optimizer.name, "params": comps.optimizer_params},
                "seed": spec.seed,
                "spec": spec.to_json(),
                "config": spec.to_config(),
                "versions": recipe["versions"],
                "sources": [{"name": s.name, "path": str(s.spec.path), "format": s.reader.format_name}
                            for s in plan.sources],
                "base_model": str(spec.base_model) if spec.base_model else None,
                "output": {"kind": plan.output_kind, "path": str(out_path) if save else None, "sha256": hashes},
                "inputs": input_hashes(plan, hash_inputs, progress) if write_bundle else {},
                "report": report,
                "warnings": warnings,
                "wall_time_s": round(time.time() - started, 3),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
            if staging is not None:
                write_json(staging / "merge_metadata.json", metadata)
                write_json(staging / "summary.json", {
                    "method": comps.method.name, "sources": [s.name for s in plan.sources],
                    "output": metadata["output"]["path"], "output_kind": plan.output_kind,
                    "tensors": {k: report[k] for k in ("merged", "copied", "dropped")},
                    "relative_delta_norm": report.get("relative_delta_norm"),
                    "energy_kept": report.get("energy_kept"), "wall_time_s": metadata["wall_time_s"],
                })
            result = MergeResult(spec, comps.method.name, comps.params, chosen, plan.output_kind,
                                 out_path if save else None, run_dir, metadata, state_dict, report)
        return result
    finally:
        if merger is not None:
            merger.close()
        plan.close()


def input_paths(spec: MergeSpec) -> list[Path]:
    """Every file or directory a merge of ``spec`` reads."""
    return ([spec.base_model] if spec.base_model else []) + [s.path for s in spec.sources]


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
                         hint="choose an output directory outside output_dir (--output-dir)")
    return check_destination(spec.output.path, inputs=inputs, force=force)


def _execute(plan: MergePlan, merger: TensorMerger, spec: MergeSpec, out_path: Path | None,
             recipe: dict[str, Any], progress: Callable[..., None] | None, *, force: bool = False
             ) -> tuple[dict[str, Any] | None, dict[str, Any], dict[str, str]]:
    inputs = input_paths(spec)
    if plan.output_kind == "adapter":
        return _execute_adapter(plan, merger, spec, out_path, recipe, progress, inputs=inputs, force=force)
    header = {"mergekit_recipe": json.dumps(recipe, default=str, sort_keys=True)}
    if out_path is None:
        state: dict[str, Any] = {}
        report = stream_merge(merger, state.__setitem__, output_infos(merger, spec.output.dtype), progress)
        return state, _report_dict(plan, report), {}
    with AtomicDirectory(out_path, inputs=inputs, force=force, kind="model") as tmp:
        planned = output_infos(merger, spec.output.dtype)
        writer = StreamingSafetensorsWriter(tmp, planned, max_shard_bytes=spec.output.shard_bytes, metadata=header)
        try:
            report = stream_merge(merger, writer.write, planned, progress)
            hashes = writer.close()
        finally:
            writer.abort()
        config_dir = spec.base_model if spec.base_model else plan.sources[0].spec.path
        if config_dir.is_dir():
            hashes.update(copy_model_files(config_dir, tmp))
            hashes.update(plan.finish_model_files(tmp))
    return None, _report_dict(plan, report), hashes


def _execute_adapter(plan: MergePlan, merger: TensorMerger, spec: MergeSpec, out_path: Path | None,
                     recipe: dict[str, Any], progress: Callable[..., None] | None, *,
                     inputs: list[Path], force: bool) -> tuple[dict[str, Any] | None, dict[str, Any], dict[str, str]]:
    import torch

    from mergekit_core.engine.adapter_output import merge_adapters
    from mergekit_core.io.peft_writer import lora_keys, write_lora_adapter

    merged = merge_adapters(merger, spec.output.adapter_rank, progress)
    report = {
        "merged": len(merged.modules) + len(merged.full_tensors),
        "copied": 0,
        "dropped": len(plan.by_action("drop")) + len(plan.by_action("copy")),
        "exact_modules": len(merged.exact),
        "energy_kept": merged.energy_kept,
        "energy_kept_per_module": merged.energy,
        "left_out": {t.name: t.reason for t in plan.tensors if t.action != "merge"},
        "notes": plan.notes,
    }
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
        for m in merged.modules:
            key_a, key_b = lora_keys(m.module, m.layer_type)
            state[key_a], state[key_b] = m.A, m.B
        state.update(merged.full_tensors)
        return state, report, {}
    with AtomicDirectory(out_path, inputs=inputs, force=force, kind="adapter") as tmp:
        hashes = write_lora_adapter(
            tmp, merged.modules, dtype=dtype,
            base_model_name_or_path=first.config.base_model_name_or_path,
            task_type=first.config.task_type, fan_in_fan_out=first.config.fan_in_fan_out,
            full_tensors=merged.full_tensors, modules_to_save=merged.modules_to_save,
            metadata={"mergekit_recipe": json.dumps(recipe, default=str, sort_keys=True)},
            allow_nonfinite=merger.allow_nonfinite, warn=merger.warn,
        )
    return None, report, hashes


def _report_dict(plan: MergePlan, report: StreamReport) -> dict[str, Any]:
    return {
        "merged": report.merged,
        "copied": report.copied,
        "dropped": report.dropped,
        "bytes_written": report.bytes_written,
        "relative_delta_norm": report.relative_delta_norm,
        "nonfinite_written": report.nonfinite,
        "left_out": {t.name: t.reason for t in plan.tensors if t.action == "drop"},
        "copied_why": _count_reasons(plan, "copy"),
        "notes": plan.notes,
    }


def _count_reasons(plan: MergePlan, action: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in plan.by_action(action):
        counts[t.reason] = counts.get(t.reason, 0) + 1
    return counts
