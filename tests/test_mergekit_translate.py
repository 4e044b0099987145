"""mergekit configs translated into mk's (mergekit_core.mergekit_compat): the mapping key by key,
the refusals (one line naming the key), `mk merge --dry-run` and `mk config convert`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from mergekit_core.api import MergeConfig
from mergekit_core.errors import ConfigError
from mergekit_core.mergekit_compat import looks_like_mergekit, translate
from mergekit_core.testing import fresh_host, run_mk


def tr(text: str, **kw):
    return translate(yaml.safe_load(textwrap.dedent(text)), "cfg.yaml", **kw)


TIES = """
    models:
      - model: org/base
      - model: org/math
        parameters: {weight: 0.6, density: [0.2, 0.8]}
      - model: org/code
        parameters:
          weight:
            - {filter: self_attn, value: 0.3}
            - {value: 0.5}
          density: 0.4
    merge_method: ties
    base_model: org/base
    parameters: {normalize: true, int8_mask: true, lambda: 1.2}
    dtype: bfloat16
"""


def test_ties_key_by_key():
    t = tr(TIES)
    c = t.config
    assert c["sources"] == [{"name": "math", "path": "org/math"}, {"name": "code", "path": "org/code"}]
    assert c["base_model"] == "org/base"
    assert c["method"] == {"name": "ties", "params": {
        "density": [{"values": [[0.2, 0.8], 0.4]}], "scale": 1.2, "sign_method": "mass", "sign_tie": "positive",
        "weighted_election": True, "aggregate": "weighted_mean", "trim_scope": "tensor", "min_kept": 1}}
    assert c["lambda_policy"] == {"name": "per_pattern", "params": {"rules": [
        {"values": [0.6, None]}, {"match": "*self_attn*", "values": [None, 0.3]}, {"values": [None, 0.5]}]}}
    assert c["output"] == {"dtype": "bfloat16"} and "compute_dtype" not in c
    assert any("int8_mask" in n for n in t.notes) and any("computes in bfloat16" in n for n in t.notes)
    assert any("base model is also listed" in n for n in t.notes)
    MergeConfig.from_dict(c)  # mk's schema accepts it


@pytest.mark.parametrize("method, expected", [
    ("dare_ties", {"aggregate": "sum", "rescale": "l1", "weighted_election": True}),
    ("breadcrumbs_ties", {"aggregate": "sum", "beta": 0.01, "weighted_election": True}),
    ("dare_linear", {"normalize": False, "rescale": "l1"}),
    ("breadcrumbs", {"normalize": False, "beta": 0.01}),
])
def test_defaults_of_each_task_vector_method(method, expected):
    c = tr(f"""
        models: [{{model: a, parameters: {{weight: 1.0}}}}, {{model: b, parameters: {{weight: 0.5}}}}]
        merge_method: {method}
        base_model: base
    """).config
    params = c["method"]["params"]
    assert c["method"]["name"] == method and params["density"] == 1.0  # mergekit's default keeps everything
    assert {k: params[k] for k in expected} == expected
    assert c["lambda_policy"] == {"name": "per_task", "params": {"lambdas": [1.0, 0.5]}}


def test_task_arithmetic_folds_lambda_into_the_weights_and_linear_has_no_base():
    c = tr("""
        models: [{model: a, parameters: {weight: [0.5, 1.0]}}, {model: b, parameters: {weight: 0.25}}]
        merge_method: task_arithmetic
        base_model: base
        parameters: {lambda: 2.0}
    """).config
    assert c["method"] == {"name": "task_arithmetic", "params": {}}
    assert c["lambda_policy"]["params"]["rules"] == [{"values": [[1.0, 2.0], 0.5]}]
    c = tr("""
        models: [{model: a, parameters: {weight: 2}}, {model: b, parameters: {weight: 1}}]
        merge_method: linear
        parameters: {normalize: false}
    """).config
    assert c["method"] == {"name": "weighted", "params": {"normalize": False}} and "base_model" not in c
    c = tr("""
        models: [{model: a, parameters: {weight: 2}}]
        merge_method: linear
        base_model: base
        parameters: {weight: 0.5}
    """).config
    assert [s["path"] for s in c["sources"]] == ["a", "base"]  # mergekit merges the base as one more input
    assert c["lambda_policy"] == {"name": "per_task", "params": {"lambdas": [2.0, 0.5]}}


def test_slerp_t_with_filters_and_gradients():
    c = tr("""
        models: [{model: base}, {model: other}]
        merge_method: slerp
        base_model: base
        parameters:
          t:
            - {filter: self_attn, value: [0, 0.5, 1]}
            - {filter: mlp, value: [1, 0.5, 0]}
            - {value: 0.5}
    """).config
    assert [s["path"] for s in c["sources"]] == ["base", "other"]
    assert c["method"] == {"name": "slerp", "params": {"t": [
        {"match": "*self_attn*", "value": [0.0, 0.5, 1.0]}, {"match": "*mlp*", "value": [1.0, 0.5, 0.0]},
        {"value": 0.5}]}}


def test_global_and_per_model_values_keep_mergekits_precedence():
    c = tr("""
        models:
          - model: a
            parameters: {weight: [{filter: mlp, value: 2.0}]}
          - model: b
        merge_method: task_arithmetic
        base_model: base
        parameters: {weight: 1.0, density: 0.5}
    """)
    assert c.config["lambda_policy"]["params"]["rules"] == [{"match": "*mlp*", "values": [2.0, None]}, {"value": 1.0}]
    assert any("task_arithmetic does not read it" in n for n in c.notes)  # density, as mergekit ignores it


def test_filters_are_escaped_substrings():
    c = tr("""
        models: [{model: a, parameters: {weight: [{filter: "q[1]*", value: 1}, {value: 2}]}}]
        merge_method: task_arithmetic
        base_model: base
    """).config
    assert c["lambda_policy"]["params"]["rules"][0]["match"] == "*q[[]1][*]*"


@pytest.mark.parametrize("text, key", [
    ("slices: [{sources: [{model: a, layer_range: [0, 4]}]}]\nmerge_method: linear", "slices"),
    ("models: [{model: a}]\nmerge_method: passthrough", "merge_method: 'passthrough' has no mk equivalent"),
    ("models: [{model: a}]\nmerge_method: arcee_fusion\nbase_model: b", "merge_method: 'arcee_fusion'"),
    ("models: [{model: a}]\nmerge_method: ties\nbase_model: b\ntokenizer_source: union", "tokenizer_source"),
    ("models: [{model: a}]\nmerge_method: ties\nbase_model: b\ntokenizer: {source: base}", "tokenizer:"),
    ("models: [{model: a, parameters: {weight: 1}}]\nmerge_method: ties", "base_model: ties merges task vectors"),
    ("models: [{model: a+lora, parameters: {weight: 1}}]\nmerge_method: ties\nbase_model: b", "models[0].model"),
    ("models: [{model: a, parameters: {wieght: 1}}]\nmerge_method: ties\nbase_model: b",
     "models[0].parameters.wieght: not a parameter"),
    ("models: [{model: a, parameters: {weight: [{filter: mlp, value: 1}]}}]\nmerge_method: ties\nbase_model: b",
     "models[0].parameters.weight: mergekit needs a weight for every tensor"),
    ("models: [{model: a, parameters: {weight: 1}}]\nmerge_method: ties\nbase_model: b\nparameters: {lambda: [1, 2]}",
     "parameters.lambda: mk takes one value"),
    ("models: [{model: a, parameters: {weight: 1}}]\nmerge_method: ties\nbase_model: b\nparameters: {rescale: true}",
     "parameters.rescale"),
    ("models: [{model: a, parameters: {weight: 1}}]\nmerge_method: ties\nbase_model: b\nname: x", "name: not a key"),
    ("models: [{model: a}, {model: c}, {model: b}]\nmerge_method: slerp\nbase_model: b\nparameters: {t: 0.5}",
     "models: slerp takes the base and exactly one other model"),
    ("models: [{model: a, parameters: {weight: 1}}]\nmerge_method: ties\nbase_model: b\ndtype: int4", "dtype"),
])
def test_what_has_no_equivalent_is_one_line_naming_the_key(text, key):
    with pytest.raises(ConfigError) as err:
        translate(yaml.safe_load(text), "cfg.yaml")
    assert err.value.message.startswith("cfg.yaml: ") and key in err.value.message
    assert "\n" not in err.value.message


def test_one_slice_over_every_layer_is_read_as_models(tmp_path, models):
    paths, _ = models  # 3 layers each
    text = f"""
        slices:
          - sources:
              - {{model: {paths['ft1']}, layer_range: [0, LAST], parameters: {{weight: 0.3}}}}
              - {{model: {paths['ft2']}, layer_range: [0, LAST]}}
            parameters:
              weight: [{{filter: mlp, value: 0.9}}]
        merge_method: task_arithmetic
        base_model: {paths['base']}
        parameters: {{weight: 0.5}}
    """
    for p in (paths["ft1"], paths["ft2"]):
        (p / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 3}')
    t = tr(text.replace("LAST", "3"))
    assert [s["path"] for s in t.config["sources"]] == [str(paths["ft1"]), str(paths["ft2"])]
    assert t.config["lambda_policy"]["params"]["rules"] == [  # model, then slice, then global entries
        {"values": [0.3, None]}, {"match": "*mlp*", "value": 0.9}, {"value": 0.5}]
    assert any("one slice over all 3 layers" in n for n in t.notes)
    with pytest.raises(ConfigError, match="layer_range \\[0, 2\\] of .* is not its 3 layers"):
        tr(text.replace("LAST", "2"))
    two = yaml.safe_load(textwrap.dedent(text.replace("LAST", "3")))
    two["slices"].append(two["slices"][0])
    with pytest.raises(ConfigError, match="slices: mk merges whole models"):
        translate(two, "cfg.yaml")


def test_detection():
    assert looks_like_mergekit({"merge_method": "ties"})
    assert looks_like_mergekit({"models": [{"model": "a"}]})
    assert not looks_like_mergekit({"models": ["a", "b"], "method": "uniform"})
    assert not looks_like_mergekit({"sources": [{"name": "a", "path": "p"}]})


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_mk_merge_dry_run_prints_the_translation(tmp_path, models):
    paths, _ = models
    cfg = _write(tmp_path / "mergekit.yaml", f"""
        models:
          - model: {paths['ft1']}
            parameters: {{weight: 0.6, density: 0.5}}
          - model: {paths['ft2']}
            parameters: {{weight: 0.4, density: 0.5}}
        merge_method: ties
        base_model: {paths['base']}
        parameters: {{int8_mask: true}}
    """)
    done = run_mk(["merge", str(cfg), "--dry-run", "--output-dir", str(tmp_path / "art")],
                  host=fresh_host(entry_points=True))
    assert done.exit_code == 0, done.stderr
    assert "# mk's config for mergekit's mergekit.yaml" in done.stdout and "weighted_election: true" in done.stdout
    assert "note: parameters.int8_mask: ignored" in done.stdout and "dry run: ties of 2 sources" in done.stdout


def test_mk_config_convert_writes_a_config_mk_merges(tmp_path, models):
    paths, tensors = models
    cfg = _write(tmp_path / "mk.yaml", f"""
        models:
          - model: {paths['ft1']}
            parameters: {{weight: 0.25}}
          - model: {paths['ft2']}
            parameters: {{weight: 0.75}}
        merge_method: linear
        dtype: float32
    """)
    out = tmp_path / "converted" / "merge.yaml"
    done = run_mk(["config", "convert", str(cfg), str(out)])
    assert done.exit_code == 0 and f"wrote {out}" in done.stdout
    again = run_mk(["config", "convert", str(cfg), str(out)])
    assert again.exit_code == 2 and "exists; pass --force" in again.stderr
    assert run_mk(["config", "convert", str(cfg), str(out), "--force"]).exit_code == 0
    same = run_mk(["config", "convert", str(cfg), str(cfg)])
    assert same.exit_code == 2 and "is the input config" in same.stderr and cfg.read_text().startswith("\nmodels")
    merged = run_mk(["merge", str(out), "--out", str(tmp_path / "merged"), "--output-dir", str(tmp_path / "art"),
                     "-q"])
    assert merged.exit_code == 0, merged.stderr
    from safetensors.torch import load_file

    got = load_file(tmp_path / "merged" / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    expected = 0.25 * tensors["ft1"][name] + 0.75 * tensors["ft2"][name]
    assert (got[name] - expected).abs().max() < 1e-6


@pytest.mark.parametrize("text, message", [
    ("models: [{model: a}]\nmerge_method: passthrough\n", "merge_method: 'passthrough' has no mk equivalent"),
    ("sources: [a]\nmethod: uniform\n", "not a mergekit config"),
])
def test_mk_config_convert_errors_are_one_line(tmp_path, text, message):
    cfg = _write(tmp_path / "in.yaml", text)
    done = run_mk(["config", "convert", str(cfg), str(tmp_path / "out.yaml")])
    assert done.exit_code == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out.yaml").exists()
    merge = run_mk(["merge", str(cfg), "--dry-run"])
    assert merge.exit_code == 2 and len(merge.stderr.strip().splitlines()) <= 2


def test_the_example_mergekit_config_runs_on_the_demo_pool(tmp_path, monkeypatch):
    from mergekit_core.demo import build_pool

    config = Path(__file__).resolve().parents[1] / "configs" / "mergekit" / "ties.yaml"
    build_pool(tmp_path / "demo-output" / "pool")
    monkeypatch.chdir(tmp_path)  # mergekit reads relative model paths from the working directory
    done = run_mk(["merge", str(config), "--out", str(tmp_path / "out"), "--output-dir", str(tmp_path / "art")],
                  host=fresh_host(entry_points=True))
    assert done.exit_code == 0, done.stderr
    assert "note: parameters.int8_mask: ignored" in done.stderr and "merged" in done.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()
