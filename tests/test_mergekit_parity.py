"""mergekit-style configs (written for these tests, in the shape of mergekit's examples) translated
and merged by mk on tiny Llama models; where mergekit is installed (`pip install -e ".[parity]"`,
the CPU torch pinned first), mk's output equals mergekit 0.1.5's own: bit for bit for TIES and the
sign-consensus methods, within float32 rounding for the others."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from mergekit_pool import mergekit_merge, mk_merge, tiny_llama_pool

CONFIGS = {
    # name: (config with {pool} for the models' folder, exact)
    "ties": ("""
        models:
          - model: {pool}/base
          - model: {pool}/math
            parameters:
              weight: 0.7
              density: 0.3
          - model: {pool}/code
            parameters:
              weight: [0.2, 0.5, 0.9]
              density:
                - filter: self_attn
                  value: 0.5
                - value: 0.2
          - model: {pool}/chat
            parameters:
              weight: 0.4
              density: 0.01
        merge_method: ties
        base_model: {pool}/base
        parameters:
          normalize: true
          int8_mask: true
        dtype: float32
    """, True),
    "ties_sum": ("""
        models:
          - model: {pool}/math
            parameters: {{weight: 1.0, density: 0.6}}
          - model: {pool}/code
            parameters: {{weight: -0.5, density: [0.9, 0.1]}}
        merge_method: ties
        base_model: {pool}/base
        parameters: {{normalize: false, lambda: 0.7}}
    """, True),
    "dare_ties": ("""
        models:
          - model: {pool}/math
            parameters: {{weight: 0.6, density: 1.0}}
          - model: {pool}/code
            parameters: {{weight: 0.3}}
        merge_method: dare_ties
        base_model: {pool}/base
        parameters: {{lambda: 1.3}}
    """, True),
    "breadcrumbs_ties": ("""
        models:
          - model: {pool}/math
            parameters: {{weight: 0.6, density: 0.5}}
          - model: {pool}/code
            parameters: {{weight: 0.3, density: [0.3, 0.9]}}
        merge_method: breadcrumbs_ties
        base_model: {pool}/base
        parameters: {{gamma: 0.05, normalize: true}}
    """, True),
    "breadcrumbs": ("""
        models:
          - model: {pool}/math
            parameters: {{weight: 0.5, density: 0.7}}
          - model: {pool}/chat
            parameters: {{weight: 0.5, density: 0.4}}
        merge_method: breadcrumbs
        base_model: {pool}/base
    """, False),
    "dare_linear": ("""
        models:
          - model: {pool}/math
            parameters: {{weight: 2.0}}
          - model: {pool}/code
            parameters: {{weight: 1.0}}
        merge_method: dare_linear
        base_model: {pool}/base
        parameters: {{normalize: true, density: 1.0}}
    """, False),
    "task_arithmetic": ("""
        models:
          - model: {pool}/math
            parameters:
              weight:
                - filter: mlp
                  value: [0.1, 0.9]
                - value: 0.6
          - model: {pool}/code
            parameters: {{weight: 0.4}}
        merge_method: task_arithmetic
        base_model: {pool}/base
        parameters: {{lambda: 0.8}}
    """, False),
    "task_arithmetic_normalized": ("""
        models:
          - model: {pool}/math
            parameters: {{weight: 3}}
          - model: {pool}/code
            parameters: {{weight: 1}}
        merge_method: task_arithmetic
        base_model: {pool}/base
        parameters: {{normalize: true}}
    """, False),
    "linear": ("""
        models:
          - model: {pool}/math
            parameters: {{weight: 1.0}}
          - model: {pool}/code
            parameters: {{weight: 0.5}}
          - model: {pool}/chat
            parameters: {{weight: 0.5}}
        merge_method: linear
        dtype: float32
    """, False),
    "linear_sum": ("""
        models:
          - model: {pool}/math
            parameters: {{weight: 0.6}}
          - model: {pool}/code
            parameters:
              weight:
                - filter: self_attn
                  value: [0.9, 0.1]
                - value: 0.3
        merge_method: linear
        parameters: {{normalize: false}}
    """, False),
    "slerp_one_slice": ("""
        slices:
          - sources:
              - model: {pool}/base
                layer_range: [0, 4]
              - model: {pool}/code
                layer_range: [0, 4]
        merge_method: slerp
        base_model: {pool}/base
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - value: 0.3
    """, False),
    "slerp": ("""
        models:
          - model: {pool}/base
          - model: {pool}/math
        merge_method: slerp
        base_model: {pool}/base
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: float32
    """, False),
}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return tiny_llama_pool(tmp_path_factory.mktemp("llama"))


def write_config(pool: Path, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(CONFIGS[name][0]).format(pool=pool))
    return path


@pytest.mark.parametrize("name", list(CONFIGS))
def test_translated_and_merged(pool, tmp_path, name):
    merged = mk_merge(write_config(pool, tmp_path, name), tmp_path / "mk")
    from safetensors.torch import load_file

    base = load_file(pool / "base" / "model.safetensors")
    assert set(merged) == set(base)
    assert all(bool(torch.isfinite(t).all()) for t in merged.values())
    moved = sum(float((merged[k] - base[k]).abs().sum()) for k in base)
    assert moved > 0  # every config changes the base


@pytest.mark.parametrize("name", list(CONFIGS))
def test_equals_mergekit(pool, tmp_path, name):
    config = write_config(pool, tmp_path, name)
    theirs = mergekit_merge(config, tmp_path / "mergekit")
    ours = mk_merge(config, tmp_path / "mk")
    assert set(theirs) == set(ours)
    exact = CONFIGS[name][1]
    for key in sorted(theirs):
        assert ours[key].dtype == theirs[key].dtype, key
        if exact:
            assert torch.equal(ours[key], theirs[key]), f"{name}: {key} differs from mergekit's"
        else:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
