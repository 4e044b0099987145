"""Sparsifying transforms usable before any method: trim, dare, magnitude_prune."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mergekit_core import Param, ParameterError, Transform
from mk_ties.methods import DARE_P, DARE_RESCALE

if TYPE_CHECKING:  # pragma: no cover
    import torch


class Trim(Transform):
    name = "trim"
    description = "Keep the top k% of each tensor's delta entries by magnitude (exact count), zero the rest."
    params = (Param("k", 20.0, "percent kept", type=float, min=0.0, max=100.0),)

    def apply(self, name: str, delta: torch.Tensor, params: dict[str, Any], rng: torch.Generator) -> torch.Tensor:
        from mk_ties.select import keep_count, top_magnitude_mask

        flat = delta.reshape(-1)
        return (flat * top_magnitude_mask(flat, keep_count(params["k"] / 100.0, flat.numel()))).reshape(delta.shape)


class Dare(Transform):
    name = "dare"
    description = "DARE: drop each delta entry with probability p, rescale the survivors."
    params = (DARE_P, DARE_RESCALE)

    def validate(self, params: dict[str, Any]) -> None:
        if params["p"] >= 1.0:
            raise ParameterError(f"{self.label}: p = {params['p']} drops every entry; use p < 1")

    def apply(self, name: str, delta: torch.Tensor, params: dict[str, Any], rng: torch.Generator) -> torch.Tensor:
        from mk_ties.kernels import dare

        return dare(delta, params["p"], params["rescale"], rng)


class MagnitudePrune(Transform):
    name = "magnitude_prune"
    description = "Zero delta entries whose magnitude is at most a threshold (absolute, or times the tensor's std)."
    params = (
        Param("threshold", 0.0, "entries with |delta| <= threshold become 0", type=float, min=0.0),
        Param("relative", False, "multiply the threshold by the tensor's standard deviation", type=bool),
    )

    def apply(self, name: str, delta: torch.Tensor, params: dict[str, Any], rng: torch.Generator) -> torch.Tensor:
        threshold = params["threshold"]
        if params["relative"] and delta.numel() > 1:
            threshold *= float(delta.float().std())
        return delta * (delta.abs() > threshold)


TRANSFORMS = [Trim(), Dare(), MagnitudePrune()]
