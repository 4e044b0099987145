"""Plan, stream and record merges. ``run_merge`` is the single entry point.

The rooms, one job each (docs/architecture.md draws them): ``resolve`` (components and their
parameters), ``sources`` and ``plan`` (what feeds every output tensor), ``lambdas`` (the
optimizer's choice of lambda), ``merger`` (one tensor: read, deltas, transform, merge),
``stream`` (every tensor in order, reading the next while this one computes), ``adapter_output``
(merged LoRA factors), ``write`` (destination checks, atomic model or adapter output), ``report``
and ``fingerprints`` (what the run bundle records), ``prepare`` (the groups without a merge),
``allocator`` (bounded memory), and ``run`` (the orchestration).
"""

from mergekit_core.engine.prepare import prepare_context
from mergekit_core.engine.resolve import resolve_components
from mergekit_core.engine.run import MergeResult, run_merge

__all__ = ["MergeResult", "prepare_context", "resolve_components", "run_merge"]
