"""The data AdaMerging adapts on, and its losses.

Each step draws, for every task, ``batches_per_step`` batches of ``batch_size`` examples from a
fresh permutation of the task's split (the official code's freshly shuffled test loader, of which
it uses the first two batches). The loss of a batch is its mean prediction entropy
``H(p) = -sum_c p_c log p_c`` (Yang et al. 2024, eq. 5; the official ``softmax_entropy``), or its
mean cross-entropy against the labels; the step's loss is the sum over batches and tasks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mergekit_core import ConfigError


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean prediction entropy (nats) of ``logits`` (batch, classes), computed in float32."""
    logits = logits.float()
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), labels.to(logits.device).long())


@dataclass
class TaskData:
    """One task's examples: ``inputs`` (N, ...) and, for cross_entropy, ``labels`` (N,) int64."""

    task: str
    inputs: torch.Tensor
    labels: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


def collect(task: str, batches: Iterable, labelled: bool, shots: int | None, source: str) -> TaskData:
    """Concatenate an evaluator's batches (tensors, or ``(inputs, labels)`` pairs).

    Raises:
        ConfigError: the evaluator gave no examples, or batches that are not tensors.
    """
    inputs, labels = [], []
    for batch in batches:
        x, y = batch if labelled else (batch, None)
        if not isinstance(x, torch.Tensor) or (labelled and not isinstance(y, torch.Tensor)):
            raise ConfigError(f"{source} gave task {task} batches that are not torch tensors; adamerging samples "
                              "examples from tensor batches (inputs of shape (batch, ...))")
        inputs.append(x)
        if labelled:
            labels.append(y)
        if shots is not None and sum(len(b) for b in inputs) >= shots:
            break
    if not inputs:
        raise ConfigError(f"{source} gave no examples for task {task}")
    x = torch.cat(inputs)
    y = torch.cat(labels).long() if labelled else None
    if shots is not None:
        x, y = x[:shots], (y[:shots] if y is not None else None)
    return TaskData(task, x, y)


def draw(data: TaskData, batch_size: int, batches: int, generator: torch.Generator
         ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``batches`` batches of the first ``batches * batch_size`` examples of a fresh permutation
    (fewer when the split is small, as a data loader's last batches)."""
    order = torch.randperm(len(data), generator=generator)[:batches * batch_size]
    out = []
    for idx in order.split(batch_size):
        out.append((data.inputs[idx], data.labels[idx] if data.labels is not None else None))
    return out
