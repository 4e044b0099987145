"""'pip install a method package' works: build and install the fixture plugin, find it from `mk`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "mk-example-plugin"


def test_pip_installed_plugin_is_listed_and_usable(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIXTURE, src)
    target = tmp_path / "target"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert pip.returncode == 0, pip.stderr
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
