"""Plan, stream and record merges. ``run_merge`` is the single entry point."""

from mergekit_core.engine.run import MergeResult, prepare_context, resolve_components, run_merge

__all__ = ["MergeResult", "prepare_context", "resolve_components", "run_merge"]
