"""A cheap, real evaluator for the tests: task ``ftN`` scores minus the distance of the merged
weights to ``ftN``'s own (0 for ftN itself). Every call is counted in ``CALLS`` and, when
``MK_BAYES_CALLS`` names a file, appended to it (so a subprocess's evaluations can be counted)."""

from __future__ import annotations

import json
import os
import types
from collections import Counter
from pathlib import Path

from mergekit_core import Evaluator, Param, TaskInfo, hookimpl
from mergekit_core.api import SafetensorsReader

CALLS: Counter = Counter()
TASKS = ("ft1", "ft2", "ft3")


def _weights(model):
    import torch

    if isinstance(model, dict):
        return {k: v.float() for k, v in model.items() if torch.is_tensor(v) and v.is_floating_point()}
    reader = SafetensorsReader.from_directory(Path(model))
    return {n: reader.get(n).float() for n in reader.infos() if reader.get(n).is_floating_point()}


class Closeness(Evaluator):
    name = "closeness"
    description = "minus the distance of the merged weights to each task's own fine-tune"
    params = (Param("pool", help="the folder of the toy models", type=str),)

    def tasks(self, params):
        return [TaskInfo(t, "closeness") for t in TASKS]

    def labels(self, task, split, params):
        return [i % 2 for i in range(20)]

    def evaluate(self, model, task, split, subset, params):
        import torch

        CALLS[task] += 1
        if os.environ.get("MK_BAYES_CALLS"):
            with open(os.environ["MK_BAYES_CALLS"], "a") as f:
                f.write(json.dumps({"task": task, "split": split}) + "\n")
        if os.environ.get("MK_BAYES_SLOW"):
            import time

            time.sleep(float(os.environ["MK_BAYES_SLOW"]))
        merged = _weights(model)
        own = _weights(str(Path(params["pool"]) / task))
        distance = sum(float(torch.linalg.vector_norm(merged[n] - own[n]) ** 2) for n in own) ** 0.5
        return {"closeness": -distance}


plugin = types.ModuleType("closeness_plugin")
plugin.mk_evaluators = hookimpl(lambda: [Closeness()])
plugin.mk_evaluators.__name__ = "mk_evaluators"


def make_models(root: Path) -> dict[str, Path]:
    """A base and three fine-tunes (two layers, a few small tensors) as safetensors folders."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {}
    for i in range(2):
        base[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(6, 6, generator=g)
        base[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(8, 6, generator=g)
    base["model.norm.weight"] = torch.ones(6)
    paths = {}
    for name in ("base", *TASKS):
        sd = base if name == "base" else {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        d = root / name
        d.mkdir(parents=True)
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
        paths[name] = d
    return paths
