"""What the mergekit parity tests share: a tiny Llama pool, and a merge by mk and by mergekit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mergekit_core.testing import fresh_host, run_mk

HOST = fresh_host(entry_points=True)


def tiny_llama_pool(root: Path) -> Path:
    """A tiny Llama (4 layers, hidden 16, untied head) and three fine-tunes of it (math, code,
    chat), float32, under ``root``."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=4,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base", safe_serialization=True)
    base = load_file(root / "base" / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    for name in ("math", "code", "chat"):
        (root / name).mkdir()
        save_file({k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                  str(root / name / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(root / "base" / "config.json", root / name / "config.json")
    return root


def mk_merge(config: Path, out: Path) -> dict[str, torch.Tensor]:
    """``mk merge CONFIG --out OUT``, which must succeed; the merged tensors."""
    from safetensors.torch import load_file

    done = run_mk(["merge", str(config), "--out", str(out), "--output-dir", str(out.parent / "art"), "-q"], host=HOST)
    assert done.exit_code == 0, done.stderr
    return load_file(out / "model.safetensors")


def mergekit_merge(config: Path, out: Path) -> dict[str, torch.Tensor]:
    """The same config merged by mergekit itself (skips where it is not installed)."""
    pytest.importorskip("mergekit.merge", reason="mergekit is not installed: pip install -e \".[parity]\"")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(config.read_text())), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    theirs = {}
    for f in sorted(out.glob("*.safetensors")):
        theirs.update(load_file(f))
    return theirs
