"""Score one model on one lm-eval task with lm-eval's own evaluation loop (imports lm-eval).

``lm_eval.evaluator.evaluate`` is called directly on already-loaded tasks rather than through
``simple_evaluate``, which would rebuild the task (and collect environment info) on every call;
the seeds ``simple_evaluate`` sets are set here the same way, so a result equals lm-eval's.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

SEED = 0
OTHER_SEED = 1234
"""lm-eval's defaults (``random_seed``; numpy, torch and few-shot seeds)."""


def wrap(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """lm-eval's HF model wrapper around an already-loaded model (no reload)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def evaluate(lm: Any, task: Any, indices: Sequence[int] | None) -> dict[str, float]:
    """Every numeric metric lm-eval reports for ``task`` (keys as ``acc``, or ``metric,filter``
    for a filter other than ``none``; no standard errors), and ``samples``: how many documents
    were scored. ``indices``: positions in the task's evaluated split (None: all of them)."""
    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate as lm_evaluate

    random.seed(SEED)
    np.random.seed(OTHER_SEED)
    torch.manual_seed(OTHER_SEED)
    task.set_fewshot_seed(seed=OTHER_SEED)
    name = task.task_name
    samples = None if indices is None else {name: [int(i) for i in indices]}
    result = lm_evaluate(lm=lm, task_dict={"tasks": {name: task}, "groups": {}, "group_map": {}},
                         samples=samples, bootstrap_iters=0, log_samples=False)
    raw = result["results"][name]
    out: dict[str, float] = {}
    for key, value in raw.items():
        if "," not in key or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, flt = key.split(",", 1)
        out[metric if flt == "none" else key] = float(value)
    out["samples"] = int(result["n-samples"][name]["effective"])
    return out
