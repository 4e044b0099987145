"""Plan, stream and record merges. ``run_merge`` is the single entry point."""

from mergekit_core.engine.run import MergeResult, resolve_components, run_merge

__all__ = ["MergeResult", "resolve_components", "run_merge"]
