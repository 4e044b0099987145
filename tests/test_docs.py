"""Meta-tests: every hook has a documentation page and a test; the README's commands exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mergekit_core.plugins import HOOK_NAMES

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("hook", sorted(HOOK_NAMES))
def test_hook_has_a_page_with_signature_and_example(hook):
    page = ROOT / "docs" / "hooks" / f"{hook}.md"
    assert page.is_file(), f"docs/hooks/{hook}.md is missing"
    text = page.read_text()
    assert f"def {hook}(" in text and "## Example" in text


@pytest.mark.parametrize("hook", sorted(HOOK_NAMES))
def test_hook_is_exercised_by_a_test(hook):
    tests = [p for p in ROOT.glob("tests/test_*.py") if p.name != "test_docs.py"]
    text = "\n".join(p.read_text() for p in tests)
    # by name, or through the KIND_HOOKS table that the parametrised registration test walks
    assert hook in text or "KIND_HOOKS[kind]" in text


def test_hookspecs_are_documented_in_code():
    from mergekit_core import hookspecs

    for hook in HOOK_NAMES:
        doc = getattr(hookspecs, hook).__doc__ or ""
        assert "Example" in doc, f"{hook} needs a docstring with an example"


def test_readme_commands_are_make_targets():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"^make (\w+)", readme, flags=re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"make {target} is not a Makefile target"
    assert "make test" in (ROOT / ".ci" / "run").read_text()
