from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # helper modules beside the tests (mergekit_pool)


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """Make an installed-looking distribution on sys.path: ``fake_dist(dist, {ep: module}, sources)``.

    A ``NAME-VERSION.dist-info`` folder with ``entry_points.txt`` is all ``importlib.metadata``
    and pluggy need, so loader tests run without pip.
    """
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    created: list[str] = []

    def make(dist: str, entry_points: dict[str, str], sources: dict[str, str], version: str = "0.1"):
        info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[mergekit_core]\n{lines}\n")
        for module, code in sources.items():
            (root / f"{module}.py").write_text(textwrap.dedent(code))
            created.append(module)
        return root

    yield make
    for module in created:
        sys.modules.pop(module, None)


METHOD_PLUGIN = """
from mergekit_core import MergeMethod, hookimpl

class M(MergeMethod):
    name = "{name}"
    description = "test method"
    def merge(self, group, params, state=None):
        return group.tensors[0]

@hookimpl
def mk_merge_methods():
    return [M()]
"""


@pytest.fixture
def method_plugin() -> str:
    """The source of a plugin module with one method; ``.format(name=...)`` names the method."""
    return METHOD_PLUGIN


# --------------------------------------------------------------------------- tiny checkpoints


LAYERS = 3


def _base_tensors(seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(20, 8, generator=g)}
    for i in range(LAYERS):
        t[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(8, 8, generator=g)
        t[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(12, 8, generator=g)
        t[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(8)
    t["model.norm.weight"] = torch.ones(8)
    t["lm_head.weight"] = torch.randn(20, 8, generator=g)
    t["model.rotary.inv_freq_steps"] = torch.arange(4)
    return t


@pytest.fixture
def models(tmp_path):
    """A base and three full fine-tunes (``ft3`` lacks one tensor), as safetensors model dirs.

    Returns ``(paths: dict[name, Path], tensors: dict[name, dict[str, Tensor]])``.
    """
    import json

    import torch
    from safetensors.torch import save_file

    base = _base_tensors()
    out, tensors = {}, {"base": base}
    g = torch.Generator().manual_seed(1)
    for name in ("ft1", "ft2", "ft3"):
        tensors[name] = {k: (v + 0.1 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
                         for k, v in base.items()}
    del tensors["ft3"]["model.layers.2.mlp.up_proj.weight"]
    for name, sd in tensors.items():
        d = tmp_path / name
        d.mkdir()
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
        out[name] = d
    return out, tensors


@pytest.fixture
def lora_adapters(tmp_path, models):
    """Two LoRA adapters on the ``models`` base: ``a`` (r=4, alpha 8) on q_proj of layers 0-1 and
    ``b`` (r=2, rsLoRA, alpha 4) on q_proj of layer 0 and up_proj of layer 1.

    Returns ``(paths, deltas)`` with ``deltas[name][base tensor] = exact dense delta``.
    """
    import json
    import math

    import torch
    from safetensors.torch import save_file

    paths, deltas = {}, {}
    specs = {
        "a": (4, 8.0, False, ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
        "b": (2, 4.0, True, ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]),
    }
    g = torch.Generator().manual_seed(7)
    base = models[1]["base"]
    for name, (r, alpha, rslora, modules) in specs.items():
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        tensors, deltas[name] = {}, {}
        for m in modules:
            out_dim, in_dim = base[f"{m}.weight"].shape
            A = torch.randn(r, in_dim, generator=g) * 0.1
            B = torch.randn(out_dim, r, generator=g) * 0.1
            tensors[f"base_model.model.{m}.lora_A.weight"] = A
            tensors[f"base_model.model.{m}.lora_B.weight"] = B
            deltas[name][f"{m}.weight"] = scale * B @ A
        d = tmp_path / f"adapter_{name}"
        d.mkdir()
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
            "target_modules": ["q_proj", "up_proj"], "base_model_name_or_path": "tiny-base",
        }))
        paths[name] = d
    return paths, deltas
