"""Adapters made by `peft` itself: our dense deltas match `merge_and_unload()`, and the LoRA
adapters we write load in `peft` and give the outputs of the deltas they were written from."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft", reason="interop tests need the test extra (pip install -e '.[test]')")
transformers = pytest.importorskip("transformers", reason="interop tests need the test extra")

from torch import nn  # noqa: E402

from mergekit_core.io.lowrank import concat_factors, factored_svd_truncate, svd_truncate  # noqa: E402
from mergekit_core.io.peft_reader import AdapterReader  # noqa: E402
from mergekit_core.io.peft_writer import LoraModuleOut, write_lora_adapter  # noqa: E402

ATOL = 1e-5


class Tiny(nn.Module):
    """Linear (with and without bias), embedding and conv layers, nested like a real model."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 16)
        self.block = nn.ModuleDict({
            "q_proj": nn.Linear(16, 24),
            "up_proj": nn.Linear(16, 32, bias=False),
            "down_proj": nn.Linear(32, 16),
        })
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = self.block["down_proj"](torch.relu(self.block["up_proj"](h))) + self.block["q_proj"](h)[..., :16]
        return self.head(h)


def _base(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().eval()


def _perturb_adapter(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _make_adapter(tmp_path, config, name: str, seed: int = 1, base_factory=_base):
    base = base_factory()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = peft.get_peft_model(base, config)
    _perturb_adapter(model, seed)
    path = tmp_path / name
    model.save_pretrained(path)
    merged = model.merge_and_unload().state_dict()
    return path, base_state, merged


def _assert_deltas_match(path, base_state, merged):
    reader = AdapterReader(path)
    targets = reader.targets()
    assert targets, "the adapter changes nothing?"
    changed = {k for k in base_state if not torch.equal(base_state[k], merged[k])}
    assert changed <= set(targets) | set(reader.replacements), changed - set(targets)
    for name in targets:
        if name not in base_state:
            continue  # e.g. an IA3 bias entry where the module has no bias
        delta = reader.delta(name, base_state[name])
        expected = merged[name].float() - base_state[name].float()
        torch.testing.assert_close(delta, expected, atol=ATOL, rtol=1e-5, msg=f"delta of {name}")
    return reader


LORA_TARGETS = ["q_proj", "up_proj", "down_proj", "embed", "conv"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"r": 4, "lora_alpha": 8},
        {"r": 4, "lora_alpha": 8, "use_rslora": True},
        {"r": 4, "lora_alpha": 8, "rank_pattern": {"up_proj": 2, "block.down_proj": 6},
         "alpha_pattern": {"q_proj": 3}},
        {"r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"conv": 2}},
        {"r": 4, "lora_alpha": 8, "use_dora": True},
        {"r": 4, "lora_alpha": 8, "lora_bias": True},
    ],
    ids=["lora", "rslora", "rank_alpha_patterns", "rslora_pattern", "dora", "lora_bias"],
)
def test_lora_family_delta_matches_merge_and_unload(tmp_path, kwargs):
    targets = LORA_TARGETS if not kwargs.get("lora_bias") else ["q_proj", "down_proj"]
    config = peft.LoraConfig(target_modules=targets, init_lora_weights=False, **kwargs)
    _assert_deltas_match(*_make_adapter(tmp_path, config, "a"))


def test_modules_to_save_is_a_replacement_never_dropped(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["head"],
                             init_lora_weights=False)
    path, base_state, merged = _make_adapter(tmp_path, config, "a")
    reader = _assert_deltas_match(path, base_state, merged)
    assert set(reader.replacements) == {"head.weight", "head.bias"}
    for name, key in reader.replacements.items():
        torch.testing.assert_close(reader.get_raw(key), merged[name])


def test_ia3_delta_matches(tmp_path):
    config = peft.IA3Config(target_modules=["q_proj", "up_proj", "down_proj", "conv"],
                            feedforward_modules=["down_proj", "up_proj"])
    path, base_state, merged = _make_adapter(tmp_path, config, "ia3")
    reader = _assert_deltas_match(path, base_state, merged)
    assert "block.q_proj.bias" in reader.targets()  # non-feedforward IA3 scales the bias too


@pytest.mark.parametrize(
    "config_factory",
    [
        lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "up_proj", "down_proj"],
                                decompose_both=True),
        lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=["q_proj", "conv"], use_effective_conv2d=True),
        lambda: peft.LoKrConfig(r=8, alpha=8, target_modules=["up_proj"], rank_pattern={"up_proj": 4},
                                alpha_pattern={"up_proj": 6}),
        lambda: peft.LoHaConfig(r=3, alpha=6, target_modules=["q_proj", "down_proj", "conv"]),
        lambda: peft.LoHaConfig(r=2, alpha=5, target_modules=["q_proj", "conv"], use_effective_conv2d=True),
    ],
    ids=["lokr", "lokr_conv_t2", "lokr_patterns", "loha", "loha_cp_conv"],
)
def test_lokr_and_loha_delta_matches(tmp_path, config_factory):
    _assert_deltas_match(*_make_adapter(tmp_path, config_factory(), "x"))


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_fan_in_fan_out_conv1d(tmp_path, use_dora):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                             use_dora=use_dora, init_lora_weights=False)
    _assert_deltas_match(*_make_adapter(tmp_path, config, "g", base_factory=_gpt2))


def test_ia3_fan_in_fan_out(tmp_path):
    config = peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                            fan_in_fan_out=True)
    _assert_deltas_match(*_make_adapter(tmp_path, config, "g", base_factory=_gpt2))


# --------------------------------------------------------------------------- writing adapters


def _load_written(path):
    base = _base()
    model = peft.PeftModel.from_pretrained(base, path)
    return model


def test_concatenated_adapter_loads_in_peft_and_is_exact(tmp_path):
    """Two LoRA adapters of different ranks and scalings, merged by concatenation with weights."""
    a_path, base_state, _ = _make_adapter(
        tmp_path, peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False), "a")
    b_path, _, _ = _make_adapter(
        tmp_path, peft.LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=LORA_TARGETS,
                                  init_lora_weights=False), "b", seed=2)
    readers = [AdapterReader(a_path), AdapterReader(b_path)]
    weights = [0.7, -0.4]
    modules = []
    expected: dict[str, torch.Tensor] = {}
    for path, mod in readers[0].modules.items():
        shape = tuple(base_state[mod.weight_name].shape)
        factors = [r.lora_factors(r.modules[path], shape) for r in readers]
        B, A = concat_factors([(f.B, f.A) for f in factors], [w * f.scale for w, f in zip(weights, factors)])
        layer = "embedding" if factors[0].transpose else ("conv" if len(shape) > 2 else "linear")
        if layer == "conv":
            A = A.reshape(A.shape[0], *shape[1:])
            B = B.reshape(*B.shape, *([1] * (len(shape) - 2)))
        modules.append(LoraModuleOut(path, A, B, layer))
        expected[mod.weight_name] = sum(w * f.dense() for w, f in zip(weights, factors))
    out = tmp_path / "merged"
    write_lora_adapter(out, modules, dtype=torch.float32)
    model = _load_written(out)
    merged = model.merge_and_unload().state_dict()
    for name, delta in expected.items():
        torch.testing.assert_close(merged[name] - base_state[name], delta, atol=1e-5, rtol=1e-5)
    # outputs: the written adapter (unmerged) equals base + sum of deltas
    ids = torch.arange(12).reshape(2, 6)
    ref = _base()
    ref.load_state_dict({k: base_state[k] + expected.get(k, 0) for k in base_state})
    reloaded = _load_written(out)
    torch.testing.assert_close(reloaded(ids), ref(ids), atol=1e-5, rtol=1e-5)


def test_truncated_svd_adapter_loads_and_reports_energy(tmp_path):
    a_path, base_state, _ = _make_adapter(
        tmp_path, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                  init_lora_weights=False), "a")
    reader = AdapterReader(a_path)
    modules, kept = [], {}
    for path, mod in reader.modules.items():
        f = reader.lora_factors(mod, tuple(base_state[mod.weight_name].shape))
        dense = f.dense()
        trunc = svd_truncate(dense, 2)
        fact = factored_svd_truncate(f.B * f.scale, f.A, 2)
        torch.testing.assert_close(trunc.B @ trunc.A, fact.B @ fact.A, atol=1e-4, rtol=1e-4)
        assert abs(trunc.energy_kept - fact.energy_kept) < 1e-5 and 0 < trunc.energy_kept < 1
        modules.append(LoraModuleOut(path, trunc.A, trunc.B))
        kept[mod.weight_name] = trunc.B @ trunc.A
    out = tmp_path / "svd"
    write_lora_adapter(out, modules, dtype=torch.float32)
    merged = _load_written(out).merge_and_unload().state_dict()
    for name, delta in kept.items():
        torch.testing.assert_close(merged[name] - base_state[name], delta, atol=1e-5, rtol=1e-5)
