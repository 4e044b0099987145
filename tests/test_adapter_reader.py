"""PEFT adapter directories built by hand: key mapping, scaling rules, and every bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from mergekit_core.errors import FormatError
from mergekit_core.io.formats import open_checkpoint
from mergekit_core.io.peft_config import pattern_key
from mergekit_core.io.peft_reader import AdapterReader
from mergekit_core.testing import fresh_host, run_mk

HOST = fresh_host()
P = "base_model.model."


def _adapter(path, config, tensors):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def _lora(path, **config):
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"{P}model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 8, generator=g),
        f"{P}model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(6, 4, generator=g),
        f"{P}model.layers.1.self_attn.q_proj.lora_A.weight": torch.randn(2, 8, generator=g),
        f"{P}model.layers.1.self_attn.q_proj.lora_B.weight": torch.randn(6, 2, generator=g),
    }
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"layers.1.self_attn.q_proj": 2},
           "target_modules": ["q_proj"], **config}
    return _adapter(path, cfg, tensors), tensors


def test_lora_keys_scaling_and_numpy_reference(tmp_path):
    path, tensors = _lora(tmp_path / "a", use_rslora=True, alpha_pattern={"q_proj": 6})
    reader = open_checkpoint(path, HOST)
    assert isinstance(reader, AdapterReader) and reader.format_name == "peft_adapter"
    assert set(reader.targets()) == {"model.layers.0.self_attn.q_proj.weight",
                                     "model.layers.1.self_attn.q_proj.weight"}
    m0 = reader.modules["model.layers.0.self_attn.q_proj"]
    m1 = reader.modules["model.layers.1.self_attn.q_proj"]
    assert (m0.rank, m1.rank) == (4, 2)
    assert m0.scale == pytest.approx(6 / math.sqrt(4)) and m1.scale == pytest.approx(6 / math.sqrt(2))
    a = tensors[f"{P}model.layers.1.self_attn.q_proj.lora_A.weight"].numpy()
    b = tensors[f"{P}model.layers.1.self_attn.q_proj.lora_B.weight"].numpy()
    expected = (6 / math.sqrt(2)) * (b @ a)
    got = reader.delta("model.layers.1.self_attn.q_proj.weight").numpy()
    assert abs(got - expected).max() < 1e-5


def test_pattern_key_is_a_suffix_regex():
    assert pattern_key({"q_proj": 1}, "model.layers.0.self_attn.q_proj") == "q_proj"
    assert pattern_key({"layers.1.self_attn.q_proj": 1}, "model.layers.0.self_attn.q_proj") is None
    assert pattern_key({"proj": 1}, "model.layers.0.self_attn.q_proj") is None  # not a substring match
    assert pattern_key({"a": 1, "q_proj": 2}, "x.q_proj") == "q_proj"


def test_inspect_adapter(tmp_path):
    path, _ = _lora(tmp_path / "a")
    info = json.loads(run_mk(["inspect", str(path), "--json"]).stdout)
    assert info["format"] == "peft_adapter" and info["adapter"]["peft_type"] == "LORA"
    assert info["adapter"]["modules"] == 2 and info["tensors"] == 4


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c, t: c.update(peft_type="ADAPTION_PROMPT"), "unsupported peft_type 'ADAPTION_PROMPT'"),
        (lambda c, t: c.pop("peft_type"), "not a PEFT adapter config"),
        (lambda c, t: c.update(peft_type="IA3"), "belongs to a LORA adapter but the config says peft_type IA3"),
        (lambda c, t: c.update(r=8), "has rank 4 but the config gives r=8"),
        (lambda c, t: c.update(use_dora=True), "use_dora is True but lora_magnitude_vector is missing"),
        (lambda c, t: c.update(kasa_config={"x": 1}), "'kasa_config' is set"),
        (lambda c, t: c.update(init_lora_weights="pissa"), "relative to a modified base"),
        (lambda c, t: t.pop(f"{P}model.layers.0.self_attn.q_proj.lora_B.weight"), "has only one of the LoRA factors"),
        (lambda c, t: t.update({f"{P}lm_head.weight": torch.zeros(2)}), "neither a LORA factor nor listed in modules_to_save"),
    ],
)
def test_bad_adapters_are_refused(tmp_path, mutate, message):
    path, tensors = _lora(tmp_path / "a")
    config = json.loads((path / "adapter_config.json").read_text())
    tensors = dict(tensors)
    mutate(config, tensors)
    _adapter(path, config, tensors)
    with pytest.raises(FormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
        open_checkpoint(path, HOST)


def test_adapter_without_weights_and_with_bad_json(tmp_path):
    path, _ = _lora(tmp_path / "a")
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(FormatError, match="adapter weights are missing"):
        open_checkpoint(path, HOST)
    (path / "adapter_config.json").write_text("{oops")
    with pytest.raises(FormatError, match="adapter_config.json is not valid JSON"):
        open_checkpoint(path, HOST)


def test_dora_and_ia3_need_the_base_weight(tmp_path):
    path = _adapter(tmp_path / "ia3", {"peft_type": "IA3", "target_modules": ["k_proj"],
                                       "feedforward_modules": []},
                    {f"{P}layers.0.k_proj.ia3_l": torch.full((6, 1), 2.0)})
    reader = open_checkpoint(path, HOST)
    with pytest.raises(FormatError, match="depends on the base weight; give a base_model"):
        reader.delta("layers.0.k_proj.weight")
    base = torch.ones(6, 3)
    assert torch.equal(reader.delta("layers.0.k_proj.weight", base), base)  # W * (l - 1), l = 2
    assert torch.equal(reader.delta("layers.0.k_proj.bias", torch.full((6,), 3.0)), torch.full((6,), 3.0))
