"""Run bundles: where a merge records what it did, and the files inside.

A run directory appears whole (it is written under a hidden name first), so a merge that fails
or is killed leaves none behind. ::

    <output_dir>/merged/<method>/<task_combo>/runs/run_<UTC time>_<short id>/
        merge_metadata.json  summary.json  eval_results_<split>.json  [model or adapter files]
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from mergekit_core.config import safe_name
from mergekit_core.io.destination import default_mode


def combo_dir(output_dir: Path, method: str, task_combo: str) -> Path:
    return Path(output_dir) / "merged" / safe_name(method) / safe_name(task_combo)


def new_run_dir(output_dir: Path, method: str, task_combo: str) -> Path:
    """A fresh, unique run directory name (not created: the engine writes it through
    :class:`~mergekit_core.io.destination.AtomicDirectory`, so it appears only when complete)."""
    stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime())
    runs = combo_dir(output_dir, method, task_combo) / "runs"
    while True:
        path = runs / f"run_{stamp}_{secrets.token_hex(4)}"
        if not path.exists():
            return path


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically and durably: a reader, even after a crash or a power loss, sees the
    old file or the new one, never half of one. The file gets the umask's permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, default_mode())
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
