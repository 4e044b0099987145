"""TIES, DARE and Model Breadcrumbs for mergekit-core.

Public API for other plugins (loaded on first use, so importing the package stays cheap):
``ties_split`` and ``model_trim`` (per-task TIES vectors, what AdaMerging++ learns from).
"""

from __future__ import annotations

from typing import Any

__all__ = ["model_trim", "ties_split"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mk_ties import split

        return getattr(split, name)
    raise AttributeError(f"module 'mk_ties' has no attribute {name!r}")
