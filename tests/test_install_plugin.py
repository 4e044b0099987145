"""'pip install a method package' works: build and install the fixture plugin, find it from `mk`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "mk-example-plugin"


def pip_install(folder: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Copy a plugin folder and install it with pip into its own target; returns (copy, target)."""
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    target = tmp_path / "target"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert pip.returncode == 0, pip.stderr
    return src, target


def test_pip_installed_plugin_is_listed_and_usable(tmp_path):
    _, target = pip_install(FIXTURE, tmp_path)
    assert (target / "mk_example_plugin" / "plugin.py").is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    mk = Path(sys.executable).parent / "mk"
    listed = subprocess.run([str(mk), "plugins", "list", "--json"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    entry = next(e for e in json.loads(listed.stdout) if e["name"] == "example")
    assert entry["distribution"] == "mk-example-plugin" and entry["version"] == "0.3.0"
    assert entry["status"] == "ok" and entry["provides"]["merge_method"] == ["first_source"]
    shown = subprocess.run([str(mk), "plugins", "show", "first_source", "--json"], capture_output=True,
                           text=True, env=env, timeout=120)
    assert json.loads(shown.stdout)[0]["params"][0]["name"] == "scale"
    hidden = subprocess.run([str(mk), "plugins", "show", "first_source"], capture_output=True, text=True,
                            env={**env, "MK_DISABLE_PLUGINS": "mk-example-plugin"}, timeout=120)
    assert hidden.returncode == 2 and "no installed component" in hidden.stderr


TEMPLATE = Path(__file__).resolve().parents[1] / "templates" / "mk-plugin-template"


def test_the_plugin_template_installs_lists_and_passes_its_own_tests(tmp_path):
    """The folder docs/plugin-guide.md walks through, installed as a user would, with its tests."""
    src, target = pip_install(TEMPLATE, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(target)}
    mk = Path(sys.executable).parent / "mk"
    listed = subprocess.run([str(mk), "plugins", "list", "--json"], capture_output=True, text=True, env=env,
                            timeout=120)
    entry = next(e for e in json.loads(listed.stdout) if e["name"] == "scaled_sum")
    assert entry["distribution"] == "mk-scaled-sum" and entry["status"] == "ok"
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(src / "tests")],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "3 passed" in tests.stdout
