"""DELLA, DELLA-linear, SCE and RAM merge methods (delta space); declarations only, no torch import.

The math, defaults and differences from mergekit: docs/plugins/mk-ties.md. Coefficients ``c_t``
(the lambda policy) enter as in the other mk-ties methods: after the sign election and before the
aggregation (DELLA), as the weights of the sum (DELLA-linear), as a factor of each task's term
(SCE, RAM).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mergekit_core import MergeMethod, Param, ParameterError, TensorGroup
from mk_ties.methods import (
    AGGREGATE,
    DARE_P,
    LAMBDA,
    NORMALIZE,
    SCALE,
    SIGN_METHOD,
    SIGN_TIE,
    WEIGHTED_ELECTION,
    _PerTensorDensity,
    density_param,
    elect_and_aggregate,
    scaled,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

EPSILON = Param("epsilon", 0.15, "half-width of the keep probabilities around 1 - p: the smallest magnitude of a "
                "row is kept with 1 - p - epsilon, the largest with 1 - p + epsilon (mergekit's default)",
                type=float, min=0.0, max=0.5)
DELLA_RESCALE = Param("rescale", "inverse", "rescale each kept entry by 1 / its keep probability (inverse, the "
                      "paper's), the tensor to its L1 norm (l1, mergekit), or not at all (none)",
                      choices=("inverse", "l1", "none"))


class _DellaMixin(_PerTensorDensity):
    def validate(self, params: dict[str, Any]) -> None:
        self.check_density(params)
        keep = 1.0 - params["p"] if params["density"] is None else params["density"]
        if isinstance(keep, float) and 0 < keep < 1 and not (0 < keep - params["epsilon"] < keep
                                                             + params["epsilon"] < 1):
            raise ParameterError(f"{self.label}: density {keep:g} +/- epsilon {params['epsilon']:g} "  # type: ignore[attr-defined]
                                 "must lie inside (0, 1); lower epsilon")

    def pruned(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> list[torch.Tensor]:
        import torch

        from mk_ties.magprune import magprune

        out = []
        for i, (x, d) in enumerate(zip(group.tensors, self.densities(group, params, state))):
            keep = 1.0 - params["p"] if d is None else d
            where = f"{self.label}: tensor {group.name}, source {i}: "  # type: ignore[attr-defined]
            out.append(magprune(x, keep, params["epsilon"], params["rescale"],
                                torch.Generator().manual_seed(group.seed + i), where))
        return out


class Della(_DellaMixin, MergeMethod):
    name = "della"
    description = "DELLA (Deep et al. 2024): magnitude-ranked random drops (MAGPRUNE), rescale, TIES election."
    benchmark_grid = {"p": [0.2, 0.3, 0.5, 0.7], "lambda": [0.6, 0.9, 1.2, 1.5, 2.0]}  # epsilon 0.15: p >= 0.2
    params = (DARE_P, EPSILON, DELLA_RESCALE, SIGN_METHOD, SIGN_TIE, AGGREGATE, LAMBDA, density_param("1 - p"),
              WEIGHTED_ELECTION, SCALE)

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        flats = [x.reshape(-1) for x in self.pruned(group, params, state)]
        out = elect_and_aggregate(flats, group.coefficients, params)
        return scaled(out, params).reshape(group.tensors[0].shape)


class DellaLinear(_DellaMixin, MergeMethod):
    name = "della_linear"
    description = "DELLA's MAGPRUNE drops and rescale, then sum_t c_t * delta_t (no election)."
    benchmark_grid = {"p": [0.2, 0.3, 0.5, 0.7], "lambda": [0.2, 0.3, 0.4]}  # epsilon 0.15: p >= 0.2
    params = (DARE_P, EPSILON, DELLA_RESCALE, LAMBDA, density_param("1 - p"), NORMALIZE, SCALE)

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        from mk_ties.kernels import weighted_sum

        out = weighted_sum(self.pruned(group, params, state), group.coefficients, normalize=params["normalize"])
        return scaled(out, params)


class Sce(MergeMethod):
    name = "sce"
    description = "SCE (FuseChat, Wan et al. 2024): select by variance, weigh by mean squares, erase minority signs."
    benchmark_grid = {"select_topk": [0.1, 0.3, 0.5, 1.0], "lambda": [0.6, 1.0, 1.5, 2.0, 3.0]}
    params = (
        Param("select_topk", 1.0, "fraction of the entries (with non-zero variance across the task vectors) kept, "
              "those of largest variance; 1 keeps all (mergekit's default)", type=float, min=0.0, max=1.0),
        LAMBDA,
    )

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        from mk_ties.consensus import sce

        return sce(group.tensors, group.coefficients, params["select_topk"])


RAM_EPSILON = Param("epsilon", 1e-5, "an entry takes part where |delta| exceeds it (mergekit's default)",
                    type=float, min=0.0)


class Ram(MergeMethod):
    name = "ram"
    description = "RAM (Reinforced Agent Merging): per entry, the mean of the task vectors that touch it."
    benchmark_grid = {"lambda": [1.0, 1.5, 2.0, 2.5, 3.0]}
    params = (RAM_EPSILON, LAMBDA)

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        from mk_ties.consensus import ram

        return ram(group.tensors, group.coefficients, params["epsilon"])


class RamPlus(MergeMethod):
    name = "ramplus_tl"
    description = "RAM+ (tensor-local): RAM with each task's unique entries scaled up by its share of overlap."
    benchmark_grid = {"lambda": [1.0, 1.5, 2.0, 2.5, 3.0]}
    params = (
        Param("r", 0.1, "strength of the rescale of unique entries", type=float, min=0.0),
        Param("alpha", 0.2, "cap of the overlap ratio shared/unique", type=float, min=0.0),
        RAM_EPSILON, LAMBDA,
    )

    def merge(self, group: TensorGroup, params: dict[str, Any], state: Any = None) -> torch.Tensor:
        from mk_ties.consensus import ram

        return ram(group.tensors, group.coefficients, params["epsilon"], (params["r"], params["alpha"]))


METHODS = [Della(), DellaLinear(), Sce(), Ram(), RamPlus()]
