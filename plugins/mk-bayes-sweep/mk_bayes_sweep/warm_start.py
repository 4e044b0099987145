"""Warm start: scored points of earlier sweeps (grid or bayes), fitted without being evaluated again.

``warm_start_sweeps`` names sweep summaries (``sweep_*.json``, what ``mk sweep`` writes): a file,
a directory holding them, or a glob; a list of any of these. A summary is used only when the
fields that make scores comparable match this sweep's (merging-framework-overview.md, "Bayesian
optimization config"): method, sources, merge_mode, split, eval_tasks, constraint_nonnegative.
Every file left out is named with the first field that differs. Points are re-scored with this
sweep's objective from what each record holds (its summary and per-task metrics), so a grid
sweep ranked max-min warms a search for the mean just as well.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_core import ConfigError
from mk_bayes_sweep.space import Space, point_key

MATCH_FIELDS = ("method", "sources", "merge_mode", "split", "eval_tasks", "constraint_nonnegative")


@dataclass
class WarmStart:
    """What the warm start found: ``points`` (point, score) best first, the files ``used``
    (path -> points taken) and the files ``skipped`` (path -> why)."""

    points: list[tuple[dict[str, Any], float]] = field(default_factory=list)
    used: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"points": len(self.points), "used": self.used, "skipped": self.skipped}


def sweep_files(entries: str | Sequence[str], base_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """The summary files ``entries`` name (relative paths from ``base_dir``), and the entries that
    name none (entry -> why). A path that does not exist is an error."""
    files: list[Path] = []
    empty: dict[str, str] = {}
    for entry in [entries] if isinstance(entries, str) else list(entries):
        if not isinstance(entry, str) or not entry:
            raise ConfigError(f"search.warm_start_sweeps: each entry must be a path or a glob, got {entry!r}")
        path = Path(entry).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if any(c in entry for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
            if not found:
                empty[entry] = "the glob matches no file"
            files.extend(found)
        elif path.is_dir():
            found = sorted(path.glob("sweep_*.json"))
            if not found:
                empty[entry] = "no sweep_*.json in this directory yet"
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"search.warm_start_sweeps: {path}: no such file or directory",
                              hint="name a sweep_*.json that mk sweep wrote, its sweeps/ directory, or a glob")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return unique, empty


def read_summary(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"search.warm_start_sweeps: cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"search.warm_start_sweeps: {path} is not JSON ({exc.msg}, line {exc.lineno})",
                          hint="name the sweep_*.json summaries mk sweep writes, not its journal") from None
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise ConfigError(f"search.warm_start_sweeps: {path} is not a sweep summary (no 'points' list)",
                          hint="name the sweep_*.json summaries mk sweep writes")
    return data


def mismatch(summary: Mapping[str, Any], identity: Mapping[str, Any]) -> str | None:
    """Why ``summary`` cannot warm this sweep (the first field that differs), or None."""
    for name in MATCH_FIELDS:
        if name not in summary:
            return f"it does not record {name} (written by an older mk)"
        if summary[name] != identity[name]:
            return f"{name} differs: {summary[name]!r} there, {identity[name]!r} here"
    return None


def load_warm_start(entries: str | Sequence[str] | None, *, identity: Mapping[str, Any],
                    score: Callable[[dict[str, Any]], float | None], space: Space, base_dir: Path,
                    max_points: int | None = None) -> WarmStart:
    """The scored points of the matching summaries that lie in ``space``, best first, at most
    ``max_points``; each point once (the same point in two files counts once)."""
    warm = WarmStart()
    if not entries:
        return warm
    files, empty = sweep_files(entries, base_dir)
    warm.skipped.update(empty)
    found: dict[str, tuple[dict[str, Any], float, str]] = {}
    for path in files:
        summary = read_summary(path)
        why = mismatch(summary, identity)
        if why is not None:
            warm.skipped[str(path)] = why
            continue
        outside = 0
        taken = 0
        for record in summary["points"]:
            point = record.get("point") if isinstance(record, dict) else None
            value = score(record) if isinstance(point, dict) else None
            if value is None:
                continue
            if not space.contains(point):
                outside += 1
                continue
            key = point_key(point)
            if key not in found or value > found[key][1]:
                found[key] = (point, float(value), str(path))
                taken += 1
        if taken == 0:
            warm.skipped[str(path)] = (f"none of its points lies in this search space ({outside} outside it)"
                                       if outside else "it has no scored points")
    ranked = sorted(found.values(), key=lambda t: -t[1])
    if max_points is not None:
        ranked = ranked[:max_points]
    warm.points = [(p, s) for p, s, _ in ranked]
    for _, _, path in ranked:
        warm.used[path] = warm.used.get(path, 0) + 1
    return warm
