"""The merge ``device`` option: config key and ``--device``, checked before anything is read; the
arithmetic on a CUDA GPU equals the CPU's within float32 rounding (run where a GPU is present)."""

from __future__ import annotations

import pytest
import torch

from mergekit_core.config import MergeConfig
from mergekit_core.engine import run_merge
from mergekit_core.errors import ConfigError, UsageError
from mergekit_core.testing import fresh_host, run_mk, write_fine_tunes

HOST = fresh_host(entry_points=True)
SHAPES = {"model.embed_tokens.weight": (64, 16), "model.layers.0.mlp.up_proj.weight": (48, 16),
          "model.layers.0.self_attn.q_proj.weight": (16, 16), "model.norm.weight": (16,)}
HAS_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("device_pool")
    write_fine_tunes(root, SHAPES, ("base", "ft1", "ft2", "ft3"))
    return root


def merge(pool, tmp_path, method, device, **params):
    data = {"method": method, "base_model": str(pool / "base"), "sources": [str(pool / f"ft{i}") for i in (1, 2, 3)],
            "method_params": {"lambda": 0.5, **params}, "device": device, "output_dir": str(tmp_path / "art"),
            "seed": 3, "output": {"dtype": "float32"}}  # compared before any rounding to bf16
    return run_merge(MergeConfig.from_dict(data).to_spec(), HOST, in_memory=True, write_bundle=False).state_dict


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "CPU", 1])
def test_a_bad_device_is_one_config_error(value):
    with pytest.raises(ConfigError, match="device: must be auto, cpu, cuda or cuda:N"):
        MergeConfig.from_dict({"method": "task_arithmetic", "sources": ["a"], "device": value}).to_spec()


def test_device_round_trips_through_the_recorded_config(pool):
    sources = [str(pool / "ft1")]
    spec = MergeConfig.from_dict({"method": "task_arithmetic", "sources": sources, "device": "cuda:1"}).to_spec()
    assert spec.device == "cuda:1"
    assert MergeConfig.from_dict(spec.to_config()).to_spec().device == "cuda:1"
    assert "device" not in MergeConfig.from_dict({"method": "ties", "sources": sources}).to_spec().to_config()


def test_the_flag_is_checked_before_anything_is_written(pool, tmp_path):
    out = tmp_path / "out"
    result = run_mk(["merge", "--method", "ties", "--base", str(pool / "base"), "--sources", str(pool / "ft1"),
                     str(pool / "ft2"), "--out", str(out), "--output-dir", str(tmp_path / "art"), "--device", "tpu"])
    assert result.exit_code != 0
    assert "device: must be auto, cpu, cuda or cuda:N" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.skipif(HAS_GPU, reason="checks the message torch gives without a CUDA GPU")
def test_cuda_without_a_gpu_says_so_and_writes_nothing(pool, tmp_path):
    out = tmp_path / "out"
    result = run_mk(["merge", "--method", "task_arithmetic", "--base", str(pool / "base"), "--sources",
                     str(pool / "ft1"), "--out", str(out), "--output-dir", str(tmp_path / "art"), "--device", "cuda"])
    assert result.exit_code != 0
    assert "device cuda" in result.stderr and "sees no CUDA GPU" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    with pytest.raises(UsageError, match="no CUDA GPU"):
        merge(pool, tmp_path, "ties", "cuda:0")


@pytest.mark.parametrize("method, params", [("task_arithmetic", {}), ("ties", {"trim_scope": "tensor"}),
                                            ("ties", {}), ("dare_ties", {"p": 0.3})])
def test_cpu_and_auto_give_the_same_bits_without_a_gpu(pool, tmp_path, method, params):
    if HAS_GPU:
        pytest.skip("auto picks the GPU here; test_gpu_equals_cpu covers it")
    a = merge(pool, tmp_path, method, "cpu", **params)
    b = merge(pool, tmp_path, method, "auto", **params)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU visible to torch on this machine")
@pytest.mark.parametrize("method, params", [("task_arithmetic", {}), ("ties", {"trim_scope": "tensor"}),
                                            ("ties", {}), ("dare_ties", {"p": 0.3}), ("breadcrumbs_ties", {})])
def test_gpu_equals_cpu(pool, tmp_path, method, params):
    cpu = merge(pool, tmp_path, method, "cpu", **params)
    gpu = merge(pool, tmp_path, method, "cuda", **params)
    for k in cpu:
        assert gpu[k].device.type == "cpu" and gpu[k].dtype == cpu[k].dtype
        torch.testing.assert_close(gpu[k].float(), cpu[k].float(), rtol=1e-6, atol=1e-6, msg=k)
