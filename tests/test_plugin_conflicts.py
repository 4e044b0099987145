"""Plugins off the happy path: rival entry points, install hints, hints across kinds, debugging."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from mergekit_core import PluginHost
from mergekit_core.components import KIND_HOOKS
from mergekit_core.errors import ComponentConflictError, UnknownComponentError
from mergekit_core.plugins import load_catalog
from mergekit_core.testing import fresh_host, run_mk

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent

# --------------------------------------------------------------------------- rival entry points


def test_two_distributions_with_one_entry_point_name_are_both_listed_as_conflicts(fake_dist, method_plugin):
    fake_dist("mk-one", {"rival": "one_rival"}, {"one_rival": method_plugin.format(name="only_one")})
    fake_dist("mk-two", {"rival": "two_rival"}, {"two_rival": method_plugin.format(name="only_two")})
    host = PluginHost(environ={})
    rows = [e for e in host.listing() if e["name"] == "rival"]
    assert sorted(e["distribution"] for e in rows) == ["mk-one", "mk-two"]
    assert all(e["status"] == "conflict" for e in rows)
    assert all("entry-point name 'rival'" in e["error"] for e in rows)
    for component in ("only_one", "only_two"):
        with pytest.raises(ComponentConflictError) as err:
            host.get("merge_method", component)
        assert "mk-one 0.1" in str(err.value) and "mk-two 0.1" in str(err.value)
        assert "MK_DISABLE_PLUGINS" in err.value.hint
    assert host.get("merge_method", "uniform")
    shown = run_mk(["plugins", "show", "rival"], host=host)
    assert shown.exit_code == 2 and shown.stderr.count("Error:") == 1
    assert "mk-one" in shown.stderr and "mk-two" in shown.stderr


def test_a_rival_can_be_hidden_by_its_distribution_name(fake_dist, method_plugin):
    fake_dist("mk-one", {"rival": "one_rival"}, {"one_rival": method_plugin.format(name="only_one")})
    fake_dist("mk-two", {"rival": "two_rival"}, {"two_rival": method_plugin.format(name="only_two")})
    host = PluginHost(environ={"MK_DISABLE_PLUGINS": "mk-two"})
    assert host.get("merge_method", "only_one").name == "only_one"
    assert [r.status for r in host.records if r.name == "rival"] == ["ok"]


def test_the_same_distribution_visible_twice_loads_once(fake_dist, tmp_path, monkeypatch, method_plugin):
    root = fake_dist("mk-one", {"one": "one_plugin"}, {"one_plugin": method_plugin.format(name="m_one")})
    again = tmp_path / "again"
    again.mkdir()
    info = next(root.glob("*.dist-info"))
    (again / info.name).mkdir()
    for f in info.iterdir():
        (again / info.name / f.name).write_text(f.read_text())
    monkeypatch.syspath_prepend(str(again))
    host = PluginHost(environ={})
    assert [r.status for r in host.records if r.name == "one"] == ["ok"]
    assert host.get("merge_method", "m_one")


def _venv_with(tmp_path: Path, *fixtures: str) -> Path:
    """A fresh virtualenv that sees this environment's packages and has ``fixtures`` pip-installed."""
    venv = tmp_path / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, timeout=60).stdout.strip()
    # The test's own environment (torch, mergekit-core, editable installs) stays visible.
    parents = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (Path(site) / "_parent_env.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in sorted(parents)))
    for f in fixtures:  # built from copies: the build leaves files next to the sources
        shutil.copytree(FIXTURES / f, tmp_path / f)
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--no-index", *(str(tmp_path / f) for f in fixtures)],
        capture_output=True, text=True, timeout=300,
    )
    assert pip.returncode == 0, pip.stderr
    return venv


def test_pip_installed_rivals_are_listed_and_using_them_is_one_error(tmp_path, models):
    venv = _venv_with(tmp_path, "mk-ties-fork", "mk-ties-rival")
    env = {**os.environ, "MK_DISABLE_PLUGINS": "mk-ties"}  # the real mk-ties, when installed, is a third
    env.pop("MK_LOAD_PLUGINS", None)
    mk = [str(venv / "bin" / "python"), "-m", "mergekit_core"]
    listed = subprocess.run([*mk, "plugins", "list", "--json"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    rows = {e["distribution"]: e for e in json.loads(listed.stdout) if e["name"] == "ties"}
    assert set(rows) == {"mk-ties-fork", "mk-ties-rival"}
    assert rows["mk-ties-fork"]["provides"]["merge_method"] == ["ties", "ties_fork_extra"]
    assert rows["mk-ties-rival"]["provides"]["merge_method"] == ["ties", "rival_only"]
    assert {e["status"] for e in rows.values()} == {"conflict"}
    paths, _ = models
    for method in ("ties", "rival_only"):
        merged = subprocess.run(
            [*mk, "merge", "--method", method, "--base", str(paths["base"]), "--sources", str(paths["ft1"]),
             str(paths["ft2"]), "--out", str(tmp_path / f"out_{method}")],
            capture_output=True, text=True, env=env, timeout=120,
        )
        assert merged.returncode == 2, merged.stderr
        errors = [line for line in merged.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, merged.stderr
        assert "mk-ties-fork 1.2.0" in errors[0] and "mk-ties-rival 0.4.0" in errors[0]
        assert "pip install" not in merged.stderr and "Traceback" not in merged.stderr


# --------------------------------------------------------------------------- install hints


def _all_hints() -> list[str]:
    host = fresh_host()
    catalog = load_catalog()
    names = {n for e in catalog.plugins for names in e.provides.values() for n in names} | set(catalog.foreign)
    hints = []
    for name in sorted(names):
        for kind in [*KIND_HOOKS, None]:
            err = host.unknown(name, kind)
            hints.append(f"{err.message} {err.hint or ''}")
    return hints


def test_no_hint_installs_a_name_the_project_does_not_publish():
    published = {e.index for e in load_catalog().plugins if e.index}
    hints = _all_hints()
    assert hints
    for hint in hints:
        for name in re.findall(r"pip install (?!-e )([\w.\-\[\]]+)", hint):
            assert name in published, hint


def test_planned_plugins_are_said_to_be_unavailable_and_ray_is_mk_ray():
    host = fresh_host()
    with pytest.raises(UnknownComponentError) as err:
        host.get("executor", "ray")
    assert "mk-ray" in err.value.hint and "mk-bayes-sweep" not in err.value.hint
    assert "pip install -e plugins/mk-ray" in err.value.hint  # in this repository, not published
    with pytest.raises(UnknownComponentError) as err:
        host.get("optimizer", "adamerging")
    assert "pip install -e plugins/mk-adamerging" in err.value.hint  # in this repository, not published


def test_the_catalog_matches_the_plugins_in_this_repository():
    import tomllib

    host = PluginHost(environ={})
    host.listing()
    for entry in load_catalog().plugins:
        if not entry.source:
            assert not (REPO / "plugins" / entry.distribution).exists(), entry
            continue
        project = tomllib.loads((REPO / entry.source / "pyproject.toml").read_text())["project"]
        assert project["name"] == entry.distribution
        record = next((r for r in host.records if r.distribution == entry.distribution), None)
        if record is None:
            continue  # not installed here; the names cannot be checked
        provided = {k: sorted(v) for k, v in record.provides.items() if v}
        assert provided == {k: sorted(v) for k, v in entry.provides.items()}, entry.distribution


def test_an_installed_plugin_that_failed_is_named_instead_of_an_install(fake_dist):
    # Seen first on sys.path, this mk-ties hides an installed one (one distribution per name).
    fake_dist("mk-ties", {"ties": "broken_ties"}, {"broken_ties": "raise ImportError('no kernels')\n"})
    host = PluginHost(environ={"MK_LOAD_PLUGINS": "mk-ties"})
    with pytest.raises(UnknownComponentError) as err:
        host.get("merge_method", "ties")
    assert "installed but failed to load: ImportError: no kernels" in err.value.hint


# --------------------------------------------------------------------------- hints across kinds and names


def test_a_transform_asked_for_as_a_method_says_how_to_use_it():
    for host in (fresh_host(), PluginHost(environ={})):
        with pytest.raises(UnknownComponentError) as err:
            host.get("merge_method", "dare")
        hint = err.value.hint
        assert "'dare' is a transform, not a merge method" in hint
        assert "transforms: [{name: dare, params: {" in hint and "dare_linear or dare_ties" in hint
        assert "did you mean" not in str(err.value)
    with pytest.raises(UnknownComponentError) as err:
        fresh_host().get("merge_method", "per_layer")
    assert "'per_layer' is a lambda policy, not a merge method" in err.value.hint


@pytest.mark.parametrize(("alias", "ours"), [("linear", "weighted"), ("weighted_average", "weighted"),
                                             ("simple_average", "uniform"), ("task_arithmetic", "task_arithmetic")])
def test_mergekit_and_fusionbench_names_that_match_exactly_are_aliases(alias, ours):
    assert fresh_host().get("merge_method", alias).name == ours


def test_foreign_names_we_lack_say_so_or_map_to_ours():
    host = fresh_host()
    with pytest.raises(UnknownComponentError) as err:
        host.get("merge_method", "arcee_fusion")
    assert "not available in mergekit-core yet" in err.value.hint and "did you mean" not in str(err.value)
    with pytest.raises(UnknownComponentError) as err:
        host.get("merge_method", "ties_merging")
    assert "FusionBench" in err.value.hint and "ties (mk-ties) with params {aggregate: sum, lambda: 0.3}" in err.value.hint


# --------------------------------------------------------------------------- mk plugins show, MK_DEBUG


def test_plugins_show_suggests_a_close_name():
    result = run_mk(["plugins", "show", "slerpp"])
    assert result.exit_code == 2 and "did you mean 'slerp'?" in result.stderr


def test_plugins_show_of_a_broken_plugin_shows_its_status_error_and_traceback(fake_dist):
    fake_dist("mk-broken", {"broken": "broken_plugin"}, {"broken_plugin": "import not_a_module_anywhere\n"})
    host = PluginHost(environ={})
    shown = run_mk(["plugins", "show", "broken"], host=host)
    assert shown.exit_code == 0, shown.stderr
    assert "status: error" in shown.stdout and "No module named 'not_a_module_anywhere'" in shown.stdout
    assert "Traceback" not in shown.stdout and "MK_DEBUG=1" in shown.stdout
    entry = json.loads(run_mk(["plugins", "show", "mk-broken", "--json"], host=host).stdout)[0]
    assert entry["kind"] == "plugin" and entry["status"] == "error"
    debug = run_mk(["plugins", "show", "broken"], host=host, env={"MK_DEBUG": "1"})
    assert "Traceback (most recent call last)" in debug.stdout and "broken_plugin" in debug.stdout
    listed = run_mk(["plugins", "list"], host=host, env={"MK_DEBUG": "1"})
    assert "Traceback (most recent call last)" in listed.stdout
    as_json = json.loads(run_mk(["plugins", "list", "--json"], host=host, env={"MK_DEBUG": "1"}).stdout)
    assert "ModuleNotFoundError" in next(e for e in as_json if e["name"] == "broken")["traceback"]


def test_a_host_built_with_mk_debug_prints_load_tracebacks(fake_dist, capsys):
    fake_dist("mk-broken", {"broken": "broken_plugin"}, {"broken_plugin": "raise RuntimeError('boom')\n"})
    PluginHost(environ={"MK_DEBUG": "1"})
    err = capsys.readouterr().err
    assert "plugin 'broken' (mk-broken) failed" in err and "RuntimeError: boom" in err and "Traceback" in err
    PluginHost(environ={})
    assert "Traceback" not in capsys.readouterr().err


def test_an_unknown_name_mentions_plugins_left_out_by_the_environment():
    from mergekit_core.testing import fresh_host

    host = fresh_host(entry_points=True, environ={"MK_DISABLE_PLUGINS": "mk-digits"})
    result = run_mk(["plugins", "show", "my_thing"], host=host)
    assert result.exit_code == 2
    assert "installed plugins left out by MK_LOAD_PLUGINS / MK_DISABLE_PLUGINS: mk-digits" in result.stderr
