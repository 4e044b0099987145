"""TSV-M, Iso-C and Iso-CTS as merge methods (delta space, one tensor at a time).

This module only declares the components (``mk --help`` and ``mk plugins list`` import it, so no
torch import at module level); the arithmetic is in :mod:`mk_subspace.linalg`. The math, the
sources and where the reference implementations differ: docs/plugins/mk-subspace.md.

Shared conventions:

- ``lambda`` is the papers' scaling factor alpha. The lambda policy turns it into one coefficient
  per source, ``c_t``, applied to each task vector before the SVD (FusionBench's list-valued
  ``alpha``); every method is homogeneous of degree 1, so equal coefficients ``c`` give exactly
  ``c`` times the unscaled merge, the papers' ``theta_0 + alpha * tau_merged``.
- 2-D tensors are merged in their singular-vector subspaces; every other tensor (biases, norms,
  convolution kernels), and 2-D tensors matching ``exclude``, by the mean ``(1/T) sum_t c_t tau_t``,
  as the papers do.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from mergekit_core import MergeMethod, Param, ParameterError, TensorGroup

if TYPE_CHECKING:  # pragma: no cover
    import torch

LAMBDA = Param("lambda", 1.0, "the papers' alpha: scales each task vector before the SVD (per source under a "
               "lambda policy), so a single value scales the merged task vector", type=float)
EXCLUDE = Param("exclude", [], "glob patterns of 2-D tensors merged by the mean instead (the references' "
                "exclude_keys; their CLIP runs exclude '*text_projection*')", type=list)
PRECISION = Param("precision", "float32", "dtype of the SVDs: float32 (as the reference code) or float64",
                  choices=("float32", "float64"))


class _Subspace(MergeMethod):
    """Dispatch shared by the three methods: 2-D tensors to :meth:`merge_matrix`, the rest to the mean."""

    min_sources = 1

    def validate(self, params: dict[str, Any]) -> None:
        if not all(isinstance(p, str) for p in params["exclude"]):
            raise ParameterError(f"{self.label}: exclude must be a list of glob patterns (strings), "
                                 f"got {params['exclude']!r}")

    def merge_matrix(self, tasks: list[torch.Tensor], coefficients: list[float], dtype: torch.dtype,
                     params: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        import torch

        from mk_subspace.linalg import mean

        first = group.tensors[0]
        dtype = torch.float64 if params["precision"] == "float64" else first.dtype
        if first.dim() == 2 and not any(fnmatchcase(group.name, p) for p in params["exclude"]):
            out = self.merge_matrix(group.tensors, group.coefficients, dtype, params)
        else:
            out = mean(group.tensors, group.coefficients, dtype)
        return out.to(first.dtype)


class TsvMerge(_Subspace):
    name = "tsv_m"
    description = ("TSV-M (Gargiulo et al. CVPR 2025): each task's top 1/T singular vectors side by side, "
                   "orthogonalised, with their singular values; the mean for non-2-D tensors.")
    params = (
        LAMBDA,
        Param("small_rank", "mean", "2-D tensors whose rank r is below the number of tasks T (r // T = 0 "
              "vectors per task): their mean (as 1-D tensors), or zero (what the reference code's k = 0 "
              "gives: the tensor keeps its base weight)", choices=("mean", "zero")),
        EXCLUDE, PRECISION,
    )
    # the official code picks alpha on validation in linspace(0, 3, 31); 1.0 is FusionBench's default
    benchmark_grid = {"lambda": [0.6, 1.0, 1.5, 2.0, 2.5, 3.0]}

    def merge_matrix(self, tasks, coefficients, dtype, params):
        from mk_subspace.linalg import tsv_m

        return tsv_m(tasks, coefficients, dtype, params["small_rank"])


class IsoC(_Subspace):
    name = "iso_c"
    description = ("Iso-C (Marczak et al. ICML 2025): the sum of the task matrices with its singular "
                   "values replaced by their mean (a flat spectrum); the mean for non-2-D tensors.")
    params = (LAMBDA, EXCLUDE, PRECISION)
    # the official code picks alpha on validation; FusionBench's default is 1.0, its table uses 1.5
    benchmark_grid = {"lambda": [1.0, 1.5, 2.0, 2.5, 3.0, 4.0]}

    def merge_matrix(self, tasks, coefficients, dtype, params):
        from mk_subspace.linalg import iso_c

        return iso_c(tasks, coefficients, dtype)


class IsoCts(_Subspace):
    name = "iso_cts"
    description = ("Iso-CTS (Marczak et al. ICML 2025): the common subspace of the summed task matrices plus "
                   "each task's own top directions outside it, orthogonalised, with a flat spectrum.")
    params = (
        LAMBDA,
        Param("common_space_fraction", 0.8, "fraction of the rank r = min(m, n) given to the common subspace; "
              "the rest is split equally among the tasks (the reference rounds the split to whole "
              "dimensions per task)", type=float, min=0.0, max=1.0),
        EXCLUDE, PRECISION,
    )
    benchmark_grid = {"lambda": [1.0, 1.5, 2.0, 2.5, 3.0, 4.0]}

    def merge_matrix(self, tasks, coefficients, dtype, params):
        from mk_subspace.linalg import iso_cts

        return iso_cts(tasks, coefficients, dtype, params["common_space_fraction"])


class Knots(_Subspace):
    name = "knots"
    description = ("KnOTS (Stoica et al. ICLR 2025): TIES or DARE-TIES on the tasks' coordinates in the "
                   "shared SVD basis of their concatenated (LoRA) updates; the mean for non-2-D tensors.")
    params = (
        Param("lambda", 0.6, "scale of the merged update (KnOTS-TIES ViT-B/32: 0.6, KnOTS-DARE-TIES: 0.7); "
              "per source, it multiplies the task's kept coordinates after the sign election and before "
              "the disjoint mean, as the official code's weights", type=float),
        Param("k", 20.0, "percent of each task's coordinates kept by magnitude (KnOTS-TIES: 20; "
              "KnOTS-DARE-TIES: 100)", type=float, min=0.0, max=100.0),
        Param("p", 0.0, "DARE drop probability of each coordinate before TIES (0: KnOTS-TIES; "
              "KnOTS-DARE-TIES: 0.1)", type=float, min=0.0, max=1.0),
        Param("trim_scope", "model", "rank each task's coordinates over every tensor (model, the official "
              "code; the coordinates of all tensors are kept in memory) or within each tensor (tensor)",
              choices=("model", "tensor")),
        Param("eps", 1e-5, "basis components with singular value <= eps are dropped (official code 1e-5, "
              "FusionBench 1e-4)", type=float, min=0.0),
        EXCLUDE,
    )
    benchmark_grid = {"k": [10.0, 20.0, 50.0, 100.0], "lambda": [1.0, 1.5, 2.0]}

    @property
    def needs_prepare(self) -> bool:  # type: ignore[override]
        return True

    def validate(self, params: dict[str, Any]) -> None:
        super().validate(params)
        if params["p"] >= 1.0:
            raise ParameterError(f"{self.label}: p = {params['p']} drops every coordinate; use p < 1")

    def _is_matrix(self, group: TensorGroup, params: dict[str, Any]) -> bool:
        return group.tensors[0].dim() == 2 and not any(fnmatchcase(group.name, p) for p in params["exclude"])

    def _aligned(self, group: TensorGroup, params: dict[str, Any]) -> Any:
        from mk_subspace.knots import align, dare

        aligned = align(group.tensors, params["eps"])
        aligned.reps = dare(aligned.reps, params["p"], group.seed)
        return aligned

    def prepare(self, context: Any, params: dict[str, Any]) -> Any:
        from mk_subspace.knots import KnotsState, top_masks

        state = KnotsState()
        for group in context.groups():
            if self._is_matrix(group, params):
                state.aligned[group.name] = self._aligned(group, params)
        fraction = params["k"] / 100.0
        names = list(state.aligned)
        if params["trim_scope"] == "model" and names:
            tasks = len(state.aligned[names[0]].reps)
            per_task = [top_masks([state.aligned[n].reps[t] for n in names], fraction) for t in range(tasks)]
            state.keep = {n: [per_task[t][i] for t in range(tasks)] for i, n in enumerate(names)}
        else:
            state.keep = {n: [top_masks([r], fraction)[0] for r in state.aligned[n].reps] for n in names}
        return state

    def merge_matrix(self, tasks, coefficients, dtype, params):  # pragma: no cover - merge() handles matrices
        raise NotImplementedError

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        from mk_subspace.knots import ties, top_masks
        from mk_subspace.linalg import mean

        first = group.tensors[0]
        if not self._is_matrix(group, params):
            return mean(group.tensors, group.coefficients, first.dtype)
        aligned = getattr(state, "aligned", {}).get(group.name)
        if aligned is None:  # not seen by prepare: this tensor alone
            aligned = self._aligned(group, params)
            keep = [top_masks([r], params["k"] / 100.0)[0] for r in aligned.reps]
        else:
            keep = state.keep[group.name]
        if aligned.basis.shape[1] == 0:
            return first.new_zeros(first.shape)
        return (aligned.basis @ ties(aligned.reps, keep, group.coefficients)).to(first.dtype)


METHODS = [TsvMerge(), IsoC(), IsoCts(), Knots()]
