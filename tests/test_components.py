"""Every built-in merge method meets the contract of mergekit_core.testing."""

from __future__ import annotations

import pytest

from mergekit_core.testing import check_merge_method, fresh_host

HOST = fresh_host()


@pytest.mark.parametrize("name", HOST.names("merge_method"))
def test_builtin_method_contract(name):
    check_merge_method(HOST.get("merge_method", name), follows_coefficients=None if name != "uniform" else False)


@pytest.mark.parametrize("kind", ["merge_method", "transform", "lambda_policy", "optimizer",
                                  "search_strategy", "executor", "format", "architecture"])
def test_every_builtin_component_describes_itself(kind):
    for comp in HOST.components(kind):
        info = comp.describe()
        assert info["name"] and info["description"] and info["kind"] == kind
        for p in info["params"]:
            assert p["help"], f"{comp.name}.{p['name']} needs a help line"


def test_a_float_parameter_takes_the_exponent_text_yaml_leaves_1e_3_as():
    from mergekit_core import Param, ParameterError

    p = Param("lr", 1e-3, "learning rate", type=float)
    assert p.check("opt", "1e-3") == 1e-3 and p.check("opt", "2.5E+2") == 250.0
    for bad in ("fast", "1e", "nan"):
        with pytest.raises(ParameterError, match="must be float"):
            p.check("opt", bad)


def test_prepare_context_groups_of_yields_only_the_named_tensors_in_order():
    import torch

    from mergekit_core import TensorGroup
    from mergekit_core.testing import StaticPrepareContext

    groups = [TensorGroup(n, None, torch.zeros(1), [torch.ones(1)], [1.0]) for n in ("a", "b", "c", "d")]
    context = StaticPrepareContext(groups)
    assert [g.name for g in context.groups_of({"d", "b", "x"})] == ["b", "d"]
