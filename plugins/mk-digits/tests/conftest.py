from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory) -> Path:
    """A folder whose ``digits-pool`` is a quick pool (seed 0), built once per session: the
    benchmark run on this folder with ``quick=True`` reuses it."""
    from mk_digits.build import BuildSettings, build_pool

    path = tmp_path_factory.mktemp("digits")
    build_pool(path / "digits-pool", BuildSettings.quick())
    return path


@pytest.fixture(scope="session")
def pool(bench_dir) -> tuple[Path, dict]:
    """The session's quick pool and its pool.json."""
    import json

    path = bench_dir / "digits-pool"
    return path, json.loads((path / "pool.json").read_text())
