"""The ``tvq`` transform: quantize each task vector (TVQ), so any method merges quantized ones."""

from __future__ import annotations

from typing import Any

from mergekit_core import Param, Transform


class TaskVectorQuantization(Transform):
    name = "tvq"
    description = "Asymmetric b-bit quantization of each task vector (TVQ), with optional residual stages."
    params = (
        Param("bits", 4, help="bits per entry and stage", type=int, min=1, max=8),
        Param("stages", 1, help="residual stages (each quantizes what the previous ones left)", type=int,
              min=1, max=8),
        Param("granularity", "tensor", help="one scale per tensor (as the TVQ paper) or per row",
              choices=("tensor", "row")),
    )

    def apply(self, name: str, delta: Any, params: dict[str, Any], rng: Any) -> Any:
        from mk_svd_hybrid.quantize import dequantize_stages, residual_quantize

        rows = 1 if params["granularity"] == "tensor" or delta.dim() < 2 else delta.shape[0]
        view = delta.reshape(rows, delta.numel() // rows if rows else 0)
        out = dequantize_stages(residual_quantize(view, params["bits"], params["stages"]))
        return out.reshape(delta.shape).to(delta.dtype)


TRANSFORMS = [TaskVectorQuantization()]
