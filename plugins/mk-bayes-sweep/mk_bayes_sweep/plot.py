"""The sweep's PNG: best score so far against evaluations, and for a one-dimensional space the
final GP's mean with a band of two deviations over the observed points. Written only when
matplotlib is installed (``pip install mk-bayes-sweep[plot]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def plot_search(search: Any, result: dict[str, Any], path: Path) -> Path | None:
    """Write ``path`` and return it, or None without matplotlib or without a scored point."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    scores = [r["score"] for r in result["points"] if r.get("score") is not None]
    if not scores:
        return None
    one_d = search.space.numeric_1d and len(search.y) >= 2
    fig, axes = plt.subplots(1, 2 if one_d else 1, figsize=(10 if one_d else 5.5, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(range(1, len(scores) + 1), np.maximum.accumulate(scores), marker="o", ms=3)
    ax.set_xlabel("evaluations")
    ax.set_ylabel(f"best score so far ({result.get('objective', 'worst')})")
    ax.set_title(f"{result['method']}: bayes sweep")
    ax.grid(alpha=0.3)
    if one_d:
        model = search.model()
        entry = search.space.entries[0]
        grid = np.linspace(0.0, 1.0, 200)[:, None]
        mean, sd = model.predict(grid)
        xs = [entry.dim.decode(u) for u in grid]
        ax = axes[0][1]
        ax.plot(xs, mean, label="GP mean")
        ax.fill_between(xs, mean - 2 * sd, mean + 2 * sd, alpha=0.25, label="mean ± 2 sd")
        seen = [search.space.decode(x)[entry.key] for x in search.X]
        ax.scatter(seen, search.y, color="black", s=12, zorder=3, label="evaluated")
        ax.set_xlabel(entry.key)
        ax.set_ylabel("score")
        if entry.dim.log:
            ax.set_xscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
