from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """Make an installed-looking distribution on sys.path: ``fake_dist(dist, {ep: module}, sources)``.

    A ``NAME-VERSION.dist-info`` folder with ``entry_points.txt`` is all ``importlib.metadata``
    and pluggy need, so loader tests run without pip.
    """
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    created: list[str] = []

    def make(dist: str, entry_points: dict[str, str], sources: dict[str, str], version: str = "0.1"):
        info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[mergekit_core]\n{lines}\n")
        for module, code in sources.items():
            (root / f"{module}.py").write_text(textwrap.dedent(code))
            created.append(module)
        return root

    yield make
    for module in created:
        sys.modules.pop(module, None)
