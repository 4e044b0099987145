"""The `digits` evaluator: accuracy (primary) and loss of a merged backbone on each task.

Light module (no torch at import): the work happens in ``mk_digits.scoring``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from mergekit_core import REQUIRED, Evaluator, Param, TaskInfo


class DigitsEvaluator(Evaluator):
    name = "digits"
    description = "8 tasks on scikit-learn's handwritten digits (see 'mk digits build'); accuracy and loss."
    params = (
        Param("pool", REQUIRED, "the pool directory made by 'mk digits build'", type=str),
        Param("batch_size", 256, "batch size of unlabeled batches (AdaMerging)", type=int, min=1),
    )

    def tasks(self, params: dict[str, Any]) -> list[TaskInfo]:
        from mk_digits.data import TASKS

        return [TaskInfo(t, "accuracy", higher_is_better=True) for t in TASKS]

    def labels(self, task: str, split: str, params: dict[str, Any]) -> list[int]:
        from mk_digits.scoring import labels

        return labels(params["pool"], task, split)

    def evaluate(self, model: Any, task: str, split: str, subset: Sequence[int] | None,
                 params: dict[str, Any]) -> dict[str, float]:
        from mk_digits.scoring import evaluate

        return evaluate(params["pool"], model, task, split, subset)

    def unlabeled_batches(self, task: str, split: str, params: dict[str, Any]) -> Iterator[Any]:
        from mk_digits.scoring import unlabeled_batches

        return unlabeled_batches(params["pool"], task, split, params["batch_size"])

    def labelled_batches(self, task: str, split: str, params: dict[str, Any]) -> Iterator[Any]:
        """``(images (B, 64) float32, labels (B,) int64)`` batches, in split order."""
        from mk_digits.scoring import labelled_batches

        return labelled_batches(params["pool"], task, split, params["batch_size"])

    def forward(self, model: Any, task: str, inputs: Any, params: dict[str, Any]) -> Any:
        """Logits of ``model`` (a state dict, may hold tensors that require grad) on ``inputs``."""
        from mk_digits.scoring import forward

        return forward(params["pool"], model, task, inputs)
