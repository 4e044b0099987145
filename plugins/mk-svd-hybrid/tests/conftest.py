from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mergekit_core.testing import fresh_host


@pytest.fixture(scope="session")
def digits_pool(tmp_path_factory) -> Path:
    """A quick digits pool (base, 8 fine-tuned checkpoints, heads), built once per session."""
    from mk_digits.build import BuildSettings, build_pool

    path = tmp_path_factory.mktemp("svd-hybrid") / "pool"
    build_pool(path, BuildSettings.quick())
    return path


@pytest.fixture
def pool(digits_pool, tmp_path) -> Path:
    """A private copy of the pool, so a test may delete the sources."""
    dest = tmp_path / "pool"
    shutil.copytree(digits_pool, dest)
    return dest


@pytest.fixture(scope="session")
def host():
    from mk_digits import plugin as digits_plugin
    from mk_svd_hybrid import plugin

    return fresh_host({"svd_hybrid": plugin, "digits": digits_plugin})


@pytest.fixture
def tasks(digits_pool) -> list[str]:
    return list(json.loads((digits_pool / "pool.json").read_text())["tasks"])
