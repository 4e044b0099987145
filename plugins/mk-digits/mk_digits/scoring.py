"""Evaluate backbones on the digit tasks (imports torch)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from mergekit_core import FormatError
from mk_digits.build import BENCHMARK_VERSION, load_heads, pool_version
from mk_digits.data import task_data
from mk_digits.model import Backbone, head_logits


def _pool(pool: str) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """pool.json and the heads, cached until pool.json changes (a pool rebuilt in place)."""
    path = Path(pool)
    if not (path / "pool.json").is_file():
        raise FormatError(f"{path}: not a digits pool (no pool.json); build one with 'mk digits build --out {path}'")
    return _load_pool(str(path), (path / "pool.json").stat().st_mtime_ns)


@lru_cache(maxsize=8)
def _load_pool(path: str, stamp: int) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    meta = json.loads((Path(path) / "pool.json").read_text())
    if pool_version(meta) != BENCHMARK_VERSION:
        raise FormatError(f"{path}: a digits pool of benchmark version {pool_version(meta)}, but this mk-digits "
                          f"scores version {BENCHMARK_VERSION} (other heads); rebuild it with "
                          f"'mk digits build --out {path}'")
    return meta, load_heads(Path(path))


_SKELETON = Backbone()


def _state(model: Any) -> dict[str, torch.Tensor]:
    if isinstance(model, dict):
        return model
    from mergekit_core.api import SafetensorsReader

    reader = SafetensorsReader.from_directory(Path(model))
    return {name: reader.get(name) for name in reader.infos()}


def forward(pool: str, model: Any, task: str, inputs: torch.Tensor) -> torch.Tensor:
    _, heads = _pool(str(pool))
    state = {k: v.float() for k, v in _state(model).items()}
    return head_logits(functional_call(_SKELETON, state, (inputs,)), heads[task])


def labels(pool: str, task: str, split: str) -> list[int]:
    meta, _ = _pool(str(pool))
    return task_data(task, split, meta["settings"]["data_seed"]).y.tolist()


def evaluate(pool: str, model: Any, task: str, split: str, subset: Sequence[int] | None) -> dict[str, float]:
    meta, _ = _pool(str(pool))
    data = task_data(task, split, meta["settings"]["data_seed"])
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    if subset is not None:
        idx = torch.as_tensor(list(subset), dtype=torch.long)
        x, y = x[idx], y[idx]
    with torch.no_grad():
        logits = forward(pool, model, task, x)
    return {"accuracy": float((logits.argmax(-1) == y).float().mean()),
            "loss": float(nn.functional.cross_entropy(logits, y)), "samples": int(len(y))}


def unlabeled_batches(pool: str, task: str, split: str, batch_size: int) -> Iterator[torch.Tensor]:
    for x, _ in labelled_batches(pool, task, split, batch_size):
        yield x


def labelled_batches(pool: str, task: str, split: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    meta, _ = _pool(str(pool))
    data = task_data(task, split, meta["settings"]["data_seed"])
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y).long()
    for start in range(0, len(x), batch_size):
        yield x[start:start + batch_size], y[start:start + batch_size]
