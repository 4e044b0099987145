"""The `adamerging` optimizer component: its parameters and checks (no torch at import; the work
is in ``mk_adamerging.train``)."""

from __future__ import annotations

from typing import Any

from mergekit_core import ConfigError, Optimizer, OptimizerContext, Param, ParameterError

GRANULARITY_POLICY = {"task": "per_task", "block": "per_task_layer", "layer": "per_tensor"}
"""Which lambda policy expresses the learned values, so a later merge can reuse them."""

PLUS_REPLACES = ("task_arithmetic", "task_vector", "weighted_delta", "ties")
"""The methods a config may name with ``plus: true`` (the merge becomes ``ties``)."""


class AdaMerging(Optimizer):
    name = "adamerging"
    description = ("AdaMerging (Yang et al. 2024): learn task-, block- or layer-wise coefficients of a linear "
                   "merge by minimising prediction entropy (or cross-entropy on labels).")
    params = (
        Param("granularity", "layer", "task: one lambda per task; block: per task and layer index; layer: per "
              "task and parameter tensor (the paper's layer-wise)", choices=("task", "block", "layer")),
        Param("objective", "entropy", "entropy: of the predictions on unlabeled batches (the paper); "
              "cross_entropy: on labelled batches", choices=("entropy", "cross_entropy")),
        Param("split", None, "split the batches come from; default test for entropy (the paper's test-time "
              "adaptation), validation for cross_entropy", type=str),
        Param("shots", None, "use only the first N examples of each task's split (few-shot labels)", type=int, min=1),
        Param("tasks", None, "tasks to adapt on; default the config's eval_tasks", type=list),
        Param("init", 0.3, "initial value of every lambda (official code and FusionBench: 0.3)", type=float),
        Param("lr", 1e-3, "Adam learning rate", type=float, min=0.0),
        Param("steps", 500, "optimizer steps (official: 500; FusionBench: 1000)", type=int, min=0),
        Param("batch_size", 16, "examples per batch", type=int, min=1),
        Param("batches_per_step", 2, "batches per task per step (official: 2; FusionBench: 1)", type=int, min=1),
        Param("clamp", True, "clamp lambdas to [0, 1] in the forward (the paper's behaviour)", type=bool),
        Param("normalize", False, "softmax over tasks for each lambda group (FusionBench's "
              "normalized_merging_weights)", type=bool),
        Param("seed", None, "seed of the batch sampling; default the merge's seed", type=int),
        Param("plus", False, "AdaMerging++: learn coefficients of the TIES-processed task vectors", type=bool),
        Param("plus_k", 20.0, "AdaMerging++: percent of each task vector kept (official: 20)", type=float,
              min=0.0, max=100.0),
        Param("plus_trim_scope", "model", "AdaMerging++: rank magnitudes over the whole task vector (model, the "
              "official code) or per tensor", choices=("model", "tensor")),
        Param("weights", None, "skip adaptation: merge with the coefficients saved in a previous run's "
              "adamerging_values.json", type=str),
        Param("merge_impl", "streaming_parametrize", "streaming_parametrize: each merged tensor built in one fused "
              "autograd op that saves nothing for backward; functional_clone_legacy: FusionBench's expression",
              choices=("streaming_parametrize", "functional_clone_legacy")),
        Param("device", "auto", "where the merged model runs: auto (cuda when available), cpu, cuda",
              choices=("auto", "cpu", "cuda")),
        Param("force_cpu", False, "run on the CPU even when a GPU is available", type=bool),
        Param("dtype_compute", "auto", "dtype of the merged weights in the forward: auto (bf16 on a GPU that "
              "has it, else fp32), bf16, fp16, fp32", choices=("auto", "bf16", "fp16", "fp32")),
        Param("delta_residency", "cpu_stream", "cpu_stream: task vectors stay in host memory in the checkpoint's "
              "dtype and move to the device per tensor; gpu_cache: all on the device in the compute dtype",
              choices=("cpu_stream", "gpu_cache")),
        Param("factored", True, "keep LoRA task vectors factored (B, A) instead of dense", type=bool),
    )

    benchmark_runs = {
        "layer-wise, entropy": {"granularity": "layer", "objective": "entropy"},
        "layer-wise, cross_entropy": {"granularity": "layer", "objective": "cross_entropy"},
    }

    def validate(self, params: dict[str, Any]) -> None:
        if params["split"] is not None and not isinstance(params["split"], str):
            raise ParameterError(f"{self.label}: 'split' must be a split name such as validation or test")
        if params["tasks"] is not None and not params["tasks"]:
            raise ParameterError(f"{self.label}: 'tasks' is empty; name the tasks to adapt on, or leave it out "
                                 "to use the config's eval_tasks")
        for task in params["tasks"] or []:
            if not isinstance(task, str):
                raise ParameterError(f"{self.label}: 'tasks' must be a list of task names, got {task!r}")

    def lambda_policy(self, params: dict[str, Any]) -> str:
        return GRANULARITY_POLICY[params["granularity"]]

    def merge_method(self, params: dict[str, Any], configured: str) -> tuple[str, dict[str, Any]] | None:
        """AdaMerging++ merges with TIES' per-task vectors: ``ties`` with the sum of the agreeing
        entries weighted by the learned coefficients (``aggregate: sum``), which is
        ``theta_0 + sum_t lambda_t ties_split(tau)_t``, what the coefficients were learned for."""
        if not params["plus"]:
            return None
        if configured not in PLUS_REPLACES:
            raise ConfigError(f"adamerging plus: true merges with TIES' per-task vectors (method ties, aggregate "
                              f"sum); method {configured} cannot be that merge",
                              hint="use method: task_arithmetic (mk then merges with ties)")
        return "ties", {"k": params["plus_k"], "trim_scope": params["plus_trim_scope"], "aggregate": "sum",
                        "sign_method": "mass", "sign_tie": "majority", "scale": 1.0}

    def check(self, context: OptimizerContext, params: dict[str, Any]) -> None:
        from mk_adamerging.train import preflight

        preflight(context, params)

    def optimize(self, context: OptimizerContext, params: dict[str, Any]) -> dict[str, float]:
        from mk_adamerging.train import adamerge

        return adamerge(context, params)
