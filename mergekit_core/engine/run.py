"""``run_merge(spec, host) -> MergeResult``: the one entry point for the CLI, sweeps and
optimizers. It orchestrates the rooms of the engine: resolve the components, plan, choose lambda,
prepare, stream and write, and record the run bundle."""

from __future__ import annotations

import resource
import time
import warnings as warnings_module
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mergekit_core.config import MergeSpec
from mergekit_core.engine.allocator import bound_allocator
from mergekit_core.engine.fingerprints import input_hashes
from mergekit_core.engine.lambdas import lambda_values
from mergekit_core.engine.merger import EnginePrepareContext, TensorMerger
from mergekit_core.engine.plan import build_plan
from mergekit_core.engine.resolve import resolve_components, versions
from mergekit_core.engine.write import check_outputs, write_output
from mergekit_core.components import MergeMethod, origin
from mergekit_core.errors import MergekitError, PluginError, UsageError
from mergekit_core.io.destination import AtomicDirectory
from mergekit_core.outputs import new_run_dir, write_json
from mergekit_core.plugins import PluginHost


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


def merged_weights(spec: MergeSpec, host: PluginHost) -> Callable[[dict[str, float]], dict[str, Any]]:
    """``values -> state dict``: the same merge as full weights in memory, for any lambda-policy
    values (what an optimizer evaluates)."""
    as_model = replace(spec, output=replace(spec.output, kind="model"))

    def build(values: dict[str, float]) -> dict[str, Any]:
        return run_merge(as_model, host, in_memory=True, values=values, write_bundle=False).state_dict

    return build


def finish_method(method: MergeMethod, state: Any) -> None:
    """``method.finish(state, None)`` after a successful merge; a plugin's bug becomes a PluginError."""
    try:
        method.finish(state, None)
    except MergekitError:
        raise
    except Exception as exc:
        raise PluginError(f"{method.label} ({origin(method)}) failed while finishing the merge: "
                          f"{type(exc).__name__}: {exc}") from exc


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
    artifacts: Mapping[str, bytes] | None = None,
    optimizer_report: Mapping[str, Any] | None = None,
) -> MergeResult:
    """Plan, choose lambdas, stream the merge, and record it.

    ``in_memory``: return the merged tensors in ``result.state_dict`` and write no model files.
    ``values``: lambda-policy values to use instead of asking the optimizer (sweeps, and
    ``mergekit_core.evaluation.optimize.optimize_and_merge`` for optimizers that score merges).
    ``force``: replace a non-empty ``output.path`` that ``mk`` did not write (never an input).
    ``artifacts``: file name -> bytes written into the run bundle (an optimizer's coefficients);
    ``optimizer_report``: recorded under ``optimizer.report`` in ``merge_metadata.json``.

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
            chosen = dict(values) if values is not None else lambda_values(plan, comps, host, merged_weights(spec, host))
            merger = TensorMerger(plan, comps.method, comps.params, comps.transforms, comps.policy, chosen,
                                  compute_dtype=spec.compute_dtype, allow_nonfinite=allow_nonfinite,
                                  warn=warnings.append)
            if comps.method.needs_prepare:
                merger.state = comps.method.prepare(EnginePrepareContext(merger, host, progress), comps.params)
                merger.prepared = True
            out_path = write_to = spec.output.path
            staging: Path | None = None
            if write_bundle:  # written under a hidden name, published whole when the merge succeeded
                run_dir = new_run_dir(spec.output_dir, comps.method.name, spec.task_combo)
                staging = stack.enter_context(AtomicDirectory(run_dir, kind="run_bundle", what="run bundle"))
            if spec.method.name != comps.method.name:
                warnings.append(f"method {spec.method.name!r} is {comps.method.label} under another name (an alias)")
            if replaced:
                warnings.append(f"--force: replaced {len(replaced)} {'entry' if len(replaced) == 1 else 'entries'} "
                                f"of {out_path} (" + ", ".join(replaced[:5]) + (", ..." if len(replaced) > 5 else "")
                                + ")")
            if save and out_path is None:
                if run_dir is None or staging is None:
                    raise UsageError("nowhere to write the merge: give output.path (--out) or keep the run bundle")
                out_path, write_to = run_dir / plan.output_kind, staging / plan.output_kind
            recipe = {"spec": spec.to_json(), "config": spec.to_config(), "lambda_values": chosen,
                      "versions": versions(host, comps)}

            def finish() -> None:  # before the output is published: a failure here publishes nothing
                if merger.prepared:
                    merger.prepared = False  # a failure from here on is not the method's to clean up
                    finish_method(comps.method, merger.state)

            state_dict, report, hashes = write_output(plan, merger, spec, write_to if save else None, recipe, progress,
                                                      force=force, merged=finish)
            flushed = report.get("flushed_to_zero") or {}
            if flushed:
                worst = max(flushed, key=flushed.get)
                warnings.append(f"{sum(flushed.values())} merged values in {len(flushed)} tensors were too small for "
                                f"the output dtype and were written as 0 (most in {worst}: {flushed[worst]}); "
                                "the report lists them under flushed_to_zero")
            metadata = {
                "method": comps.method.name,
                "params": comps.params,
                "lambda_policy": {"name": comps.policy.name, "params": comps.policy_params},
                "lambda_values": chosen,
                "transforms": [{"name": t.name, "params": p} for t, p in comps.transforms],
                "optimizer": {"name": comps.optimizer.name, "params": comps.optimizer_params,
                              **({"report": dict(optimizer_report)} if optimizer_report else {})},
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
                for name, data in (artifacts or {}).items():
                    (staging / name).write_bytes(data)
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
    except BaseException as exc:
        if merger is not None and merger.prepared:
            try:
                comps.method.finish(merger.state, exc)
            except Exception as cleanup:  # the merge's own error is what the user must see
                warnings_module.warn(f"{comps.method.label} ({origin(comps.method)}): cleaning up after the failed "
                                     f"merge failed too: {type(cleanup).__name__}: {cleanup}", stacklevel=1)
        raise
    finally:
        if merger is not None:
            merger.close()
        plan.close()
