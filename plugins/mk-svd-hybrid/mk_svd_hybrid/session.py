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
from safetensors import SafetensorError

from mergekit_core import ConfigError, MergeError, PrepareContext, TensorGroup
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
        self._where = atomic.dest if atomic is not None else None
        self._discard = weakref.finalize(self, _discard, atomic) if atomic is not None else None
        """Removes the unfinished artifact if the session is collected (or the process exits)
        before ``finish``: a caller that never reports the end of the merge."""

    def merged_delta(self, group: TensorGroup) -> torch.Tensor:
        if self._last is None or self._last[0] != group.name:  # the engine may merge a tensor again
            self._last = (group.name, self._or_abort(self.compressor.add, group))
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
        self._or_abort(self.compressor.finish)
        self._discard.detach()
        self._atomic.__exit__(None, None, None)
        self._atomic = None

    def _or_abort(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)``; on any error the unfinished artifact is removed first, and a failed write
        into it is reported as such."""
        try:
            return fn(*args)
        except (OSError, SafetensorError) as exc:
            self.abort()
            if self._where is None:
                raise
            raise _artifact_error(self._where, exc) from exc
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Remove the unfinished artifact now (nothing to do without one or once committed)."""
        if self._discard is not None and self._discard.alive:
            self._discard()
        self._atomic = None


def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def _artifact_error(directory: Any, exc: BaseException) -> MergeError:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return MergeError(f"svd_hybrid: cannot write the artifact in {directory} ({first})",
                      hint="check the free space and permissions there, or leave artifact_dir out")


def open_merge_session(context: PrepareContext, params: dict[str, Any]) -> MergeSession:
    plan = context.plan
    expected = {t.name for t in plan.tensors if t.action == "merge"} if plan is not None else set()
    if not params["artifact_dir"]:
        return MergeSession(Compressor(context, params), None, expected)
    spec = plan.spec
    artifact = Path(params["artifact_dir"])
    output = getattr(spec.output, "path", None)
    if output is not None and _overlap(artifact, Path(output)):
        raise ConfigError(f"svd_hybrid: artifact_dir {artifact} and the merge's output {output} overlap "
                          "(one is or holds the other)", hint="give the artifact a folder of its own")
    inputs = ([spec.base_model] if spec.base_model else []) + [s.path for s in spec.sources]
    atomic = AtomicDirectory(artifact, inputs=inputs, kind="svd_hybrid_artifact", what="artifact_dir")
    directory = atomic.__enter__()
    try:
        compressor = Compressor(context, params, directory)
    except BaseException:
        _discard(atomic)
        raise
    return MergeSession(compressor, atomic, expected)
