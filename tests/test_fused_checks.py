"""A merge skips its pass over the written tensor only where its sums of squares prove every
value finite (the fused linear path and the method path)."""

from __future__ import annotations

import math

import torch

from mergekit_core.engine.merger import Merged
from mergekit_core.engine.stream import finite_by_norms


def test_finite_norms_prove_bfloat16_and_float32_outputs_finite():
    merged = Merged(torch.zeros(1), delta_sq=3.0e38, base_sq=3.0e38)  # |x| up to 1.7e19 each
    assert finite_by_norms(merged, torch.float32, torch.bfloat16)
    assert finite_by_norms(merged, torch.float32, torch.float32)
    largest = 2 * math.sqrt(3.0e38)
    assert math.isfinite(torch.tensor(largest, dtype=torch.bfloat16).item())


def test_float16_outputs_and_non_finite_norms_are_still_checked():
    merged = Merged(torch.zeros(1), delta_sq=1.0, base_sq=1.0)
    assert not finite_by_norms(merged, torch.float32, torch.float16)  # 7e4 overflows float16
    assert not finite_by_norms(merged, torch.float64, torch.bfloat16)  # float64 squares bound less
    assert not finite_by_norms(Merged(torch.zeros(1), 0.0, 0.0, normed=False), torch.float32, torch.bfloat16)
    for bad in (math.inf, math.nan):
        assert not finite_by_norms(Merged(torch.zeros(1), delta_sq=bad, base_sq=1.0), torch.float32, torch.bfloat16)
        assert not finite_by_norms(Merged(torch.zeros(1), delta_sq=1.0, base_sq=bad), torch.float32, torch.bfloat16)


def test_fused_chunks_on_worker_threads_give_the_loop_s_bits(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from mergekit_core.config import MergeConfig
    from mergekit_core.engine import merger as merger_module
    from mergekit_core.engine import run_merge
    from mergekit_core.testing import fresh_host

    monkeypatch.setattr(merger_module, "FUSED_CHUNK", 1000)  # many chunks, a short last one
    g = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (97, 41), "b.weight": (13,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    models = {}
    for name in ("base", "ft1", "ft2"):
        d = tmp_path / name
        d.mkdir()
        models[name] = {k: (v if name == "base" else v + torch.randn(v.shape, generator=g)).to(torch.bfloat16)
                        for k, v in base.items()}
        save_file(models[name], str(d / "model.safetensors"))
    data = {"method": "task_arithmetic", "base_model": str(tmp_path / "base"),
            "sources": [str(tmp_path / "ft1"), str(tmp_path / "ft2")], "method_params": {"lambda": 0.7},
            "output_dir": str(tmp_path / "art")}
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(run_merge(MergeConfig.from_dict(data).to_spec(), fresh_host(), in_memory=True,
                                     write_bundle=False).state_dict)
    finally:
        torch.set_num_threads(threads)
    for k in shapes:
        b = models["base"][k].float()
        want = (b + 0.7 * (models["ft1"][k].float() - b) + 0.7 * (models["ft2"][k].float() - b)).to(torch.bfloat16)
        assert torch.equal(results[0][k], results[1][k])
        torch.testing.assert_close(results[0][k], want, rtol=0.01, atol=0.01)
