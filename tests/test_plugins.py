"""The plugin host: built-ins, entry points, load errors, conflicts, selection, lookup."""

from __future__ import annotations

import pytest

from mergekit_core import MergeMethod, Param, PluginHost
from mergekit_core.errors import (
    ComponentConflictError,
    ParameterError,
    UnknownComponentError,
)
from mergekit_core.testing import fresh_host


def test_builtins_are_registered_through_hooks():
    host = fresh_host()
    assert host.records[0].name == "builtin" and host.records[0].distribution == "mergekit-core"
    for kind, name in [("merge_method", "task_arithmetic"), ("lambda_policy", "per_layer"),
                       ("transform", "identity"), ("optimizer", "none"), ("search_strategy", "grid"),
                       ("executor", "local"), ("format", "peft_adapter"), ("architecture", "generic")]:
        assert host.get(kind, name).name == name
    assert host.get("merge_method", "task_vector").name == "task_arithmetic"  # alias


def test_entry_point_plugin_is_found(fake_dist, method_plugin):
    fake_dist("mk-good", {"good": "good_plugin"}, {"good_plugin": method_plugin.format(name="good_one")})
    host = PluginHost(environ={})
    record = next(r for r in host.records if r.name == "good")
    assert (record.distribution, record.version, record.status) == ("mk-good", "0.1", "ok")
    assert host.get("merge_method", "good_one").description == "test method"
    assert record.provides["merge_method"] == ["good_one"]


def test_plugin_that_raises_on_import_is_recorded_and_others_work(fake_dist, method_plugin):
    fake_dist("mk-broken", {"broken": "broken_plugin"}, {"broken_plugin": "raise RuntimeError('boom')\n"})
    fake_dist("mk-good", {"good": "good_plugin"}, {"good_plugin": method_plugin.format(name="good_one")})
    host = PluginHost(environ={})
    broken = next(r for r in host.records if r.name == "broken")
    assert broken.status == "error" and "RuntimeError: boom" in broken.error
    assert host.get("merge_method", "good_one")
    with pytest.raises(UnknownComponentError) as err:
        host.get("merge_method", "nope")
    assert "broken" in err.value.hint


def test_hook_that_raises_or_returns_junk_marks_only_that_plugin(fake_dist):
    fake_dist("mk-junk", {"junk": "junk_plugin"}, {"junk_plugin": """
        from mergekit_core import hookimpl
        @hookimpl
        def mk_merge_methods():
            return ["not a component"]
        @hookimpl
        def mk_transforms():
            raise ValueError("bad transforms")
    """})
    host = PluginHost(environ={})
    junk = next(e for e in host.listing() if e["name"] == "junk")
    assert junk["status"] == "error"
    assert "mk_merge_methods" in junk["error"] or "mk_transforms" in junk["error"]
    assert host.get("merge_method", "uniform")


def test_unknown_hook_name_is_an_error(fake_dist):
    fake_dist("mk-typo", {"typo": "typo_plugin"}, {"typo_plugin": """
        from mergekit_core import hookimpl
        @hookimpl
        def mk_merge_method():
            return []
    """})
    host = PluginHost(environ={})
    record = next(r for r in host.records if r.name == "typo")
    assert record.status == "error" and "unknown hook mk_merge_method" in record.error
    assert not host.pm.has_plugin("typo")


def test_duplicate_names_conflict_naming_both_distributions(fake_dist, method_plugin):
    fake_dist("mk-one", {"one": "one_plugin"}, {"one_plugin": method_plugin.format(name="dup")})
    fake_dist("mk-two", {"two": "two_plugin"}, {"two_plugin": method_plugin.format(name="dup")})
    host = PluginHost(environ={})
    with pytest.raises(ComponentConflictError) as err:
        host.get("merge_method", "dup")
    assert "mk-one" in str(err.value) and "mk-two" in str(err.value)
    statuses = {e["name"]: e["status"] for e in host.listing()}
    assert statuses["one"] == statuses["two"] == "conflict"
    assert statuses["builtin"] == "ok"
    assert host.get("merge_method", "uniform")  # other names still work


def test_plugin_shadowing_a_builtin_name_conflicts(fake_dist, method_plugin):
    fake_dist("mk-shadow", {"shadow": "shadow_plugin"}, {"shadow_plugin": method_plugin.format(name="uniform")})
    host = PluginHost(environ={})
    with pytest.raises(ComponentConflictError, match="mergekit-core"):
        host.get("merge_method", "uniform")


@pytest.mark.parametrize(
    ("environ", "loaded"),
    [
        ({}, {"one", "two"}),
        ({"MK_LOAD_PLUGINS": ""}, set()),
        ({"MK_LOAD_PLUGINS": "one"}, {"one"}),
        ({"MK_LOAD_PLUGINS": "mk-two"}, {"two"}),
        ({"MK_DISABLE_PLUGINS": "one"}, {"two"}),
        ({"MK_LOAD_PLUGINS": "one,two", "MK_DISABLE_PLUGINS": "mk_two"}, {"one"}),
    ],
)
def test_environment_selects_entry_point_plugins(fake_dist, environ, loaded, method_plugin):
    fake_dist("mk-one", {"one": "one_plugin"}, {"one_plugin": method_plugin.format(name="m_one")})
    fake_dist("mk-two", {"two": "two_plugin"}, {"two_plugin": method_plugin.format(name="m_two")})
    host = PluginHost(environ=environ)
    names = {r.name for r in host.records} - {"builtin"}
    assert names & {"one", "two"} == loaded
    assert host.get("merge_method", "uniform")  # built-ins always load


def test_unknown_component_lists_installed_and_names_the_package():
    host = fresh_host()
    with pytest.raises(UnknownComponentError) as err:
        host.get("merge_method", "ties")
    assert ("installed: karcher, model_stock, multislerp, nearswap, nuslerp, slerp, task_arithmetic, uniform, "
            "weighted, weighted_delta") in str(err.value)
    assert err.value.hint == ("'ties' comes from the mk-ties plugin in this project's plugins/ folder: "
                              "pip install -e plugins/mk-ties from a checkout")
    assert err.value.exit_code == 2
    with pytest.raises(UnknownComponentError, match="did you mean 'uniform'"):
        host.get("merge_method", "unifrom")


class _Scaled(MergeMethod):
    name = "scaled"
    description = "x"
    params = (Param("k", help="required"), Param("scale", 1.0, type=float, min=0.0, max=2.0),
              Param("mode", "a", choices=("a", "b")))


def test_unknown_parameter_lists_the_known_ones():
    with pytest.raises(ParameterError) as err:
        _Scaled().resolve_params({"k": 1, "scael": 1.0})
    msg = str(err.value)
    assert "unknown parameter 'scael'" in msg and "did you mean 'scale'" in msg
    assert "known parameters: k, scale, mode" in msg


def test_missing_and_invalid_parameters():
    m = _Scaled()
    with pytest.raises(ParameterError, match="missing required parameter 'k'; known parameters: k, scale, mode"):
        m.resolve_params({})
    with pytest.raises(ParameterError, match="must be <= 2.0"):
        m.resolve_params({"k": 1, "scale": 3})
    with pytest.raises(ParameterError, match="must be float"):
        m.resolve_params({"k": 1, "scale": "big"})
    with pytest.raises(ParameterError, match="must be one of a, b"):
        m.resolve_params({"k": 1, "mode": "c"})
    assert m.resolve_params({"k": 1, "scale": 2}) == {"k": 1, "scale": 2.0, "mode": "a"}


def test_register_commands_failure_is_contained(fake_dist):
    import typer

    fake_dist("mk-cmd", {"cmd": "cmd_plugin"}, {"cmd_plugin": """
        import typer
        from mergekit_core import hookimpl
        @hookimpl
        def mk_register_commands(app):
            sub = typer.Typer()
            @sub.command()
            def hello():
                print("hello")
            app.add_typer(sub, name="half")
            raise RuntimeError("after adding")
    """})
    host = PluginHost(environ={})
    app = typer.Typer()
    host.register_commands(app)
    assert "half" not in [g.name for g in app.registered_groups]  # what it half-registered is removed
    record = next(r for r in host.records if r.name == "cmd")
    assert record.status == "error" and "after adding" in record.error


def test_register_commands_hands_the_host_to_commands_that_ask(fake_dist):
    import typer

    fake_dist("mk-cmd2", {"cmd2": "cmd2_plugin"}, {"cmd2_plugin": """
        import typer
        from mergekit_core import hookimpl
        SEEN = []
        @hookimpl
        def mk_register_commands(app, host):
            SEEN.append(host)
            app.add_typer(typer.Typer(), name="with-host")
    """})
    host = PluginHost(environ={})
    app = typer.Typer()
    host.register_commands(app)
    import cmd2_plugin

    assert cmd2_plugin.SEEN == [host] and "with-host" in [g.name for g in app.registered_groups]


@pytest.mark.parametrize("kind", sorted(__import__("mergekit_core.components").components.KIND_HOOKS))
def test_every_component_hook_registers_a_third_party_component(kind):
    import types

    from mergekit_core import hookimpl
    from mergekit_core.components import COMPONENT_KINDS, KIND_HOOKS

    hook = KIND_HOOKS[kind]
    component = type("C", (COMPONENT_KINDS[kind],), {"name": f"third_{kind}", "description": "d"})()
    module = types.ModuleType(f"third_party_{kind}")
    impl = hookimpl(lambda: [component])
    impl.__name__ = hook
    setattr(module, hook, impl)
    host = fresh_host({"third": module})
    assert host.get(kind, f"third_{kind}") is component
    assert next(e for e in host.listing() if e["name"] == "third")["provides"][kind] == [f"third_{kind}"]
