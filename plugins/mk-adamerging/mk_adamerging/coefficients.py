"""The merged model as a differentiable function of the coefficients:
``theta^g = theta_0^g + sum_t lambda_t^g tau_t^g`` (AdaMerging, Yang et al. 2024, eq. 3/4).

Two implementations with the same values and gradients (a test checks):

* ``streaming_parametrize``: ``MergeTensor``, one autograd op per tensor that builds the merged
  tensor in place (no per-task temporaries) and saves nothing for backward but a handle to the
  task vectors: ``d theta / d lambda_t = tau_t``, so the gradient is ``<grad, tau_t>``, computed
  by reading the task vectors again (moved to the device per tensor with ``cpu_stream``).
* ``functional_clone_legacy``: FusionBench's ``LayerWiseMergedModel.merge_weights`` expression,
  ``theta_0 + sum_t w[t, j] * tau_t`` with ordinary torch ops (autograd keeps each scaled term's
  inputs, on the device, until backward).

A LoRA task vector stays factored (``LowRankDelta``: ``scale * B @ A``): the forward adds it with
``addmm`` into the merged tensor, and its gradient is ``scale * sum((B^T G) * A)`` with ``G`` the
gradient in ``B @ A`` orientation, so no dense ``out x in`` delta is ever made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergekit_core.api import LowRankDelta


@dataclass
class Entry:
    """One merged tensor: its base and task vectors, where and in which dtype they are kept, and
    its coefficient group (column of the lambda matrix)."""

    name: str
    group: int
    base: torch.Tensor
    deltas: list[torch.Tensor | LowRankDelta]

    def nbytes(self) -> int:
        total = self.base.numel() * self.base.element_size()
        for d in self.deltas:
            parts = (d.B, d.A) if isinstance(d, LowRankDelta) else (d,)
            total += sum(p.numel() * p.element_size() for p in parts)
        return total


def _on(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return x.to(device=device, dtype=dtype, non_blocking=True)


def _ba_view(x: torch.Tensor, d: LowRankDelta) -> torch.Tensor:
    """``x`` (the base's shape) seen in ``B @ A`` orientation, (out, in); a view, no copy."""
    rows, cols = d.B.shape[0], d.A.shape[1]
    return x.view(cols, rows).T if d.transpose else x.view(rows, cols)


def add_delta(out: torch.Tensor, d: torch.Tensor | LowRankDelta, coefficient: torch.Tensor | float) -> None:
    """``out += coefficient * d`` in place, ``d`` moved to ``out``'s device and dtype."""
    c = float(coefficient)
    if isinstance(d, LowRankDelta):
        _ba_view(out, d).addmm_(_on(d.B, out.device, out.dtype), _on(d.A, out.device, out.dtype), alpha=c * d.scale)
    else:
        out.add_(_on(d, out.device, out.dtype), alpha=c)


def inner(grad: torch.Tensor, d: torch.Tensor | LowRankDelta) -> torch.Tensor:
    """``<grad, d>`` in float32 (a 0-d tensor)."""
    if isinstance(d, LowRankDelta):
        g = _ba_view(grad.contiguous(), d).float()
        B, A = _on(d.B, grad.device, torch.float32), _on(d.A, grad.device, torch.float32)
        return (B.T @ g).mul_(A).sum() * d.scale
    return torch.dot(grad.reshape(-1).float(), _on(d, grad.device, torch.float32).reshape(-1))


class MergeTensor(torch.autograd.Function):
    """``base + sum_t lambdas[t] * deltas[t]``, differentiable in ``lambdas`` only."""

    @staticmethod
    def forward(ctx, lambdas: torch.Tensor, entry: Entry, device: torch.device,  # type: ignore[override]
                dtype: torch.dtype) -> torch.Tensor:
        out = _on(entry.base, device, dtype).clone()
        for c, d in zip(lambdas.tolist(), entry.deltas):
            add_delta(out, d, c)
        ctx.entry = entry
        ctx.lambda_dtype = lambdas.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        g = torch.stack([inner(grad, d) for d in ctx.entry.deltas]).to(ctx.lambda_dtype)
        return g, None, None, None


def merge_streaming(lambdas: torch.Tensor, entry: Entry, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The merged tensor with ``MergeTensor`` (``lambdas``: (T,) float32, requires grad)."""
    return MergeTensor.apply(lambdas, entry, device, dtype)


def merge_legacy(lambdas: torch.Tensor, entry: Entry, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The merged tensor as FusionBench writes it (dense task vectors; factors multiplied out)."""
    out = _on(entry.base, device, dtype)
    for t, d in enumerate(entry.deltas):
        dense = d.dense() if isinstance(d, LowRankDelta) else d
        out = out + lambdas[t].to(dtype) * _on(dense, device, dtype)
    return out


MERGE_IMPLS = {"streaming_parametrize": merge_streaming, "functional_clone_legacy": merge_legacy}


def effective(raw: torch.Tensor, clamp: bool, normalize: bool) -> torch.Tensor:
    """The coefficients the forward uses from the learned ``raw`` (T, G): softmax over tasks
    (``normalize``), else clamped to [0, 1] (``clamp``: zero gradient outside, as ``torch.clamp``
    in the official code), else as is."""
    if normalize:
        return torch.softmax(raw, dim=0)
    return raw.clamp(0.0, 1.0) if clamp else raw


def merged_state(lam: torch.Tensor, entries: Sequence[Entry], impl: str, device: torch.device,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every merged tensor for the coefficient matrix ``lam`` (T, G)."""
    fn = MERGE_IMPLS[impl]
    return {e.name: fn(lam[:, e.group], e, device, dtype) for e in entries}
