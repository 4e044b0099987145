"""The `mk` command: listing, showing, errors in one line, no torch import for help and listing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from mergekit_core.testing import fresh_host, run_mk


def test_plugins_list_table_and_json():
    result = run_mk(["plugins", "list"])
    assert result.exit_code == 0
    assert "builtin" in result.stdout and "task_arithmetic" in result.stdout
    data = json.loads(run_mk(["plugins", "list", "--json"]).stdout)
    builtin = data[0]
    assert set(builtin) >= {"name", "distribution", "version", "provides", "status", "error"}
    assert builtin["status"] == "ok"
    assert "uniform" in builtin["provides"]["merge_method"]


def test_plugins_show_prints_parameters():
    result = run_mk(["plugins", "show", "slerp"])
    assert result.exit_code == 0
    assert "dot_threshold" in result.stdout and "0.9995" in result.stdout
    data = json.loads(run_mk(["plugins", "show", "task_arithmetic", "--json"]).stdout)
    assert data[0]["params"][0]["name"] == "lambda"


def test_unknown_component_is_one_line_with_exit_2():
    result = run_mk(["plugins", "show", "no_such_thing"])
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: no installed component is called 'no_such_thing'")
    assert "Traceback" not in result.stderr
    bad_kind = run_mk(["plugins", "show", "uniform", "--kind", "blender"])
    assert bad_kind.exit_code == 2 and "unknown kind 'blender'" in bad_kind.stderr


def test_broken_plugin_is_listed_and_mk_still_works(fake_dist):
    from mergekit_core import PluginHost

    fake_dist("mk-broken", {"broken": "broken_plugin"}, {"broken_plugin": "import not_a_module_anywhere\n"})
    result = run_mk(["plugins", "list", "--json"], host=PluginHost(environ={}))
    assert result.exit_code == 0
    entry = next(e for e in json.loads(result.stdout) if e["name"] == "broken")
    assert entry["status"] == "error" and "ModuleNotFoundError" in entry["error"]
    assert entry["distribution"] == "mk-broken"
    table = run_mk(["plugins", "list"], host=PluginHost(environ={}))
    assert "error" in table.stdout and table.exit_code == 0


def test_version():
    result = run_mk(["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("mk (mergekit-core) ")


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_help_and_listing_do_not_import_torch():
    code = (
        "import sys\n"
        "from mergekit_core.cli import main\n"
        "for args in (['--help'], ['plugins', 'list'], ['merge', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n"
    )
    proc = _run(code)
    assert proc.stderr.strip().endswith("NO-TORCH"), proc.stderr


def test_debug_shows_traceback_else_one_line():
    code = "from mergekit_core.cli import main\nmain(['plugins', 'show', 'nope'])\n"
    quiet = _run(code, {"MK_DEBUG": "0"})
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert quiet.stderr.count("\n") <= 2
    loud = _run(code, {"MK_DEBUG": "1"})
    assert "Traceback" in loud.stderr and "UnknownComponentError" in loud.stderr


def test_host_is_not_global():
    a, b = fresh_host(), fresh_host()
    assert a.pm is not b.pm


def test_mk_lets_idle_openmp_threads_sleep_unless_the_user_chose():
    import subprocess
    import sys

    code = ("import os, sys; from mergekit_core.cli import quiet_idle_threads; quiet_idle_threads(); "
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "False"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "ACTIVE"


def test_the_mk_process_collects_less_often_and_keeps_main_exit_codes():
    """``python -m mergekit_core`` (what the ``mk`` executable runs) sets the process-wide garbage
    collector threshold; ``main`` called in a process of someone else's leaves it alone."""
    from mergekit_core.cli import YOUNG_COLLECTION_THRESHOLD

    code = ("import gc, sys, runpy\n"
            "sys.argv = ['mk', 'plugins', 'show', 'nope']\n"
            "try:\n"
            "    runpy.run_module('mergekit_core', run_name='__main__')\n"
            "finally:\n"
            "    print('threshold', gc.get_threshold()[0], file=sys.stderr)\n")
    proc = _run(code)
    assert proc.returncode == 2 and f"threshold {YOUNG_COLLECTION_THRESHOLD}" in proc.stderr
    assert "Error:" in proc.stderr and "Traceback" not in proc.stderr
    in_process = _run("import gc, sys\nfrom mergekit_core.cli import main\n"
                      "try:\n    main(['--version'])\nexcept SystemExit as e:\n    print(e.code, gc.get_threshold()[0])\n")
    assert in_process.stdout.split()[-2:] == ["0", "700"]
