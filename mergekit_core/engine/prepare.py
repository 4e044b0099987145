"""``prepare_context``: the tensor groups a merge would hand its method, for commands that
analyse or compress the sources without merging (``mk svd-hybrid compress``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from mergekit_core.components import PrepareContext
from mergekit_core.config import MergeSpec
from mergekit_core.engine.allocator import bound_allocator
from mergekit_core.engine.lambdas import lambda_values
from mergekit_core.engine.merger import EnginePrepareContext, TensorMerger
from mergekit_core.engine.plan import build_plan
from mergekit_core.engine.resolve import Components, resolve_components
from mergekit_core.engine.run import merged_weights
from mergekit_core.plugins import PluginHost


@contextmanager
def prepare_context(spec: MergeSpec, host: PluginHost) -> Iterator[tuple[PrepareContext, Components]]:
    """The tensor groups a merge of ``spec`` would hand its method, without merging anything.

    For commands that analyse or compress the sources with the engine's reading, transforms and
    lambda policy (``mk svd-hybrid compress``): ``context.groups()`` streams them, one read of the
    sources per call.
    """
    bound_allocator()
    comps = resolve_components(spec, host)
    plan = build_plan(spec, host, comps.method)
    merger: TensorMerger | None = None
    try:
        chosen = lambda_values(plan, comps, host, merged_weights(spec, host))
        merger = TensorMerger(plan, comps.method, comps.params, comps.transforms, comps.policy, chosen,
                              compute_dtype=spec.compute_dtype)
        yield EnginePrepareContext(merger, host), comps
    finally:
        if merger is not None:
            merger.close()
        plan.close()
