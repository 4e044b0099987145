"""A cheap, real evaluator for the Ray tests, importable by Ray's workers (the test cluster starts
with this folder on PYTHONPATH): task ``ftN`` scores minus the distance of the merged weights to
``ftN``'s own (0 for ftN itself). ``hang_once: PATH``: the first trial to evaluate writes its
process id to PATH and sleeps, so a test can kill that worker in the middle of the trial."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mergekit_core import Evaluator, Param, TaskInfo, hookimpl
from mergekit_core.api import SafetensorsReader

TASKS = ("ft1", "ft2", "ft3")


def _weights(model):
    import torch

    if isinstance(model, dict):
        return {k: v.float() for k, v in model.items() if torch.is_tensor(v) and v.is_floating_point()}
    reader = SafetensorsReader.from_directory(Path(model))
    return {n: reader.get(n).float() for n in reader.infos()}


class Closeness(Evaluator):
    name = "closeness"
    description = "minus the distance of the merged weights to each task's own fine-tune"
    params = (Param("pool", help="the folder of the toy models", type=str),
              Param("hang_once", "", "a file: the first evaluation writes its pid there and sleeps", type=str))

    def tasks(self, params):
        return [TaskInfo(t, "closeness") for t in TASKS]

    def labels(self, task, split, params):
        return [i % 2 for i in range(20)]

    def evaluate(self, model, task, split, subset, params):
        import torch

        if params["hang_once"]:
            try:
                fd = os.open(params["hang_once"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                time.sleep(120)
        merged = _weights(model)
        own = _weights(str(Path(params["pool"]) / task))
        distance = sum(float(torch.linalg.vector_norm(merged[n] - own[n]) ** 2) for n in own) ** 0.5
        return {"closeness": -distance}


@hookimpl
def mk_evaluators():
    return [Closeness()]


def make_models(root: Path) -> dict[str, Path]:
    """A base and three fine-tunes (two layers, a few small tensors) as safetensors folders."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {}
    for i in range(2):
        base[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(6, 6, generator=g)
        base[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(8, 6, generator=g)
    paths = {}
    for name in ("base", *TASKS):
        sd = base if name == "base" else {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        d = root / name
        d.mkdir(parents=True)
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
        paths[name] = d
    return paths
