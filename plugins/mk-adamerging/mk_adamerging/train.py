"""AdaMerging's adaptation loop (Yang et al., ICLR 2024; official code
``src/main_layer_wise_adamerging.py``, FusionBench ``layer_wise_adamerging.py``).

Memory: AdaMerging needs every task vector at every step, so they are all held (in host memory
in the checkpoint's dtype with ``cpu_stream``, on the device with ``gpu_cache``; LoRA ones as
factors), plus the merged weights of one forward and their gradients. The evaluator's ``forward``
takes a whole state dict, so one merged copy of the model exists during a step in both
``merge_impl`` modes.
"""

from __future__ import annotations

import difflib
import math
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mergekit_core import (
    ConfigError,
    Evaluator,
    MergeError,
    MergekitError,
    OptimizerContext,
    PluginError,
    TensorGroup,
)
from mergekit_core.api import LowRankDelta, open_task_vectors, torch_dtype
from mk_adamerging.coefficients import Entry, effective, merged_state
from mk_adamerging.objective import TaskData, collect, cross_entropy, draw, entropy
from mk_adamerging.optimizer import GRANULARITY_POLICY
from mk_adamerging.values_file import read_values, table_bytes, values_bytes

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def choose_device(params: dict[str, Any]) -> torch.device:
    """Raises: ConfigError: ``device: cuda`` without a usable GPU."""
    if params["force_cpu"] or params["device"] == "cpu":
        return torch.device("cpu")
    if params["device"] == "cuda" and not torch.cuda.is_available():
        raise ConfigError("adamerging: device: cuda, but torch sees no GPU; use device: auto or cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def choose_dtype(params: dict[str, Any], device: torch.device) -> torch.dtype:
    if params["dtype_compute"] != "auto":
        return DTYPES[params["dtype_compute"]]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def check_method(context: OptimizerContext) -> None:
    """AdaMerging learns ``c_t`` of ``theta_0 + sum_t c_t tau_t``: the method must be linear in
    delta space with its coefficients exactly the policy's values (task_arithmetic,
    weighted_delta).

    Raises:
        ConfigError: naming the method and what to use instead.
    """
    method = context.plan.method
    params = method.resolve_params(context.spec.method.params)
    if method.name == "ties" and context.spec.optimizer.params.get("plus"):
        return  # AdaMerging++: the optimizer set this merge (AdaMerging.merge_method)
    ok = method.linear and method.space == "delta"
    if ok:
        n = len(context.plan.sources)
        probe = [0.25 + 0.125 * i for i in range(n)]
        group = TensorGroup("probe", None, None, [], probe, [s.name for s in context.plan.sources])
        try:
            ok = [float(c) for c in method.linear_coefficients(group, params)] == probe
        except MergekitError:
            ok = False
    if not ok:
        raise ConfigError(f"adamerging learns the coefficients of task vectors, theta_0 + sum_t lambda_t tau_t; "
                          f"method {method.name} is not that merge",
                          hint="use method: task_arithmetic or weighted_delta")


def check_evaluator(evaluator: Evaluator, objective: str) -> None:
    """Raises: ConfigError: naming the evaluator and the method it lacks."""
    needed = ["forward", "unlabeled_batches" if objective == "entropy" else "labelled_batches"]
    for fn in needed:
        if getattr(type(evaluator), fn) is getattr(Evaluator, fn):
            other = {"unlabeled_batches": "cross_entropy", "labelled_batches": "entropy"}.get(fn)
            raise ConfigError(f"adamerging with objective {objective} needs evaluator {evaluator.name} to implement "
                              f"{fn}(), and it does not",
                              hint="choose an evaluator that gives batches and a differentiable forward "
                                   "(digits does)" + (f", or objective: {other}" if other else ""))


def groups_of(names: list[str], layers: dict[str, int | None], granularity: str) -> tuple[list[int], list[str]]:
    """Column of the lambda matrix for each tensor, and a label per column."""
    if granularity == "task":
        return [0] * len(names), ["all"]
    if granularity == "layer":
        return list(range(len(names))), list(names)
    ordered = sorted({layers[n] for n in names if layers[n] is not None})
    column = {layer: 1 + i for i, layer in enumerate(ordered)}
    return [column.get(layers[n], 0) for n in names], ["no layer"] + [f"layer {i}" for i in ordered]


def values_of(eff: torch.Tensor, granularity: str, names: list[str], labels: list[str]) -> dict[str, float]:
    """The lambda policy's values for the effective coefficients ``eff`` (T, G)."""
    rows = eff.detach().float().cpu().tolist()
    out: dict[str, float] = {}
    for t, row in enumerate(rows):
        if granularity == "task":
            out[f"task.{t}"] = row[0]
        elif granularity == "layer":
            out.update({f"task.{t}.tensor.{n}": v for n, v in zip(names, row)})
        else:
            out[f"task.{t}"] = row[0]
            out.update({f"task.{t}.{label.replace(' ', '.')}": v for label, v in zip(labels[1:], row[1:])})
    return out


@dataclass
class Problem:
    """Everything one step needs: the task vectors, the fixed tensors, the data, the evaluator."""

    entries: list[Entry]
    fixed: dict[str, torch.Tensor]
    data: list[TaskData]
    evaluator: Evaluator
    evaluator_params: dict[str, Any]
    objective: str
    impl: str
    device: torch.device
    dtype: torch.dtype
    clamp: bool = True
    normalize: bool = False
    losses: list[float] = field(default_factory=list)

    def _forward(self, state: dict[str, torch.Tensor], task: str, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.evaluator.forward(state, task, x.to(self.device), self.evaluator_params)
        except MergekitError:
            raise
        except Exception as exc:
            raise PluginError(f"evaluator {self.evaluator.name}: forward failed on task {task}: "
                              f"{type(exc).__name__}: {exc}") from exc

    def task_loss(self, state: dict[str, torch.Tensor], data: TaskData,
                  batches: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for x, y in batches:
            logits = self._forward(state, data.task, x)
            total = total + (entropy(logits) if self.objective == "entropy" else cross_entropy(logits, y))
        return total

    def loss_and_grad(self, lam: torch.Tensor, batches: list[list[tuple[torch.Tensor, torch.Tensor | None]]]
                      ) -> tuple[float, list[float]]:
        """The step's summed loss and fill ``lam.grad``; returns (loss, per-task losses)."""
        eff = effective(lam, self.clamp, self.normalize)
        merged = merged_state(eff, self.entries, self.impl, self.device, self.dtype)
        per_task = []
        if self.impl == "streaming_parametrize":  # one task's activations at a time, one merge backward
            leaves = {k: m.detach().requires_grad_() for k, m in merged.items()}
            state = {**self.fixed, **leaves}
            for data, drawn in zip(self.data, batches):
                loss = self.task_loss(state, data, drawn)
                if loss.requires_grad:
                    loss.backward()
                per_task.append(loss.item())
            used = [k for k in merged if leaves[k].grad is not None and merged[k].requires_grad]
            if used:
                torch.autograd.backward([merged[k] for k in used], [leaves[k].grad for k in used])
        else:  # the official code: the losses summed over tasks, one backward
            state = {**self.fixed, **merged}
            losses = [self.task_loss(state, data, drawn) for data, drawn in zip(self.data, batches)]
            total = torch.stack(losses).sum()
            if total.requires_grad:
                total.backward()
            per_task = [v.item() for v in losses]
        return sum(per_task), per_task


def _task_data(context: OptimizerContext, params: dict[str, Any], tasks: list[str]) -> list[TaskData]:
    setup = context.setup
    labelled = params["objective"] == "cross_entropy"
    split = params["split"] or ("validation" if labelled else "test")
    fn = "labelled_batches" if labelled else "unlabeled_batches"
    out = []
    for task in tasks:
        batches = getattr(setup.evaluator, fn)(task, split, setup.params)
        out.append(collect(task, batches, labelled, params["shots"], f"evaluator {setup.evaluator.name}"))
    return out


def _entries(tv: Any, params: dict[str, Any], columns: list[int], device: torch.device, dtype: torch.dtype
             ) -> list[Entry]:
    factored = params["factored"] and not params["plus"]
    entries = []
    for name, column in zip(tv.names, columns):
        vec = tv.load(name, factored=factored)
        entries.append(Entry(name, column, vec.base, list(vec.deltas)))
    if params["plus"]:
        import mk_ties

        trim = None
        if params["plus_trim_scope"] == "model":
            trim = mk_ties.model_trim(lambda: ((e.name, e.deltas) for e in entries), params["plus_k"])
        for e in entries:
            e.deltas = mk_ties.ties_split(e.name, e.deltas, params["plus_k"], trim)
    for e in entries:  # where the task vectors live from now on
        if params["delta_residency"] == "gpu_cache":
            keep_device, keep_dtype = device, dtype
        else:
            stored = torch_dtype(tv.dtypes[e.name])
            keep_device, keep_dtype = torch.device("cpu"), stored if stored in (torch.bfloat16, torch.float16) \
                else torch.float32
        e.base = e.base.to(keep_device, keep_dtype)
        e.deltas = [LowRankDelta(d.B.to(keep_device, keep_dtype), d.A.to(keep_device, keep_dtype), d.scale,
                                 d.transpose, d.shape) if isinstance(d, LowRankDelta) else d.to(keep_device, keep_dtype)
                    for d in e.deltas]
    return entries


def nonfinite_source(entries: list[Entry], sources: list[str]) -> str | None:
    """'tensor X of source Y (or the base) holds NaN or Inf', for the first such tensor; None if all
    are finite."""
    for e in entries:
        if not bool(torch.isfinite(e.base).all()):
            return f"tensor {e.name} of the base model holds NaN or Inf"
        for name, d in zip(sources, e.deltas):
            parts = (d.B, d.A) if isinstance(d, LowRankDelta) else (d,)
            if not all(bool(torch.isfinite(x).all()) for x in parts):
                return f"tensor {e.name} of source {name} holds NaN or Inf"
    return None


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def preflight(context: OptimizerContext, params: dict[str, Any]) -> None:
    """Every check that needs no tensor and no training: the context, the lambda policy, the base,
    the method, a ``weights`` file, or the evaluator, its methods, the tasks and the split (what
    ``mk merge --dry-run`` runs).

    Raises:
        ConfigError: naming the key and what to do.
        PluginError: called without the context ``mk merge`` builds.
    """
    if context.spec is None or context.host is None:
        raise PluginError("adamerging needs the optimizer context of mk merge "
                          "(mergekit_core.api.optimize_and_merge), not the engine's")
    granularity = params["granularity"]
    if context.policy.name != GRANULARITY_POLICY[granularity]:
        raise ConfigError(f"adamerging granularity {granularity} learns lambda policy "
                          f"{GRANULARITY_POLICY[granularity]}, the merge uses {context.policy.name}")
    if context.spec.base_model is None:
        raise ConfigError("adamerging learns coefficients of task vectors: give base_model")
    check_method(context)
    merged = context.plan.by_action("merge")
    if params["weights"] is not None:
        read_values(params["weights"], granularity, [s.name for s in context.plan.sources], [t.name for t in merged])
        return
    setup = context.setup
    if setup is None and context.spec.sweep.get("evaluator"):
        raise PluginError("adamerging was called without the evaluation the config names: run the merge with "
                          "mk merge or mergekit_core.api.optimize_and_merge, not run_merge alone")
    if setup is None:
        raise ConfigError("adamerging adapts the coefficients on an evaluator's data: name one in the config "
                          "(evaluator: NAME, evaluator_params, eval_tasks)",
                          hint="for the digits pool: evaluator: digits, evaluator_params: {pool: PATH}")
    check_evaluator(setup.evaluator, params["objective"])
    known = [t.name for t in setup.evaluator.tasks(setup.params)]
    for task in params["tasks"] or []:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=1)
            raise ConfigError(f"adamerging: unknown task {task!r} for evaluator {setup.evaluator.name}"
                              + (f" (did you mean {close[0]!r}?)" if close else "") + "; its tasks: "
                              + ", ".join(known))
    split = params["split"] or ("validation" if params["objective"] == "cross_entropy" else "test")
    if split not in setup.evaluator.splits:
        raise ConfigError(f"adamerging: unknown split {split!r} for evaluator {setup.evaluator.name}; its splits: "
                          + ", ".join(setup.evaluator.splits))
    choose_device(params)


def adamerge(context: OptimizerContext, params: dict[str, Any]) -> dict[str, float]:
    """Learn the coefficients; return the lambda policy's values (``GRANULARITY_POLICY``), and put
    the values, the per-tensor table and the loss curve into ``context.artifacts``.

    Raises:
        ConfigError: what ``preflight`` refuses.
        MergeError: the loss is NaN or infinite (naming the step, and the source when a task
            vector holds non-finite values).

    ``preflight`` has run (``AdaMerging.check``, called before ``optimize``).
    """
    plan = context.plan
    granularity = params["granularity"]
    sources = [s.name for s in plan.sources]
    merged = plan.by_action("merge")
    names = [t.name for t in merged]
    layers = {t.name: t.layer for t in merged}
    if params["weights"] is not None:
        values = read_values(params["weights"], granularity, sources, names)
        tasks: list[str] = []
        report: dict[str, Any] = {"summary": f"coefficients from {params['weights']} (no adaptation)",
                                  "weights": str(params["weights"])}
    else:
        values, tasks, report = _learn(context, params, names, layers)
    if params["plus"]:
        report["summary"] += (f"; AdaMerging++: merged by ties (k {params['plus_k']:g}, "
                              f"trim_scope {params['plus_trim_scope']}, aggregate sum) with these coefficients")
    context.artifacts["adamerging_values.json"] = values_bytes(values, granularity, sources, names, tasks)
    context.artifacts["lambdas.json"] = table_bytes(values, context.policy.resolve, sources, layers)
    context.report.update(report)
    return values


def setup_problem(context: OptimizerContext, params: dict[str, Any], names: list[str],
                  layers: dict[str, int | None]) -> tuple[Problem | None, torch.Tensor, list[str], list[str]]:
    """What adaptation needs, once ``preflight`` has passed: the problem (None with ``steps: 0``,
    which reads nothing), the coefficient matrix ``lam`` (T, G) at its initial value, the column
    labels and the tasks."""
    setup = context.setup
    tasks = list(params["tasks"] or [t.name for t in setup.tasks])
    columns, labels = groups_of(names, layers, params["granularity"])
    device = choose_device(params)
    dtype = choose_dtype(params, device)
    lam = torch.full((len(context.plan.sources), len(labels)), float(params["init"]), dtype=torch.float32,
                     device=device, requires_grad=True)
    if params["steps"] == 0:
        return None, lam, labels, tasks
    data = _task_data(context, params, tasks)
    with open_task_vectors(context.spec, context.host) as tv:
        if tv.names != names:
            raise MergeError("adamerging: the task vectors do not match the merge plan")  # the core's contract
        entries = _entries(tv, params, columns, device, dtype)
        fixed = {k: v.to(device, dtype) for k, v in tv.fixed().items()}
    problem = Problem(entries, fixed, data, setup.evaluator, setup.params, params["objective"], params["merge_impl"],
                      device, dtype, params["clamp"], params["normalize"])
    return problem, lam, labels, tasks


def _learn(context: OptimizerContext, params: dict[str, Any], names: list[str], layers: dict[str, int | None]
           ) -> tuple[dict[str, float], list[str], dict[str, Any]]:
    granularity = params["granularity"]
    problem, lam, labels, tasks = setup_problem(context, params, names, layers)
    report: dict[str, Any] = {"granularity": granularity, "objective": params["objective"], "tasks": tasks,
                              "coefficients": lam.numel(), "device": str(lam.device), "steps": params["steps"]}
    if problem is None:  # nothing to adapt: the initial values
        report["summary"] = f"0 steps: every lambda at its initial value {params['init']:g}"
        return values_of(effective(lam, params["clamp"], params["normalize"]), granularity, names, labels), tasks, report
    report["dtype"] = str(problem.dtype).split(".")[-1]
    data, entries = problem.data, problem.entries
    seed = context.spec.seed if params["seed"] is None else params["seed"]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([lam], lr=params["lr"], betas=(0.9, 0.999), weight_decay=0.0)
    progress = context.progress
    if progress is not None:
        progress("start", total=params["steps"], label="adamerging")
    curve: list[dict[str, Any]] = []
    started = time.perf_counter()
    for step in range(1, params["steps"] + 1):
        batches = [draw(d, params["batch_size"], params["batches_per_step"], generator) for d in data]
        optimizer.zero_grad(set_to_none=True)
        loss, per_task = problem.loss_and_grad(lam, batches)
        if not math.isfinite(loss):
            culprit = nonfinite_source(entries, [s.name for s in context.plan.sources])
            if culprit is not None:
                raise MergeError(f"adamerging: the loss is {loss} at step {step}: {culprit}; nothing was written",
                                 hint="check that source (a plain merge refuses it too)")
            bad = [t for t, v in zip(tasks, per_task) if not math.isfinite(v)]
            raise MergeError(f"adamerging: the loss is {loss} at step {step} (task {', '.join(bad) or '?'}); "
                             "nothing was written",
                             hint="lower lr, use dtype_compute: fp32, or check the evaluator's forward")
        optimizer.step()
        curve.append({"step": step, "loss": loss, "tasks": dict(zip(tasks, per_task))})
        if progress is not None:
            progress("step", step=step, loss=loss)
    elapsed = time.perf_counter() - started
    if progress is not None:
        progress("end")
    eff = effective(lam, params["clamp"], params["normalize"])
    values = values_of(eff, granularity, names, labels)
    means = eff.detach().float().mean(1).tolist()
    report.update({
        "summary": (f"{params['steps']} steps, {params['objective']} {curve[0]['loss']:.4f} -> {curve[-1]['loss']:.4f}, "
                    f"{params['steps'] / elapsed:.1f} steps/s; mean lambda per source "
                    + ", ".join(f"{s.name} {m:.3f}" for s, m in zip(context.plan.sources, means))),
        "loss_first": curve[0]["loss"], "loss_last": curve[-1]["loss"],
        "steps_per_second": params["steps"] / elapsed, "seconds": elapsed,
        "peak_memory_mb": round(_peak_mb(problem.device), 1),
        "task_vector_mb": round(sum(e.nbytes() for e in entries) / 2**20, 2),
        "mean_lambda": {s.name: m for s, m in zip(context.plan.sources, means)},
    })
    context.artifacts["adamerging_loss.json"] = _json_bytes({"tasks": tasks, "objective": params["objective"],
                                                              "curve": curve})
    png = loss_png(curve, params["objective"])
    if png is not None:
        context.artifacts["adamerging_loss.png"] = png
    return values, tasks, report


def _json_bytes(data: Any) -> bytes:
    import json

    return (json.dumps(data, indent=1) + "\n").encode()


def loss_png(curve: list[dict[str, Any]], objective: str) -> bytes | None:
    """The loss per step as a PNG (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import io

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{objective} (sum over tasks)")
    ax.set_title("AdaMerging")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
