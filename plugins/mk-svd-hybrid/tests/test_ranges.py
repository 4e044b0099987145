"""Task vectors beyond float16's range (the artifact's storage dtype) are one clear error."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from mergekit_core.testing import run_mk


def test_task_vectors_beyond_fp16_are_named_not_rebuilt_as_nan(tmp_path, host):
    for name, value in (("base", -60000.0), ("a", 60000.0), ("b", 60000.0)):
        (tmp_path / name).mkdir()
        save_file({"model.norm.weight": torch.full((16,), value, dtype=torch.float16),
                   "model.layers.0.mlp.up_proj.weight": torch.ones(8, 16, dtype=torch.float16)},
                  str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "llama"}))
    args = ["merge", "--method", "svd_hybrid", "--base", str(tmp_path / "base"), "--sources", str(tmp_path / "a"),
            str(tmp_path / "b"), "--dtype", "fp32", "--out", str(tmp_path / "out"), "--output-dir", str(tmp_path / "r")]
    result = run_mk(args, host=host)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "model.norm.weight: its task vectors reach 120000, beyond float16's range" in result.stderr
    assert not (tmp_path / "out").exists()
    excluded = run_mk([*args, "--exclude", "model.norm.weight"], host=host)
    assert excluded.exit_code == 0, excluded.stderr
