"""The state of ``mk merge --method svd_hybrid``: each tensor is encoded when the engine hands
over its group, and merged from the record in memory; with ``artifact_dir``, the records are
appended to an artifact written into a temporary sibling directory, which becomes
``artifact_dir`` when the engine reports the merge done (``MergeMethod.finish``) and is removed
when it reports a failure (or, as a last resort, when the session is collected unfinished)."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import torch

from mergekit_core import MergeError, PrepareContext, TensorGroup
from mergekit_core.api import AtomicDirectory
from mk_svd_hybrid.codec import Record
from mk_svd_hybrid.pipeline import Compressor


class _Aborted(Exception):
    """Handed to AtomicDirectory.__exit__ so it removes its temporary directory."""


def _discard(atomic: AtomicDirectory) -> None:
    atomic.__exit__(_Aborted, _Aborted(), None)


class MergeSession:
    def __init__(self, compressor: Compressor, atomic: AtomicDirectory | None, expected: set[str]) -> None:
        self.compressor = compressor
        self.expected = expected
        self._last: tuple[str, Record] | None = None
        self._atomic = atomic
        self._discard = weakref.finalize(self, _discard, atomic) if atomic is not None else None
        """Removes the unfinished artifact if the session is collected (or the process exits)
        before ``finish``: a caller that never reports the end of the merge."""

    def merged_delta(self, group: TensorGroup) -> torch.Tensor:
        if self._last is None or self._last[0] != group.name:  # the engine may merge a tensor again
            try:
                record = self.compressor.add(group)
            except BaseException:
                self.abort()
                raise
            self._last = (group.name, record)
        out = self.compressor.merged_delta(self._last[1], group.coefficients)
        return out.to(group.tensors[0].device) if group.tensors else out

    def finish(self, error: BaseException | None) -> None:
        """The engine's end of the merge: commit the artifact after a merge of every tensor,
        remove it after a failure."""
        if error is not None:
            self.abort()
        elif self._atomic is not None:
            missing = self.expected - self.compressor.encoded
            if missing:  # the engine said done without handing over every tensor: keep nothing half-made
                self.abort()
                raise MergeError(f"svd_hybrid: the merge ended before tensor {sorted(missing)[0]!r} was encoded; "
                                 "the artifact was not written")
            self._commit()

    def _commit(self) -> None:
        assert self._atomic is not None and self._discard is not None
        try:
            self.compressor.finish()
        except BaseException:
            self.abort()
            raise
        self._discard.detach()
        self._atomic.__exit__(None, None, None)
        self._atomic = None

    def abort(self) -> None:
        """Remove the unfinished artifact now (nothing to do without one or once committed)."""
        if self._discard is not None and self._discard.alive:
            self._discard()
        self._atomic = None


def open_merge_session(context: PrepareContext, params: dict[str, Any]) -> MergeSession:
    plan = context.plan
    expected = {t.name for t in plan.tensors if t.action == "merge"} if plan is not None else set()
    if not params["artifact_dir"]:
        return MergeSession(Compressor(context, params), None, expected)
    spec = plan.spec
    inputs = ([spec.base_model] if spec.base_model else []) + [s.path for s in spec.sources]
    atomic = AtomicDirectory(Path(params["artifact_dir"]), inputs=inputs, kind="svd_hybrid_artifact",
                             what="artifact_dir")
    directory = atomic.__enter__()
    try:
        compressor = Compressor(context, params, directory)
    except BaseException:
        _discard(atomic)
        raise
    return MergeSession(compressor, atomic, expected)
