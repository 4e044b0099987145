"""The template's tests: the contract helper, the listing, and a real merge checked by hand."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

import mk_scaled_sum.plugin
from mergekit_core.testing import check_merge_method, fresh_host, run_mk
from mk_scaled_sum.plugin import ScaledSum

HOST = fresh_host({"scaled_sum": mk_scaled_sum.plugin})


def test_contract():
    check_merge_method(ScaledSum())  # shapes, dtypes, determinism, linearity, uses the lambdas
    check_merge_method(ScaledSum(), {"scale": 0.5})


def test_listed_and_shown():
    assert HOST.get("merge_method", "scaled_sum").name == "scaled_sum"
    shown = run_mk(["plugins", "show", "scaled_sum", "--json"], host=HOST)
    assert shown.exit_code == 0
    assert [p["name"] for p in json.loads(shown.stdout)[0]["params"]] == ["lambda", "scale"]


def test_a_merge_with_a_lambda_per_task(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=g)}
    paths = {}
    for name, tensors in (("base", base), ("a", {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}),
                          ("b", {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()})):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
        paths[name] = tensors
    config = tmp_path / "merge.yaml"
    config.write_text(f"base_model: {tmp_path / 'base'}\nsources: [{tmp_path / 'a'}, {tmp_path / 'b'}]\n"
                      "method: {name: scaled_sum, params: {scale: 0.5}}\n"
                      "lambda_policy: {name: per_task, params: {lambdas: [1.0, 0.2]}}\n"
                      f"output: {{path: {tmp_path / 'out'}}}\noutput_dir: {tmp_path / 'runs'}\n")
    result = run_mk(["merge", str(config), "-q"], host=HOST)
    assert result.exit_code == 0, result.stderr
    name = "model.layers.0.mlp.up_proj.weight"
    b, a, c = (paths[k][name].double() for k in ("base", "a", "b"))
    expected = b + 0.5 * (1.0 * (a - b) + 0.2 * (c - b))
    torch.testing.assert_close(load_file(tmp_path / "out" / "model.safetensors")[name].double(), expected)
    flags = run_mk(["merge", "--method", "scaled_sum", "--base", str(tmp_path / "base"), "--sources",
                    str(tmp_path / "a"), str(tmp_path / "b"), "--lambda", "0.3", "--out", str(tmp_path / "flags"),
                    "--output-dir", str(tmp_path / "runs"), "-q"], host=HOST)  # the guide's command
    assert flags.exit_code == 0, flags.stderr
    torch.testing.assert_close(load_file(tmp_path / "flags" / "model.safetensors")[name].double(),
                               b + 0.3 * (a - b + c - b))
