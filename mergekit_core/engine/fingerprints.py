"""What a run bundle records of its inputs: a sha256 per file, or a size + header fingerprint for
large files (hashing a 140 GB model would double the merge's reading)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergekit_core.engine.plan import MergePlan
from mergekit_core.io.writer import sha256_file

FULL_HASH_LIMIT = 256 * 2**20
"""Input files up to this size get a full sha256; larger ones a fingerprint (size + header hash)
unless ``hash_inputs`` is set: hashing a 140 GB model would double the merge's reading."""


def _fingerprint(path: Path, full: bool) -> dict[str, Any]:
    size = path.stat().st_size
    if full or size <= FULL_HASH_LIMIT:
        return {"size": size, "sha256": sha256_file(path)}
    with path.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        digest = hashlib.sha256(head + f.read(min(length, 100_000_000))).hexdigest()
    return {"size": size, "header_sha256": digest}


def input_hashes(plan: MergePlan, full: bool = False,
                 progress: Callable[..., None] | None = None) -> dict[str, dict[str, Any]]:
    readers = ([plan.base] if plan.base is not None else []) + [s.reader for s in plan.sources]
    files = [p for r in readers for p in r.files()]
    if progress:
        progress("phase", label="hashing inputs", total=len(files))
    out = {}
    for p in files:
        out[str(p)] = _fingerprint(p, full)
        if progress:
            progress("step", name=p.name)
    return out
