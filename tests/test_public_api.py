"""The public API is one module (issue 12, item 4): every bundled plugin imports ``mergekit_core``
and ``mergekit_core.api`` only (its tests may add ``mergekit_core.testing`` and the ``mk``
entry point ``mergekit_core.cli``), and every public name resolves without importing torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import mergekit_core
import mergekit_core.api as api

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_CODE = sorted(p for p in ROOT.glob("plugins/*/mk_*/**/*.py"))
PLUGIN_TESTS = sorted([*ROOT.glob("plugins/*/tests/**/*.py"), *ROOT.glob("plugins/*/benchmarks/**/*.py"),
                       *ROOT.glob("templates/*/tests/**/*.py"), *ROOT.glob("templates/*/*/**/*.py")])
ALLOWED = {"mergekit_core": set(mergekit_core.__all__), "mergekit_core.api": set(api.__all__)}
ALLOWED_IN_TESTS = {**ALLOWED, "mergekit_core.testing": None, "mergekit_core.cli": {"main"}}


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every ``mergekit_core`` import in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mergekit_core":
            found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "mergekit_core"]
    return found


def violations(paths: list[Path], allowed: dict[str, set[str] | None], root: Path = ROOT) -> list[str]:
    out = []
    for path in paths:
        for line, module, names in imports_of(path):
            where = f"{path.relative_to(root)}:{line}"
            if module not in allowed:
                out.append(f"{where} imports {module}, which is not public API")
                continue
            public = allowed[module]
            out += [f"{where} imports {n} from {module}, which does not export it"
                    for n in names if public is not None and n not in public]
    return out


def test_bundled_plugins_import_only_the_public_api():
    assert PLUGIN_CODE, "no plugin sources found"
    assert violations(PLUGIN_CODE, ALLOWED) == []


def test_bundled_plugin_tests_import_only_the_public_api_and_testing_helpers():
    assert violations(PLUGIN_TESTS, ALLOWED_IN_TESTS) == []


def test_the_boundary_check_catches_a_private_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from mergekit_core.engine.plan import build_plan\nfrom mergekit_core.api import nope\n"
                   "def f():\n    import mergekit_core.io.readers\n")
    found = sorted(violations([bad], ALLOWED, root=tmp_path))
    assert found == ["bad.py:1 imports mergekit_core.engine.plan, which is not public API",
                     "bad.py:2 imports nope from mergekit_core.api, which does not export it",
                     "bad.py:4 imports mergekit_core.io.readers, which is not public API"]


@pytest.mark.parametrize("name", api.__all__)
def test_every_public_name_resolves_and_is_described(name):
    assert getattr(api, name) is not None
    assert api.describe()[name]


def test_importing_the_api_imports_no_torch():
    code = ("import sys, mergekit_core, mergekit_core.api as a; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'mergekit_core.engine' not in sys.modules; print(len(a.__all__))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == len(api.__all__)


def test_the_plugin_guide_lists_every_public_name():
    guide = (ROOT / "docs" / "plugin-guide.md").read_text()
    assert [n for n in api.__all__ if f"| `{n}` |" not in guide] == []


def test_check_merge_method_catches_a_method_that_ignores_lambda():
    from mergekit_core import MergeMethod
    from mergekit_core.testing import check_merge_method

    class Halve(MergeMethod):  # the old tutorial's method: half the sum, whatever the lambdas
        name, description = "halve", "half of the sum"

        def merge(self, group, params, state=None):
            return sum(group.tensors) * 0.5

    with pytest.raises(AssertionError, match="ignores group.coefficients"):
        check_merge_method(Halve())
    check_merge_method(Halve(), follows_coefficients=False)
