"""The evaluation index: an append-only JSON list, safe when several processes write at once.

Writers take a file lock (``index.json.lock``), read the list, append, and replace the file
atomically; readers therefore always see a whole, valid JSON document.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from filelock import FileLock

from mergekit_core.errors import FormatError
from mergekit_core.outputs import write_json


def read_index(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, list):
        raise FormatError(f"{path}: the evaluation index is not a JSON list (changed by hand?)",
                          hint="restore it from a backup, or move it away to start a new index")
    return data


def append_index(path: Path, entries: Iterable[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=120):
        data = read_index(path)
        data.extend(entries)
        write_json(path, data)


def find_latest(path: Path, **match: Any) -> dict[str, Any] | None:
    for entry in reversed(read_index(path)):
        if all(entry.get(k) == v for k, v in match.items()):
            return entry
    return None
