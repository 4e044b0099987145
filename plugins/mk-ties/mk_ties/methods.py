"""TIES, DARE and Model Breadcrumbs merge methods (delta space).

Shared conventions (see docs/methods-ties.md for the math and where the references disagree):

- the per-source coefficients ``c_t`` come from the lambda policy (the method's ``lambda`` is the
  policy's default value), and are applied after the sign election and before the disjoint mean,
  as PEFT does; with equal coefficients this is ``lambda * disjoint_mean``, the paper's formula;
- exact selections: exactly ``int(fraction * n)`` entries are kept, ties broken by index;
- mergekit's conventions are options (docs/mergekit-users.md): ``density`` per source and tensor,
  ``weighted_election``, ``aggregate: weighted_mean``, ``min_kept``, ``normalize`` and ``scale``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mergekit_core import (
    MergeMethod,
    Param,
    ParameterError,
    PrepareContext,
    TensorGroup,
)
from mergekit_core.api import check_rules, check_sources, value_for

if TYPE_CHECKING:  # pragma: no cover
    import torch

# This module only declares components: it must not import torch (mk --help and mk plugins list
# load it). The arithmetic lives in kernels.py, select.py and global_trim.py.

LAMBDA = Param("lambda", 1.0, "scale of the merged task vector; the lambda policy's default value", type=float)
SIGN_METHOD = Param("sign_method", "mass", "sign election: mass (sign of the sum) or count (of the signs)",
                    choices=("mass", "count"))
SIGN_TIE = Param("sign_tie", "majority",
                 "entries whose elected sign is 0: majority (sign of the tensor's summed signs, as the "
                 "paper's code), positive (+1, as PEFT and mergekit), or zero (dropped)",
                 choices=("majority", "positive", "zero"))
AGGREGATE = Param("aggregate", "mean", "combine agreeing entries by their mean (paper), their sum (FusionBench; "
                  "mergekit's normalize: false), their coefficient-weighted mean: the sum divided by the sum of "
                  "the agreeing coefficients (weighted_mean, mergekit's normalize: true), or the largest "
                  "|c_t tau_t| with the elected sign (max, the TIES code's and FusionBench's dis-max)",
                  choices=("mean", "sum", "weighted_mean", "max"))
WEIGHTED_ELECTION = Param("weighted_election", False,
                          "elect signs on the coefficient-weighted task vectors c_t * tau_t (mergekit) instead of "
                          "on tau_t (the paper, PEFT); equal positive coefficients elect the same signs", type=bool)
SCALE = Param("scale", 1.0, "multiplies the merged task vector after aggregation (mergekit's lambda); "
              "the coefficients c_t come before it", type=float)
NORMALIZE = Param("normalize", False, "divide the weighted sum by the sum of the coefficients (mergekit's "
                  "normalize; not when that sum is under 1e-8 in magnitude, as mergekit)", type=bool)


def density_param(instead: str) -> Param:
    return Param("density", None, "fraction of each task vector kept, per source and tensor: a number, or rules "
                 "[{match: GLOB, value: V} or {match: GLOB, values: [V per source]}] where V is a number or a "
                 f"list across layers (mergekit's density and gradients); tensors no rule covers use {instead}",
                 type=(float, list))


@dataclass
class Layout:
    """What ``prepare`` learns from the plan for per-tensor parameters: the merge's layers and
    source names (a group holds only the sources that have its tensor), and the model-scope trim."""

    layers: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    trim: Any = None

    def source_index(self, group: TensorGroup, i: int) -> int:
        if self.sources and i < len(group.source_names) and group.source_names[i] in self.sources:
            return self.sources.index(group.source_names[i])
        return i


def layout_of(context: PrepareContext, method: MergeMethod, params: dict[str, Any]) -> Layout:
    plan = getattr(context, "plan", None)
    if plan is None:
        return Layout()
    check_sources(params.get("density"), len(plan.sources), f"{method.label}: density")
    return Layout(list(plan.layers), [s.name for s in plan.sources])


class _PerTensorDensity:
    """``density`` read per source and tensor; None where no rule covers it."""

    needs_prepare = True

    def prepare(self, context: PrepareContext, params: dict[str, Any]) -> Layout:
        return layout_of(context, self, params)  # type: ignore[arg-type]

    def densities(self, group: TensorGroup, params: dict[str, Any], state: Any) -> list[float | None]:
        value = params["density"]
        if value is None:
            return [None] * len(group.tensors)
        layout = state if isinstance(state, Layout) else Layout()
        try:
            return [value_for(value, group.name, group.layer, layout.source_index(group, i), layout.layers)
                    for i in range(len(group.tensors))]
        except ParameterError as exc:
            raise ParameterError(f"{self.label}: density for tensor {group.name}: {exc}") from None  # type: ignore[attr-defined]

    def check_density(self, params: dict[str, Any]) -> None:
        check_rules(params["density"], f"{self.label}: density")  # type: ignore[attr-defined]


def elect_and_aggregate(flats: list[torch.Tensor], coefficients: list[float], params: dict[str, Any],
                        masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Sign election and disjoint aggregation (``kernels.elect_and_merge``; ``consensus.elect_and_max``
    for ``aggregate: max``) of the 1-D ``flats``."""
    if params["aggregate"] == "max":
        from mk_ties.consensus import elect_and_max

        return elect_and_max(flats, coefficients, params, masks)
    from mk_ties.kernels import elect_and_merge

    return elect_and_merge(flats, coefficients, params, masks)


def scaled(out: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    return out.mul_(params["scale"]) if params["scale"] != 1.0 else out


class Ties(_PerTensorDensity, MergeMethod):
    name = "ties"
    description = "TIES-Merging (Yadav et al. 2023): trim to the top k%, elect signs, disjoint mean."
    benchmark_grid = {"k": [20.0, 40.0, 60.0, 80.0, 100.0], "lambda": [0.6, 0.8, 1.0, 1.3, 1.6, 2.0]}  # tuned by `mk digits bench` on validation
    params = (
        Param("k", 20.0, "percent of each task vector kept by magnitude", type=float, min=0.0, max=100.0),
        Param("trim_scope", "model", "rank magnitudes over the whole task vector (model, as the paper's "
              "code; a prepare pass) or within each tensor (tensor, as mergekit and PEFT)",
              choices=("model", "tensor")),
        SIGN_METHOD, SIGN_TIE, AGGREGATE, LAMBDA,
        density_param("k"),
        Param("min_kept", 0, "at least this many entries of each tensor survive the trim when its keep fraction "
              "is above 0 (mergekit keeps 1)", type=int, min=0),
        WEIGHTED_ELECTION, SCALE,
    )

    @property
    def needs_prepare(self) -> bool:  # type: ignore[override]
        return True

    def validate(self, params: dict[str, Any]) -> None:
        self.check_density(params)
        if params["density"] is not None and params["trim_scope"] == "model":
            raise ParameterError(f"{self.label}: density keeps a fraction of each tensor; set trim_scope: tensor "
                                 "(or give k for a trim over the whole task vector)")

    def prepare(self, context: PrepareContext, params: dict[str, Any]) -> Layout:
        layout = layout_of(context, self, params)
        if params["trim_scope"] == "model":
            from mk_ties.global_trim import global_trim

            layout.trim = global_trim(context, params["k"])
        return layout

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        from mk_ties.select import keep_count, top_magnitude_mask

        trim = state.trim if isinstance(state, Layout) else state
        flats = [x.reshape(-1) for x in group.tensors]
        densities = self.densities(group, params, state)
        masks = []
        for i, f in enumerate(flats):
            if params["trim_scope"] == "model" and trim is not None:
                masks.append(trim.magnitude_mask(i, group.name, f))
            else:
                fraction = params["k"] / 100.0 if densities[i] is None else densities[i]
                m = keep_count(fraction, f.numel())
                if fraction > 0:
                    m = max(m, min(params["min_kept"], f.numel()))
                masks.append(top_magnitude_mask(f, m))
        out = elect_and_aggregate(flats, group.coefficients, params, masks)
        return scaled(out, params).reshape(group.tensors[0].shape)


DARE_P = Param("p", 0.5, "drop probability of each delta entry (0 <= p < 1)", type=float, min=0.0, max=1.0)
DARE_RESCALE = Param("rescale", "inverse", "rescale survivors by 1/(1-p) (inverse, the paper's) or to the "
                     "tensor's L1 norm (l1, current mergekit), or not at all (none)",
                     choices=("inverse", "l1", "none"))


class _DareMixin(_PerTensorDensity):
    def validate(self, params: dict[str, Any]) -> None:
        if params["p"] >= 1.0:
            raise ParameterError(f"{self.label}: p = {params['p']} drops every entry; use p < 1")  # type: ignore[attr-defined]
        self.check_density(params)

    def dropped(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> list[torch.Tensor]:
        import torch

        from mk_ties.kernels import dare

        out = []
        for i, (x, d) in enumerate(zip(group.tensors, self.densities(group, params, state))):
            if d is not None and d <= 0.0:  # keep nothing (mergekit's density 0)
                out.append(torch.zeros_like(x))
                continue
            p = params["p"] if d is None else 1.0 - d
            out.append(dare(x, p, params["rescale"], torch.Generator().manual_seed(group.seed + i)))
        return out


class DareLinear(_DareMixin, MergeMethod):
    name = "dare_linear"
    description = "DARE (Yu et al. 2024): random drop and rescale, then sum_t c_t * delta_t."
    benchmark_grid = {"p": [0.0, 0.3, 0.5, 0.7, 0.9], "lambda": [0.2, 0.3, 0.4]}  # tuned by `mk digits bench` on validation
    params = (DARE_P, DARE_RESCALE, LAMBDA, density_param("1 - p"), NORMALIZE, SCALE)

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        from mk_ties.kernels import weighted_sum

        out = weighted_sum(self.dropped(group, params, state), group.coefficients, normalize=params["normalize"])
        return scaled(out, params)


class DareTies(_DareMixin, MergeMethod):
    name = "dare_ties"
    description = "DARE then TIES' sign election and disjoint mean (no second trim)."
    benchmark_grid = {"p": [0.0, 0.1, 0.3, 0.5, 0.7], "lambda": [0.6, 0.9, 1.2, 1.5, 2.0]}  # tuned by `mk digits bench` on validation
    params = (DARE_P, DARE_RESCALE, SIGN_METHOD, SIGN_TIE, AGGREGATE, LAMBDA, density_param("1 - p"),
              WEIGHTED_ELECTION, SCALE)

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        flats = [x.reshape(-1) for x in self.dropped(group, params, state)]
        return scaled(elect_and_aggregate(flats, group.coefficients, params), params).reshape(group.tensors[0].shape)


BETA = Param("beta", 0.01, "fraction of the largest magnitudes dropped in each tensor", type=float,
             min=0.0, max=1.0)
GAMMA = Param("gamma", 0.89, "fraction of the smallest magnitudes dropped in each tensor", type=float,
              min=0.0, max=1.0)


class _BreadcrumbsMixin(_PerTensorDensity):
    def validate(self, params: dict[str, Any]) -> None:
        self.check_density(params)
        if params["density"] is None and params["beta"] + params["gamma"] >= 1.0:
            raise ParameterError(f"{self.label}: beta + gamma = {params['beta'] + params['gamma']:g} "  # type: ignore[attr-defined]
                                 "drops every entry; keep their sum below 1")

    def masks(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> list[torch.Tensor]:
        """Per source: the magnitude-rank band kept. With a density ``d`` (mergekit's rule): keep
        ``int(d n)`` entries after dropping the ``int(beta n)`` largest, fewer of those when the
        band would not fit; ``d >= 1`` keeps everything."""
        import torch

        from mk_ties.select import rank_band_mask

        out = []
        for x, d in zip(group.tensors, self.densities(group, params, state)):
            a = x.reshape(-1).abs()
            n = a.numel()
            if d is None:
                out.append(rank_band_mask(a, int(params["beta"] * n), int(params["gamma"] * n)))
            elif d >= 1.0:
                out.append(torch.ones(n, dtype=torch.bool))
            else:
                keep = int(d * n)
                bottom = max(0, n - keep - int(params["beta"] * n))
                out.append(rank_band_mask(a, n - bottom - keep, bottom))
        return out


class Breadcrumbs(_BreadcrumbsMixin, MergeMethod):
    name = "breadcrumbs"
    description = "Model Breadcrumbs (Davari and Belilovsky 2024): drop outliers and small entries, then sum."
    benchmark_grid = {"gamma": [0.1, 0.3, 0.5, 0.7, 0.9], "lambda": [0.2, 0.3, 0.4, 0.6, 0.8]}  # tuned by `mk digits bench` on validation
    params = (BETA, GAMMA, LAMBDA, density_param("beta and gamma"), NORMALIZE, SCALE)

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        from mk_ties.kernels import weighted_sum

        flats = [x.reshape(-1) for x in group.tensors]
        out = weighted_sum(flats, group.coefficients, self.masks(group, params, state), normalize=params["normalize"])
        return scaled(out, params).reshape(group.tensors[0].shape)


class BreadcrumbsTies(_BreadcrumbsMixin, MergeMethod):
    name = "breadcrumbs_ties"
    description = "Model Breadcrumbs masks, then TIES' sign election and disjoint mean."
    benchmark_grid = {"gamma": [0.1, 0.3, 0.5, 0.7, 0.9], "lambda": [0.6, 0.8, 1.0, 1.2, 1.6, 2.0]}  # tuned by `mk digits bench` on validation
    params = (BETA, GAMMA, SIGN_METHOD, SIGN_TIE, AGGREGATE, LAMBDA, density_param("beta and gamma"),
              WEIGHTED_ELECTION, SCALE)

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        flats = [x.reshape(-1) for x in group.tensors]
        out = elect_and_aggregate(flats, group.coefficients, params, self.masks(group, params, state))
        return scaled(out, params).reshape(group.tensors[0].shape)


METHODS = [Ties(), DareLinear(), DareTies(), Breadcrumbs(), BreadcrumbsTies()]
