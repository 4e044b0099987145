"""mergekit configs with della, della_linear, sce, ram, ramplus_tl, model_stock, multislerp,
karcher, nuslerp and nearswap, translated and merged by mk on tiny Llama models; where mergekit 0.1.5 is installed
(`pip install -e ".[parity]"`), mk's output equals mergekit's within float32 rounding. DELLA's
random drops come from different generators (mk: seeded per tensor and source; mergekit: torch's
global one), so its merges are compared at density 1 here; its masks are compared bit for bit
from the same seeds in plugins/mk-ties/tests/test_della_sce.py."""

from __future__ import annotations

import textwrap

import pytest
import torch
from mergekit_pool import mergekit_merge, mk_merge, tiny_llama_pool

CONFIGS = {
    "della_density_1": """
        models:
          - model: {pool}/math
            parameters: {{weight: 0.7, density: 1.0}}
          - model: {pool}/code
            parameters: {{weight: 0.4, density: 1.0}}
        merge_method: della
        base_model: {pool}/base
        parameters: {{epsilon: 0.1, lambda: 1.2}}
        dtype: float32
    """,
    "della_linear_density_1": """
        models:
          - model: {pool}/math
            parameters: {{weight: 0.7}}
          - model: {pool}/code
            parameters: {{weight: 0.4}}
        merge_method: della_linear
        base_model: {pool}/base
        parameters: {{density: 1.0, normalize: true}}
    """,
    "sce": """
        models:
          - model: {pool}/math
          - model: {pool}/code
          - model: {pool}/chat
        merge_method: sce
        base_model: {pool}/base
        parameters: {{select_topk: 0.4}}
        dtype: float32
    """,
    "model_stock": """
        models:
          - model: {pool}/math
          - model: {pool}/code
          - model: {pool}/chat
        merge_method: model_stock
        base_model: {pool}/base
    """,
    "model_stock_filter_wise": """
        models:
          - model: {pool}/math
          - model: {pool}/code
        merge_method: model_stock
        base_model: {pool}/base
        parameters: {{filter_wise: true}}
    """,
    "multislerp": """
        models:
          - model: {pool}/math
            parameters: {{weight: 0.5}}
          - model: {pool}/code
            parameters: {{weight: 0.3}}
          - model: {pool}/chat
            parameters: {{weight: 0.2}}
        merge_method: multislerp
        base_model: {pool}/base
    """,
    "multislerp_no_base": """
        models:
          - model: {pool}/math
            parameters: {{weight: 1.0}}
          - model: {pool}/code
            parameters: {{weight: 2.0}}
        merge_method: multislerp
    """,
    "karcher": """
        models:
          - model: {pool}/math
          - model: {pool}/code
        merge_method: karcher
        base_model: {pool}/base
        parameters: {{max_iter: 20}}
    """,
    "nuslerp": """
        models:
          - model: {pool}/math
            parameters: {{weight: 0.3}}
          - model: {pool}/code
            parameters: {{weight: 0.7}}
        merge_method: nuslerp
        base_model: {pool}/base
        parameters: {{nuslerp_flatten: false}}
    """,
    "nuslerp_no_base": """
        models:
          - model: {pool}/math
            parameters: {{weight: 1.0}}
          - model: {pool}/chat
            parameters: {{weight: 1.0}}
        merge_method: nuslerp
    """,
    "ram": """
        models:
          - model: {pool}/math
          - model: {pool}/code
          - model: {pool}/chat
        merge_method: ram
        base_model: {pool}/base
        parameters: {{epsilon: 0.02}}
    """,
    "ramplus_tl": """
        models:
          - model: {pool}/math
          - model: {pool}/code
        merge_method: ramplus_tl
        base_model: {pool}/base
        parameters: {{epsilon: 0.015, r: 0.5, alpha: 0.8}}
    """,
    "nearswap": """
        models:
          - model: {pool}/base
          - model: {pool}/math
        merge_method: nearswap
        base_model: {pool}/base
        parameters: {{t: 0.01}}
    """,
}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return tiny_llama_pool(tmp_path_factory.mktemp("llama"))


def write(pool_dir, tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(CONFIGS[name]).format(pool=pool_dir))
    return path


@pytest.mark.parametrize("name", list(CONFIGS))
def test_equals_mergekit(pool, tmp_path, name):
    config = write(pool, tmp_path, name)
    ours = mk_merge(config, tmp_path / "mk")
    assert all(bool(torch.isfinite(t).all()) for t in ours.values())
    theirs = mergekit_merge(config, tmp_path / "mergekit")
    assert set(theirs) == set(ours)
    for key in sorted(theirs):
        assert ours[key].dtype == theirs[key].dtype, key
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_della_with_drops_is_translated_and_merged(pool, tmp_path):
    path = tmp_path / "della.yaml"
    path.write_text(textwrap.dedent(CONFIGS["della_density_1"]).format(pool=pool).replace("density: 1.0",
                                                                                           "density: 0.5"))
    from safetensors.torch import load_file

    merged = mk_merge(path, tmp_path / "mk")
    base = load_file(pool / "base" / "model.safetensors")
    moved = [k for k in base if not torch.equal(merged[k], base[k])]
    assert moved and all(bool(torch.isfinite(merged[k]).all()) for k in base)


@pytest.mark.parametrize("text, key", [
    ("models: [{model: a}, {model: c}]\nmerge_method: nearswap\nbase_model: b", "models: nearswap takes exactly 1"),
    ("models: [{model: a}]\nmerge_method: nearswap\nbase_model: b", "parameters.t: nearswap needs t"),
    ("models: [{model: a, parameters: {weight: 1}}, {model: c, parameters: {weight: 1}}, "
     "{model: d, parameters: {weight: 1}}]\nmerge_method: nuslerp", "models: nuslerp takes exactly 2"),
    ("models: [{model: a}, {model: c}]\nmerge_method: nuslerp", "weight: mergekit needs a weight"),
    ("models: [{model: a}]\nmerge_method: model_stock\nbase_model: b", "model_stock takes at least 2"),
    ("models: [{model: a}, {model: c}]\nmerge_method: sce", "base_model: sce needs base_model"),
    ("models: [{model: a, parameters: {weight: 1, epsilon: 0.1}}, {model: c, parameters: {weight: 1, epsilon: 0.2}}]"
     "\nmerge_method: della\nbase_model: b", "epsilon: mk's della takes one epsilon"),
    ("models: [{model: a}, {model: c}]\nmerge_method: passthrough\nbase_model: b", "merge_method: 'passthrough'"),
])
def test_refusals_name_the_key(text, key):
    import yaml

    from mergekit_core.errors import ConfigError
    from mergekit_core.mergekit_compat import translate

    with pytest.raises(ConfigError) as err:
        translate(yaml.safe_load(text), "cfg.yaml")
    assert err.value.message.startswith("cfg.yaml: ") and key in err.value.message and "\n" not in err.value.message


def test_translations():
    import yaml

    from mergekit_core.mergekit_compat import translate

    c = translate(yaml.safe_load("models: [{model: a, parameters: {weight: 1, density: 0.4}}, "
                                 "{model: c, parameters: {weight: 2, density: 0.6}}]\nmerge_method: della\n"
                                 "base_model: b\nparameters: {epsilon: 0.05}")).config
    assert c["method"] == {"name": "della", "params": {
        "density": [{"values": [0.4, 0.6]}], "scale": 1.0, "rescale": "l1", "epsilon": 0.05, "sign_method": "mass",
        "sign_tie": "positive", "weighted_election": True, "aggregate": "weighted_mean"}}
    k = translate(yaml.safe_load("models: [{model: a}, {model: c}]\nmerge_method: karcher\nbase_model: b"))
    assert [s["path"] for s in k.config["sources"]] == ["a", "c", "b"] and "base_model" not in k.config
    assert any("karcher averages the base" in n for n in k.notes)
