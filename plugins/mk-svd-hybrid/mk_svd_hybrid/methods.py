"""The ``svd_hybrid`` merge method (declaration and glue; the work is in pipeline/codec)."""

from __future__ import annotations

from typing import Any

from mergekit_core import MergeMethod, Param, ParameterError, PrepareContext, TensorGroup

PARAMS = (
    Param("lambda", 1.0, help="scale of the weighted average of task vectors (1 = weighted average)", type=float),
    Param("weighting", "uniform", help="task weights: uniform, performance (softmax of accuracies) or cluster",
          choices=("uniform", "performance", "cluster")),
    Param("accuracies", None, help="weighting=performance: {task: accuracy}, a list in source order, or "
          "'evaluate' (score each source with the config's evaluator)", type=(dict, list, str)),
    Param("temperature", 0.1, help="weighting=performance: softmax temperature (accuracies in 0..1)",
          type=float, min=1e-6),
    Param("n_clusters", 2, help="weighting=cluster: number of task clusters (one basis each)", type=int, min=1),
    Param("cluster_method", "kmeans", help="weighting=cluster: kmeans or hierarchical (average linkage)",
          choices=("kmeans", "hierarchical")),
    Param("mask", "tall", help="tall: TALL masks split signal from noise; none: everything is signal",
          choices=("tall", "none")),
    Param("mask_lambda", 0.4, help="TALL mask threshold lambda_t (one value, or a list in source order)",
          type=(float, list)),
    Param("mask_strategy", "union", help="combine task masks by union, intersection or majority",
          choices=("union", "intersection", "majority")),
    Param("mask_file", None, help="load the task masks from an artifact directory or a safetensors file "
          "(tensor name -> uint8 [tasks, packed bits])", type=str),
    Param("keep_task_masks", True, help="store every task's mask (1 bit per entry per task)", type=bool),
    Param("energy", 0.9, help="fraction of the squared singular values the shared basis keeps",
          type=float, min=0.0, max=1.0),
    Param("fp16_energy", 0.5, help="leading components holding this energy fraction keep fp16 coefficients; "
          "the rest are quantized", type=float, min=0.0, max=1.0),
    Param("max_rank", 0, help="cap on the basis rank (0: no cap)", type=int, min=0),
    Param("svd", "exact", help="exact (Gram eigendecomposition) or randomized (torch.svd_lowrank)",
          choices=("exact", "randomized")),
    Param("oversample_rank", 128, help="svd=randomized: components computed", type=int, min=1),
    Param("svd_niter", 2, help="svd=randomized: power iterations", type=int, min=0),
    Param("quant", "rtvq", help="quantization of the low-energy coefficients: rtvq (shared base + task "
          "offsets) or residual (each task alone)", choices=("rtvq", "residual")),
    Param("base_bits", 3, help="rtvq: bits of the shared base", type=int, min=2, max=8),
    Param("offset_bits", 2, help="rtvq: bits of each task's offset", type=int, min=2, max=8),
    Param("bits", 4, help="quant=residual: bits per stage", type=int, min=2, max=8),
    Param("stages", 2, help="residual refinement stages (rtvq: of the offsets)", type=int, min=1, max=8),
    Param("noise", "rtvq", help="the noise region (outside the combined mask): rtvq, mean (fp16) or drop",
          choices=("rtvq", "mean", "drop")),
    Param("signal_weight", 1.0, help="scale of the signal region in the merge", type=float),
    Param("noise_weight", 1.0, help="scale of the noise region in the merge", type=float),
    Param("artifact_dir", None, help="also keep the artifact here (reconstruct it later without the sources)",
          type=str),
    Param("shard_mb", 1024, help="artifact shard size in MiB", type=int, min=1),
    Param("block_mb", 256, help="working memory of one column block while a tensor is encoded, in MiB "
          "(beyond its task vectors and its record)", type=float, min=1.0),
)


class SvdHybrid(MergeMethod):
    name = "svd_hybrid"
    description = ("TALL masks + one shared SVD basis per tensor (per task cluster), fp16 and RTVQ-quantized "
                   "coefficients; a weighted average of the rebuilt task vectors, with a reusable artifact.")
    params = PARAMS
    needs_prepare = True
    # lambda scales the weighted average of the task vectors: 8 digit tasks x task arithmetic's 0.2-0.5
    benchmark_grid = {"lambda": [1.6, 2.0, 2.4, 2.8, 3.2, 4.0]}
    min_sources = 1

    def validate(self, params: dict[str, Any]) -> None:
        if params["fp16_energy"] > params["energy"]:
            params["fp16_energy"] = params["energy"]
        if params["weighting"] == "cluster" and params["n_clusters"] < 2:
            raise ParameterError("merge method 'svd_hybrid': weighting cluster needs n_clusters >= 2")
        acc = params["accuracies"]
        if isinstance(acc, str) and acc != "evaluate":
            raise ParameterError("merge method 'svd_hybrid': accuracies must be a mapping, a list or 'evaluate'")
        lam = params["mask_lambda"]
        if isinstance(lam, list) and not all(isinstance(x, (int, float)) for x in lam):
            raise ParameterError("merge method 'svd_hybrid': mask_lambda must be a number or a list of numbers")

    def prepare(self, context: PrepareContext, params: dict[str, Any]) -> Any:
        """Decide the task weights (cluster weighting: one read of the sources for their Gram
        matrix) and open the artifact when ``artifact_dir`` is set; ``merge`` then encodes each
        tensor as the engine hands it over, so the merge reads the sources once."""
        from mk_svd_hybrid.session import open_merge_session

        return open_merge_session(context, params)

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> Any:
        return state.merged_delta(group)

    def finish(self, state: Any, error: BaseException | None) -> None:
        """Commit the artifact (``artifact_dir``) after a complete merge; remove it after a failure."""
        state.finish(error)


METHODS = [SvdHybrid()]
