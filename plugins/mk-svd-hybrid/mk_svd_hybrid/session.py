"""Where ``mk merge --method svd_hybrid`` keeps its artifact while it merges."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_core import PrepareContext
from mergekit_core.api import AtomicDirectory
from mk_svd_hybrid.pipeline import compress
from mk_svd_hybrid.store import ArtifactReader


@dataclass
class ArtifactSession:
    reader: ArtifactReader
    temporary: Any = None
    """A TemporaryDirectory removed with the session (when no artifact_dir was asked for)."""


def open_artifact_session(context: PrepareContext, params: dict[str, Any]) -> ArtifactSession:
    if params["artifact_dir"]:
        dest = Path(params["artifact_dir"])
        spec = context.plan.spec
        inputs = ([spec.base_model] if spec.base_model else []) + [s.path for s in spec.sources]
        with AtomicDirectory(dest, inputs=inputs, kind="svd_hybrid_artifact", what="artifact_dir") as tmp:
            compress(context, params, tmp)
        return ArtifactSession(ArtifactReader(dest, verify=False))  # just written and hashed
    temporary = tempfile.TemporaryDirectory(prefix="mk-svd-hybrid-")
    compress(context, params, Path(temporary.name))
    return ArtifactSession(ArtifactReader(temporary.name, verify=False), temporary)
