"""The installed version of mergekit-core (``0.0.0+unknown`` when run from a bare source tree)."""

from __future__ import annotations

import importlib.metadata

try:
    __version__ = importlib.metadata.version("mergekit-core")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"
