"""Deterministic evaluation subsets: seeded, optionally shuffled and stratified, cached on disk.

``eval_subset`` in a config::

    eval_subset: {enabled: true, seed: 0, shuffle: true, stratified: true, max_samples: 1000,
                  per_task: {asr: {max_samples: 200}}}

The chosen indices are written to ``<cache>/<task>_<split>_<key>.json`` the first time and read
back afterwards, so every evaluation of a sweep sees the same examples. ``key`` hashes the
effective settings, and results on a subset carry it in their file names, so they never
overwrite full-split metrics.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mergekit_core.components import closest
from mergekit_core.errors import ConfigError
from mergekit_core.outputs import write_json

KEYS = {"enabled", "seed", "shuffle", "stratified", "max_samples", "per_task"}


@dataclass(frozen=True)
class SubsetSpec:
    enabled: bool = True
    seed: int = 0
    shuffle: bool = True
    stratified: bool = True
    max_samples: int | None = None
    per_task: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, raw: Mapping[str, Any] | None) -> SubsetSpec | None:
        if not raw:
            return None
        if not isinstance(raw, Mapping):
            raise ConfigError("eval_subset: must be a mapping (enabled, seed, shuffle, stratified, max_samples, per_task)")
        for key in raw:
            if key not in KEYS:
                guess = closest(key, KEYS)
                raise ConfigError(f"eval_subset: unknown key '{key}'" + (f" (did you mean '{guess}'?)" if guess else ""))
        spec = cls(**{k: raw[k] for k in KEYS - {"per_task"} if k in raw},
                   per_task={str(k): dict(v) for k, v in (raw.get("per_task") or {}).items()})
        for task, override in spec.per_task.items():
            bad = set(override) - (KEYS - {"per_task", "enabled"})
            if bad:
                raise ConfigError(f"eval_subset.per_task.{task}: unknown key '{sorted(bad)[0]}'")
        if spec.max_samples is not None and (not isinstance(spec.max_samples, int) or spec.max_samples < 1):
            raise ConfigError(f"eval_subset.max_samples: must be a positive integer, got {spec.max_samples!r}")
        return spec if spec.enabled else None

    def for_task(self, task: str) -> SubsetSpec:
        return replace(self, **self.per_task.get(task, {}), per_task={})

    def key(self, task: str) -> str:
        eff = asdict(self.for_task(task))
        return "subset-" + hashlib.sha256(json.dumps(eff, sort_keys=True).encode()).hexdigest()[:10]


def _stratified(labels: Sequence[int], n: int, spec: SubsetSpec) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(spec.seed)
    labels_arr = np.asarray(labels)
    classes, counts = np.unique(labels_arr, return_counts=True)
    exact = n * counts / counts.sum()
    quota = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - quota), kind="stable")[: n - quota.sum()]:  # largest remainders
        quota[i] += 1
    chosen: list[int] = []
    for c, q in zip(classes, quota):
        members = np.flatnonzero(labels_arr == c)
        if spec.shuffle:
            members = rng.permutation(members)
        chosen.extend(int(i) for i in members[:q])
    return sorted(chosen)


def subset_indices(spec: SubsetSpec | None, task: str, split: str, labels: Sequence[int] | None,
                   size: int, cache_dir: Path) -> tuple[list[int] | None, str | None]:
    """The example indices to evaluate (None: the whole split) and the subset's key."""
    if spec is None:
        return None, None
    eff = spec.for_task(task)
    key = spec.key(task)
    if eff.max_samples is None or eff.max_samples >= size:
        return None, None
    path = Path(cache_dir) / f"{task}_{split}_{key}.json"
    if path.is_file():
        return json.loads(path.read_text())["indices"], key
    if eff.stratified:
        if labels is None:
            raise ConfigError(f"eval_subset: stratified subsets of task {task} need labels; set stratified: false")
        indices = _stratified(labels, eff.max_samples, eff)
    else:
        import numpy as np

        order = np.random.default_rng(eff.seed).permutation(size) if eff.shuffle else np.arange(size)
        indices = sorted(int(i) for i in order[: eff.max_samples])
    write_json(path, {"task": task, "split": split, "settings": asdict(eff), "indices": indices})
    return indices, key
