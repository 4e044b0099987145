"""The per_pattern lambda policy (tensor-name patterns, per source, gradients across layers), the
rules format it shares with slerp's t and mk-ties' density, and mk's own configs using it."""

from __future__ import annotations

import itertools

import pytest
import torch

from mergekit_core.api import MergeConfig, run_merge
from mergekit_core.builtin import tensor_values
from mergekit_core.builtin.methods import Slerp
from mergekit_core.builtin.policies import PerPattern
from mergekit_core.errors import ParameterError
from mergekit_core.testing import fresh_host, run_mk

LAYERS = [0, 1, 2]
NAMES = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
         "model.layers.2.self_attn.q_proj.weight", "model.layers.2.input_layernorm.weight", "lm_head.weight"]
RULES = [
    {"match": "*self_attn*", "values": [[0.0, 1.0], None]},
    {"match": "*mlp*", "value": 0.7},
    {"values": [0.5, [0.2, 0.4, 0.8]]},
]


def layer_of(name):
    parts = name.split(".")
    return int(parts[2]) if parts[1] == "layers" else None


def resolved(rules, default=None, sources=2):
    policy = PerPattern()
    params = policy.resolve_params({"rules": rules, "default": default})
    values = policy.initial_values(params, sources, LAYERS)
    return policy, values


def test_first_matching_rule_with_a_value_for_the_source_wins():
    policy, values = resolved(RULES)
    got = {(n, t): policy.resolve(n, layer_of(n), t, values) for n in NAMES for t in (0, 1)}
    assert got[("model.layers.0.self_attn.q_proj.weight", 0)] == 0.0
    assert got[("model.layers.2.self_attn.q_proj.weight", 0)] == 1.0
    assert got[("model.layers.2.self_attn.q_proj.weight", 1)] == 0.8  # rule 0 gives source 1 nothing
    assert got[("model.layers.1.mlp.up_proj.weight", 0)] == 0.7
    assert got[("model.layers.1.mlp.up_proj.weight", 1)] == 0.7
    assert got[("model.layers.2.input_layernorm.weight", 0)] == 0.5
    assert got[("model.embed_tokens.weight", 1)] == 0.2  # outside the layers: the gradient's first entry
    assert got[("lm_head.weight", 1)] == 0.2


def test_values_are_the_searchable_state():
    policy, values = resolved(RULES)
    assert values["rule.0.task.0.layer.1@*self_attn*"] == 0.5
    assert "rule.0.task.1@*self_attn*" not in values
    values = dict(values, **{"rule.2.task.1.layer.1": 9.0})  # what an optimizer changes
    assert policy.resolve("model.layers.1.input_layernorm.weight", 1, 1, values) == 9.0


def test_uncovered_tensor_uses_the_default_else_is_one_line():
    policy, values = resolved([{"match": "*mlp*", "value": 0.3}], default=1.5)
    assert policy.resolve("model.norm.weight", None, 0, values) == 1.5
    policy, values = resolved([{"match": "*mlp*", "value": 0.3}])
    with pytest.raises(ParameterError, match="no rule gives source 0 a lambda for tensor model.norm.weight"):
        policy.resolve("model.norm.weight", None, 0, values)


@pytest.mark.parametrize("rules, message", [
    ([{"match": "*", "value": 1, "values": [1, 2]}], "exactly one of 'value'"),
    ([{"filter": "mlp", "value": 1}], "unknown key 'filter'"),
    ([{"value": "half"}], "must be a number or a list of numbers"),
    ([{"value": []}], "an empty list"),
    ([0.5], "a rule is a mapping"),
    ([{"match": 3, "value": 1}], "'match' must be a tensor-name glob"),
])
def test_bad_rules_are_one_line_naming_the_rule(rules, message):
    with pytest.raises(ParameterError, match=message):
        PerPattern().resolve_params({"rules": rules})


def test_values_per_source_must_match_the_sources():
    policy = PerPattern()
    params = policy.resolve_params({"rules": [{"values": [1.0, 2.0]}]})
    with pytest.raises(ParameterError, match="rules\\[0\\].values has 2 entries but there are 3 sources"):
        policy.initial_values(params, 3, LAYERS)


def test_the_rules_resolve_through_the_policy_as_tensor_values_reads_them():
    for name, t in itertools.product(NAMES, (0, 1)):
        b = tensor_values.value_for(RULES, name, layer_of(name), t, LAYERS)
        policy, values = resolved(RULES)
        assert policy.resolve(name, layer_of(name), t, values) == b


def test_slerp_t_by_pattern_and_across_layers():
    s = Slerp()
    params = s.resolve_params({"t": [{"match": "*self_attn*", "value": [0.0, 1.0]}, {"value": 0.5}]})
    from mergekit_core import TensorGroup

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    first = TensorGroup("model.layers.0.self_attn.q_proj.weight", 0, None, [a, b], [1.0, 1.0])
    last = TensorGroup("model.layers.2.self_attn.q_proj.weight", 2, None, [a, b], [1.0, 1.0])
    assert torch.allclose(s.merge(first, params, LAYERS), a) and torch.allclose(s.merge(last, params, LAYERS), b)
    middle = TensorGroup("model.layers.1.mlp.up_proj.weight", 1, None, [a, b], [1.0, 1.0])
    scalar = s.resolve_params({"t": 0.5})
    assert torch.equal(s.merge(middle, params, LAYERS), s.merge(middle, scalar, None))
    with pytest.raises(ParameterError, match="t is one number per tensor"):
        s.resolve_params({"t": [{"values": [0.1, 0.2]}]})
    only_attn = s.resolve_params({"t": [{"match": "*self_attn*", "value": 0.3}]})
    with pytest.raises(ParameterError, match="no rule of t matches tensor model.layers.1.mlp.up_proj.weight"):
        s.merge(middle, only_attn, LAYERS)


def test_per_pattern_in_an_mk_config(tmp_path, models):
    paths, tensors = models
    rules = [{"match": "*mlp*", "values": [0.2, 0.6]}, {"value": [0.1, 0.3, 0.5]}]
    spec = MergeConfig.from_dict({
        "base_model": str(paths["base"]), "sources": [str(paths["ft1"]), str(paths["ft2"])],
        "method": "task_arithmetic", "lambda_policy": {"name": "per_pattern", "params": {"rules": rules}},
        "output_dir": str(tmp_path / "art"),
    }).to_spec()
    merged = run_merge(spec, fresh_host(), in_memory=True).state_dict
    base, ft1, ft2 = tensors["base"], tensors["ft1"], tensors["ft2"]
    for name, (c1, c2) in {"model.layers.1.mlp.up_proj.weight": (0.2, 0.6),
                           "model.layers.1.self_attn.q_proj.weight": (0.3, 0.3),
                           "model.layers.2.self_attn.q_proj.weight": (0.5, 0.5),
                           "model.embed_tokens.weight": (0.1, 0.1)}.items():
        expected = base[name] + c1 * (ft1[name] - base[name]) + c2 * (ft2[name] - base[name])
        torch.testing.assert_close(merged[name], expected)
    listed = run_mk(["plugins", "show", "per_pattern", "--json"])
    assert listed.exit_code == 0 and "rules" in listed.stdout
