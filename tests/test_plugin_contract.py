"""A method or transform that breaks its contract is one named error, never a traceback
(issue 12, item 3): the component, where it comes from, the tensor, and what was wrong."""

from __future__ import annotations

import types

import pytest
import torch

from mergekit_core import MergeMethod, Transform, hookimpl
from mergekit_core.testing import fresh_host, run_mk


class Broken(MergeMethod):
    description = "breaks the contract on purpose"

    def __init__(self, name, result, linear=False, coefficients=None):
        self.name, self.result, self.linear, self.coefficients = name, result, linear, coefficients

    def merge(self, group, params, state=None):
        return self.result(group)

    def linear_coefficients(self, group, params):
        return self.coefficients(group)


class BrokenTransform(Transform):
    name = "returns_none"
    description = "returns nothing"

    def apply(self, name, delta, params, rng):
        return None


METHODS = [
    Broken("gives_list", lambda g: [x.tolist() for x in g.tensors]),
    Broken("gives_wrong_shape", lambda g: g.tensors[0].reshape(-1)),
    Broken("gives_integers", lambda g: g.tensors[0].to(torch.int32)),
    Broken("gives_short_coefficients", lambda g: g.tensors[0], linear=True, coefficients=lambda g: [1.0]),
    Broken("gives_nan_coefficients", lambda g: g.tensors[0], linear=True,
           coefficients=lambda g: [float("nan")] * len(g.source_names)),
]
plugin = types.ModuleType("contract_breakers")
plugin.mk_merge_methods = hookimpl(lambda: METHODS)
plugin.mk_merge_methods.__name__ = "mk_merge_methods"
plugin.mk_transforms = hookimpl(lambda: [BrokenTransform()])
plugin.mk_transforms.__name__ = "mk_transforms"
HOST = fresh_host({"breakers": plugin})


@pytest.mark.parametrize("method,expected", [
    ("gives_list", "returned a list for tensor"),
    ("gives_wrong_shape", "returned shape [160] for tensor lm_head.weight, expected [20, 8]"),
    ("gives_integers", "returned dtype int32"),
    ("gives_short_coefficients", "expected 2 finite numbers, one per source"),
    ("gives_nan_coefficients", "expected 2 finite numbers"),
])
def test_a_method_breaking_its_contract_is_one_named_error(tmp_path, models, method, expected):
    paths, _ = models
    result = run_mk(["merge", "--method", method, "--base", str(paths["base"]), "--sources", str(paths["ft1"]),
                     str(paths["ft2"]), "--out", str(tmp_path / "out"), "--output-dir", str(tmp_path / "art")],
                    host=HOST)
    assert result.exit_code == 1, result.stderr
    assert result.stderr.startswith(f"Error: merge method '{method}' (module {Broken.__module__})")
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_transform_returning_nothing_is_one_named_error(tmp_path, models):
    paths, _ = models
    config = tmp_path / "c.yaml"
    config.write_text(f"base_model: {paths['base']}\nsources: [{paths['ft1']}, {paths['ft2']}]\n"
                      f"method: task_arithmetic\ntransforms: [returns_none]\noutput: {{path: {tmp_path / 'out'}}}\n"
                      f"output_dir: {tmp_path / 'art'}\n")
    result = run_mk(["merge", str(config)], host=HOST)
    assert result.exit_code == 1
    assert f"transform 'returns_none' (module {Broken.__module__}) returned a NoneType for tensor" in result.stderr
    assert "Traceback" not in result.stderr
