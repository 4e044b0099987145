"""TIES, DARE and Model Breadcrumbs merge methods (delta space).

Shared conventions (see docs/methods-ties.md for the math and where the references disagree):

- the per-source coefficients ``c_t`` come from the lambda policy (the method's ``lambda`` is the
  policy's default value), and are applied after the sign election and before the disjoint mean,
  as PEFT does; with equal coefficients this is ``lambda * disjoint_mean``, the paper's formula;
- exact selections: exactly ``int(fraction * n)`` entries are kept, ties broken by index.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mergekit_core import MergeMethod, Param, ParameterError, PrepareContext, TensorGroup

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from mk_ties.global_trim import GlobalTrim

# This module only declares components: it must not import torch (mk --help and mk plugins list
# load it). The arithmetic lives in kernels.py, select.py and global_trim.py.

LAMBDA = Param("lambda", 1.0, "scale of the merged task vector; the lambda policy's default value", type=float)
SIGN_METHOD = Param("sign_method", "mass", "sign election: mass (sign of the sum) or count (of the signs)",
                    choices=("mass", "count"))
SIGN_TIE = Param("sign_tie", "majority",
                 "entries whose elected sign is 0: majority (sign of the tensor's summed signs, as the "
                 "paper's code), positive (+1, as PEFT and mergekit), or zero (dropped)",
                 choices=("majority", "positive", "zero"))
AGGREGATE = Param("aggregate", "mean", "combine agreeing entries by their mean (paper) or sum (FusionBench)",
                  choices=("mean", "sum"))


class Ties(MergeMethod):
    name = "ties"
    description = "TIES-Merging (Yadav et al. 2023): trim to the top k%, elect signs, disjoint mean."
    params = (
        Param("k", 20.0, "percent of each task vector kept by magnitude", type=float, min=0.0, max=100.0),
        Param("trim_scope", "model", "rank magnitudes over the whole task vector (model, as the paper's "
              "code; a prepare pass) or within each tensor (tensor, as mergekit and PEFT)",
              choices=("model", "tensor")),
        SIGN_METHOD, SIGN_TIE, AGGREGATE, LAMBDA,
    )

    @property
    def needs_prepare(self) -> bool:  # type: ignore[override]
        return True

    def prepare(self, context: PrepareContext, params: dict[str, Any]) -> GlobalTrim | None:
        if params["trim_scope"] != "model":
            return None
        from mk_ties.global_trim import global_trim

        return global_trim(context, params["k"])

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        from mk_ties.kernels import elect_and_merge
        from mk_ties.select import keep_count, top_mask

        flats = [x.reshape(-1) for x in group.tensors]
        masks = []
        for i, f in enumerate(flats):
            a = f.abs()
            if params["trim_scope"] == "model" and state is not None:
                masks.append(state.mask(i, group.name, a))
            else:
                masks.append(top_mask(a, keep_count(params["k"] / 100.0, a.numel())))
            del a
        out = elect_and_merge(flats, group.coefficients, params, masks)
        return out.reshape(group.tensors[0].shape)


DARE_P = Param("p", 0.5, "drop probability of each delta entry (0 <= p < 1)", type=float, min=0.0, max=1.0)
DARE_RESCALE = Param("rescale", "inverse", "rescale survivors by 1/(1-p) (inverse, the paper's) or to the "
                     "tensor's L1 norm (l1, current mergekit), or not at all (none)",
                     choices=("inverse", "l1", "none"))


class _DareMixin:
    def validate(self, params: dict[str, Any]) -> None:
        if params["p"] >= 1.0:
            raise ParameterError(f"{self.label}: p = {params['p']} drops every entry; use p < 1")  # type: ignore[attr-defined]

    def dropped(self, group: TensorGroup, params: dict[str, Any]) -> list[torch.Tensor]:
        import torch

        from mk_ties.kernels import dare

        return [dare(x, params["p"], params["rescale"], torch.Generator().manual_seed(group.seed + i))
                for i, x in enumerate(group.tensors)]


class DareLinear(_DareMixin, MergeMethod):
    name = "dare_linear"
    description = "DARE (Yu et al. 2024): random drop and rescale, then sum_t c_t * delta_t."
    params = (DARE_P, DARE_RESCALE, LAMBDA)

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        from mk_ties.kernels import weighted_sum

        return weighted_sum(self.dropped(group, params), group.coefficients)


class DareTies(_DareMixin, MergeMethod):
    name = "dare_ties"
    description = "DARE then TIES' sign election and disjoint mean (no second trim)."
    params = (DARE_P, DARE_RESCALE, SIGN_METHOD, SIGN_TIE, AGGREGATE, LAMBDA)

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        from mk_ties.kernels import elect_and_merge

        flats = [x.reshape(-1) for x in self.dropped(group, params)]
        return elect_and_merge(flats, group.coefficients, params).reshape(group.tensors[0].shape)


BETA = Param("beta", 0.01, "fraction of the largest magnitudes dropped in each tensor", type=float,
             min=0.0, max=1.0)
GAMMA = Param("gamma", 0.89, "fraction of the smallest magnitudes dropped in each tensor", type=float,
              min=0.0, max=1.0)


class _BreadcrumbsMixin:
    def validate(self, params: dict[str, Any]) -> None:
        if params["beta"] + params["gamma"] >= 1.0:
            raise ParameterError(f"{self.label}: beta + gamma = {params['beta'] + params['gamma']:g} "  # type: ignore[attr-defined]
                                 "drops every entry; keep their sum below 1")

    def masks(self, group: TensorGroup, params: dict[str, Any]) -> list[torch.Tensor]:
        from mk_ties.select import rank_band_mask

        out = []
        for x in group.tensors:
            a = x.reshape(-1).abs()
            n = a.numel()
            out.append(rank_band_mask(a, int(params["beta"] * n + 1e-9), int(params["gamma"] * n + 1e-9)))
        return out


class Breadcrumbs(_BreadcrumbsMixin, MergeMethod):
    name = "breadcrumbs"
    description = "Model Breadcrumbs (Davari and Belilovsky 2024): drop outliers and small entries, then sum."
    params = (BETA, GAMMA, LAMBDA)

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        from mk_ties.kernels import weighted_sum

        flats = [x.reshape(-1) for x in group.tensors]
        return weighted_sum(flats, group.coefficients, self.masks(group, params)).reshape(group.tensors[0].shape)


class BreadcrumbsTies(_BreadcrumbsMixin, MergeMethod):
    name = "breadcrumbs_ties"
    description = "Model Breadcrumbs masks, then TIES' sign election and disjoint mean."
    params = (BETA, GAMMA, SIGN_METHOD, SIGN_TIE, AGGREGATE, LAMBDA)

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        from mk_ties.kernels import elect_and_merge

        flats = [x.reshape(-1) for x in group.tensors]
        return elect_and_merge(flats, group.coefficients, params, self.masks(group, params)).reshape(
            group.tensors[0].shape)


METHODS = [Ties(), DareLinear(), DareTies(), Breadcrumbs(), BreadcrumbsTies()]
