"""Issue 11 items 5 and 7, against peft and transformers themselves.

Item 5: an adapter that targets ``embed_tokens``/``lm_head`` also saves ``base_layer`` copies of
them; the source's value is ``copy + delta(copy)`` (what peft loads), never the copy alone.
Item 7: a base that ties ``lm_head`` to the embeddings and a source with its own head: excluding
the head keeps the output tied; ``untie_word_embeddings`` writes an untied output with the head merged.
"""

from __future__ import annotations

import json
import warnings

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft", reason="interop tests need the test extra (pip install -e '.[test]')")
transformers = pytest.importorskip("transformers", reason="interop tests need the test extra")

from safetensors.torch import load_file, save_file  # noqa: E402

from mergekit_core.config import MergeConfig  # noqa: E402
from mergekit_core.engine import run_merge  # noqa: E402
from mergekit_core.errors import MergeError  # noqa: E402
from mergekit_core.testing import fresh_host, run_mk  # noqa: E402

HOST = fresh_host()
ATOL = 1e-5
EMB, HEAD, Q0 = "model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"
PREFIX = "base_model.model."


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def llama_config(tie: bool, **kw) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie, **kw)


def make_base(path, tie: bool = False, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(llama_config(tie, **kw)).eval()
    model.save_pretrained(path)
    return path


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def make_adapter(base_dir, config, path, seed: int = 1, change_copies: bool = False):
    """A peft adapter of ``config`` on the model in ``base_dir``, its trainable weights perturbed.
    ``change_copies``: the saved base_layer copies are changed too (as if the base had moved)."""
    model = peft.get_peft_model(load(base_dir), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(path)
    if change_copies:
        f = path / "adapter_model.safetensors"
        sd = load_file(f)
        copies = [k for k in sd if ".base_layer." in k]
        assert copies
        for k in copies:
            sd[k] = sd[k] + 0.1 * torch.randn(sd[k].shape, generator=g)
        save_file(sd, f, metadata={"format": "pt"})
    return path


def peft_merged(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """peft's own answer: load the adapter (with its saved copies) on the base, merge_and_unload."""
    model = peft.PeftModel.from_pretrained(load(base_dir), adapter_dir)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def merge(tmp_path, out=None, kind="model", **data):
    """``mk merge`` (task arithmetic, lambda 1 unless given) into ``out``, or in memory."""
    data.setdefault("output_dir", str(tmp_path / "artifacts"))
    data.setdefault("method", "task_arithmetic")
    data.setdefault("method_params", {"lambda": 1.0})
    data["output"] = {"kind": kind, **({"path": str(out)} if out is not None else {})}
    return run_merge(MergeConfig.from_dict(data, None).to_spec(), HOST, in_memory=out is None)


def assert_state(got, expected, names=None):
    for name in names or expected:
        torch.testing.assert_close(got[name].double(), expected[name].double(), atol=ATOL, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------- item 5: base_layer copies

EMBEDDING_TARGETS = ["embed_tokens", "lm_head", "q_proj"]
ADAPTERS = {
    "lora": lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=EMBEDDING_TARGETS, init_lora_weights=False),
    "dora": lambda: peft.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=EMBEDDING_TARGETS,
                                    init_lora_weights=False),
    "loha": lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["lm_head", "q_proj"]),
    "lokr": lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=["lm_head", "q_proj"]),
    "ia3": lambda: peft.IA3Config(target_modules=["lm_head", "q_proj", "down_proj"],
                                  feedforward_modules=["down_proj"]),
}


@pytest.mark.parametrize("change_copies", [False, True], ids=["copy_is_base", "copy_differs"])
@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_adapter_on_embeddings_merges_like_peft(tmp_path, kind, change_copies):
    base = make_base(tmp_path / "base")
    adapter = make_adapter(base, ADAPTERS[kind](), tmp_path / "a", change_copies=change_copies)
    assert any(".base_layer." in k for k in load_file(adapter / "adapter_model.safetensors"))
    expected = peft_merged(base, adapter)
    result = merge(tmp_path, base_model=str(base), sources=[str(adapter)])
    assert_state(result.state_dict, expected)
    base_state = load(base).state_dict()
    assert not torch.allclose(result.state_dict[HEAD], base_state[HEAD])  # the head's delta is kept


@pytest.mark.parametrize("targets, lora_bias", [(["q_proj", "lm_head"], False), (["q_proj", "k_proj"], True)],
                         ids=["bias_copy", "bias_copy_and_lora_bias"])
def test_bias_copies_merge_like_peft(tmp_path, targets, lora_bias):
    """bias='all' saves every wrapped module's trained bias as base_layer.bias; lora_bias adds to it."""
    base = make_base(tmp_path / "base", attention_bias=True)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, bias="all", lora_bias=lora_bias,
                             init_lora_weights=False)
    adapter = make_adapter(base, config, tmp_path / "a")
    keys = load_file(adapter / "adapter_model.safetensors")
    assert f"{PREFIX}model.layers.0.self_attn.q_proj.base_layer.bias" in keys
    expected = peft_merged(base, adapter)
    result = merge(tmp_path, base_model=str(base), sources=[str(adapter)])
    assert_state(result.state_dict, expected)


def _lora_delta64(sd, module, scale, embedding):
    if embedding:
        a, b = sd[f"{PREFIX}{module}.lora_embedding_A"], sd[f"{PREFIX}{module}.lora_embedding_B"]
        return scale * (b.double() @ a.double()).T
    a, b = sd[f"{PREFIX}{module}.lora_A.weight"], sd[f"{PREFIX}{module}.lora_B.weight"]
    return scale * b.double() @ a.double()


def test_two_adapters_task_vectors_are_copy_plus_delta_minus_base(tmp_path):
    base = make_base(tmp_path / "base")
    config = lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=EMBEDDING_TARGETS,  # noqa: E731
                                     init_lora_weights=False)
    paths = [make_adapter(base, config(), tmp_path / "a", seed=1, change_copies=True),
             make_adapter(base, config(), tmp_path / "b", seed=2)]
    lam = 0.7
    result = merge(tmp_path, base_model=str(base), sources=[str(p) for p in paths], method_params={"lambda": lam})
    base_state = {k: v.double() for k, v in load(base).state_dict().items()}
    expected = {}
    for name, module, embedding in ((EMB, "model.embed_tokens", True), (HEAD, "lm_head", False),
                                    (Q0, "model.layers.0.self_attn.q_proj", False)):
        total = torch.zeros_like(base_state[name])
        for p in paths:
            sd = load_file(p / "adapter_model.safetensors")
            copy = sd.get(f"{PREFIX}{module}.base_layer.weight")
            value = copy.double() if copy is not None else base_state[name]
            total += value + _lora_delta64(sd, module, 4 / 2, embedding) - base_state[name]
        expected[name] = base_state[name] + lam * total
    assert_state(result.state_dict, expected)


def _peft_forward(base_dir, adapter_dir, ids):
    model = peft.PeftModel.from_pretrained(load(base_dir), adapter_dir).eval()
    with torch.no_grad():
        return model(ids).logits


def test_adapter_output_keeps_embedding_deltas(tmp_path):
    base = make_base(tmp_path / "base")
    config = lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=EMBEDDING_TARGETS,  # noqa: E731
                                     init_lora_weights=False)
    paths = [make_adapter(base, config(), tmp_path / n, seed=s) for n, s in (("a", 1), ("b", 2))]
    out = tmp_path / "merged"
    result = merge(tmp_path, base_model=str(base), sources=[str(p) for p in paths],
                   out=out, kind="adapter")
    assert result.output_kind == "adapter"
    base_state = {k: v.double() for k, v in load(base).state_dict().items()}
    expected = {k: v.clone() for k, v in base_state.items()}
    for p in paths:
        for k, v in peft_merged(base, p).items():
            expected[k] += v.double() - base_state[k]
    got = peft_merged(base, out)
    assert_state(got, expected, [EMB, HEAD, Q0])
    assert not torch.allclose(got[EMB].double(), base_state[EMB])

    # without base_model the copies are taken to be the base, and the plan says so
    result = merge(tmp_path, sources=[str(p) for p in paths], out=tmp_path / "nobase", kind="adapter")
    assert any("base_layer copy" in n for n in result.report["notes"])
    assert_state(peft_merged(base, tmp_path / "nobase"), expected, [EMB, HEAD, Q0])


def test_adapter_output_refuses_a_changed_copy(tmp_path):
    base = make_base(tmp_path / "base")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=EMBEDDING_TARGETS, init_lora_weights=False)
    adapter = make_adapter(base, config, tmp_path / "a", change_copies=True)
    with pytest.raises(MergeError, match=r"saved a base_layer copy .*differs from the base model's .*write a "
                                         r"full model instead"):
        merge(tmp_path, base_model=str(base), sources=[str(adapter)], out=tmp_path / "o", kind="adapter")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- item 7: tied embeddings


def make_untied_finetune(base_dir, path, seed: int):
    """A full fine-tune of a tied base that trained its own head, saved the legacy way: a
    pytorch_model.bin that stores lm_head.weight, and a config that does not tie."""
    model = load(base_dir)
    g = torch.Generator().manual_seed(seed)
    sd = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    sd[HEAD] = sd[EMB] + 0.2 * torch.randn(sd[EMB].shape, generator=g)
    path.mkdir()
    torch.save(sd, path / "pytorch_model.bin")
    config = json.loads((base_dir / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(config))
    return path, {k: v.double() for k, v in sd.items()}


def make_tied_finetune(base_dir, path, seed: int):
    model = load(base_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    assert HEAD not in load_file(path / "model.safetensors")
    return path, {k: v.double() for k, v in model.state_dict().items()}


@pytest.fixture
def tied(tmp_path):
    base = make_base(tmp_path / "base", tie=True)
    assert HEAD not in load_file(base / "model.safetensors")
    base_state = {k: v.double() for k, v in load(base).state_dict().items() if k != HEAD}
    return base, base_state


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _model_from(state, tie: bool):
    model = transformers.LlamaForCausalLM(llama_config(tie)).eval()
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=not tie)
    if tie:
        model.tie_weights()
    return model


IDS = torch.tensor([[1, 5, 9, 33, 60, 2]])


def test_source_head_on_tied_base_needs_a_choice_and_exclude_keeps_it_tied(tmp_path, tied):
    base, base_state = tied
    ft, ft_state = make_untied_finetune(base, tmp_path / "ft", seed=3)
    with pytest.raises(MergeError) as err:
        merge(tmp_path, base_model=str(base), sources=[str(ft)])
    message = str(err.value)
    assert "lm_head.weight" in message and "model.embed_tokens.weight" in message
    assert "exclude" in message and "untie_word_embeddings" in message and "--untie-embeddings" in message

    out = tmp_path / "out"
    lam = 0.6
    result = merge(tmp_path, base_model=str(base), sources=[str(ft)], exclude=["lm_head*"],
                   method_params={"lambda": lam}, out=out)
    assert any("lm_head.weight: left out" in n and "stays tied" in n for n in result.report["notes"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert HEAD not in load_file(out / "model.safetensors")
    expected = {k: base_state[k] + lam * (ft_state[k] - base_state[k]) for k in base_state}
    model = load(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert_state(model.state_dict(), expected)
    torch.testing.assert_close(_logits(model, IDS), _logits(_model_from(expected, tie=True), IDS),
                               atol=ATOL, rtol=1e-5)


def test_untie_keeps_the_sources_heads(tmp_path, tied):
    base, base_state = tied
    ft, ft_state = make_untied_finetune(base, tmp_path / "ft", seed=3)
    ft_tied, tied_state = make_tied_finetune(base, tmp_path / "ft_tied", seed=4)
    out = tmp_path / "out"
    result = run_mk(["merge", "--method", "task_arithmetic", "--base", str(base), "--sources", str(ft), str(ft_tied),
                     "--lambda", "0.5", "--untie-embeddings", "--out", str(out),
                     "--output-dir", str(tmp_path / "artifacts"), "--json"], host=HOST)
    assert result.exit_code == 0, result.stderr
    assert any("untied" in w for w in json.loads(result.stdout)["warnings"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    expected = {k: base_state[k] + 0.5 * (ft_state[k] - base_state[k] + tied_state[k] - base_state[k])
                for k in base_state}
    # each source's head: its stored lm_head, or (tied source) its embeddings; the base's head is its embeddings
    expected[HEAD] = base_state[EMB] + 0.5 * (ft_state[HEAD] - base_state[EMB] + tied_state[EMB] - base_state[EMB])
    model = load(out)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert_state(model.state_dict(), expected)
    torch.testing.assert_close(_logits(model, IDS), _logits(_model_from(expected, tie=False), IDS),
                               atol=ATOL, rtol=1e-5)


def test_lora_on_the_head_of_a_tied_base(tmp_path, tied):
    base, base_state = tied
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head", "q_proj"], init_lora_weights=False)
    adapter = make_adapter(base, config, tmp_path / "a")
    with pytest.raises(MergeError) as err:
        merge(tmp_path, base_model=str(base), sources=[str(adapter)])
    message = str(err.value)
    assert "is this adapter for this base" not in message
    assert "ties it to model.embed_tokens.weight" in message and "--untie-embeddings" in message

    sd = load_file(adapter / "adapter_model.safetensors")
    head_delta = _lora_delta64(sd, "lm_head", 2.0, False)
    q_names = [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    q_merged = {f"{q}.weight": base_state[f"{q}.weight"] + _lora_delta64(sd, q, 2.0, False) for q in q_names}

    out = tmp_path / "untied"
    result = merge(tmp_path, base_model=str(base), sources=[str(adapter)], untie_word_embeddings=True,
                   out=out)
    assert any("untied" in n for n in result.report["notes"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    model = load(out)
    expected = {**base_state, **q_merged, HEAD: base_state[EMB] + head_delta}
    assert_state(model.state_dict(), expected)
    # what the adapter computes on its tied base (before peft merges it into the shared weight)
    torch.testing.assert_close(_logits(model, IDS), _peft_forward(base, adapter, IDS), atol=ATOL, rtol=1e-5)

    out = tmp_path / "tied"
    result = merge(tmp_path, base_model=str(base), sources=[str(adapter)], exclude=["lm_head.weight"],
                   out=out)
    model = load(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert_state(model.state_dict(), {**base_state, **q_merged})
    assert any("lm_head.weight: left out" in n for n in result.report["notes"])

    # an adapter output keeps the head's LoRA: it works on the tied base as the source does
    out = tmp_path / "adapter"
    merge(tmp_path, base_model=str(base), sources=[str(adapter)], out=out, kind="adapter")
    torch.testing.assert_close(_peft_forward(base, out, IDS), _peft_forward(base, adapter, IDS),
                               atol=ATOL, rtol=1e-5)


def test_tied_source_on_an_untied_base_provides_its_embedding_as_its_head(tmp_path):
    base = make_base(tmp_path / "base", tie=False)
    base_state = {k: v.double() for k, v in load(base).state_dict().items()}
    src, src_state = make_tied_finetune(make_base(tmp_path / "tied_base", tie=True, seed=5), tmp_path / "src", seed=6)
    result = merge(tmp_path, base_model=str(base), sources=[str(src)], method_params={"lambda": 0.5})
    assert_state(result.state_dict, {HEAD: base_state[HEAD] + 0.5 * (src_state[EMB] - base_state[HEAD])})


def test_cli_error_is_one_line_and_names_both_ways_out(tmp_path, tied):
    base, _ = tied
    ft, _ = make_untied_finetune(base, tmp_path / "ft", seed=3)
    result = run_mk(["merge", "--method", "task_arithmetic", "--base", str(base), "--sources", str(ft),
                     "--out", str(tmp_path / "out"), "--output-dir", str(tmp_path / "artifacts")], host=HOST)
    assert result.exit_code != 0 and not (tmp_path / "out").exists()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--exclude" in lines[0] and "--untie-embeddings" in lines[0], result.stderr


def test_untied_config_is_rewritten_in_nested_configs(tmp_path):
    from mergekit_core.engine.plan import MergePlan

    (tmp_path / "config.json").write_text(json.dumps({
        "tie_word_embeddings": True, "text_config": {"vocab_size": 8}, "vision_config": {"hidden_size": 4},
        "decoder": {"tie_word_embeddings": True}}))
    plan = MergePlan(None, None, [], [], "model", None, None, untied=["lm_head.weight"])
    assert set(plan.finish_model_files(tmp_path)) == {"config.json"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["text_config"]["tie_word_embeddings"] is False
    assert config["decoder"]["tie_word_embeddings"] is False and "tie_word_embeddings" not in config["vision_config"]
    assert MergePlan(None, None, [], [], "model", None, None).finish_model_files(tmp_path) == {}


def test_a_tied_source_that_stores_its_head_anyway_is_still_tied(tmp_path, tied):
    """A legacy .bin save of a tied model stores lm_head (= its embeddings) beside a config that
    ties it: that copy is no change of the head, so a tied base merges it without a choice."""
    base, base_state = tied
    ft, ft_state = make_tied_finetune(base, tmp_path / "ft_tied", seed=5)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    stored = {k: v.float() for k, v in ft_state.items()}
    stored[HEAD] = stored[EMB].clone()
    torch.save(stored, legacy / "pytorch_model.bin")
    (legacy / "config.json").write_text((ft / "config.json").read_text())
    out = tmp_path / "out"
    result = merge(tmp_path, base_model=str(base), sources=[str(legacy)], method_params={"lambda": 0.5}, out=out)
    assert result.output_kind == "model"
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    expected = {k: base_state[k] + 0.5 * (ft_state[k] - base_state[k]) for k in base_state}
    assert_state(load(out).state_dict(), expected)


def test_untie_with_the_head_excluded_says_it_stays_tied(tmp_path, tied):
    base, _ = tied
    ft, _ = make_untied_finetune(base, tmp_path / "ft", seed=3)
    result = merge(tmp_path, base_model=str(base), sources=[str(ft)], exclude=["lm_head*"],
                   untie_word_embeddings=True, out=tmp_path / "out")
    assert any("untie_word_embeddings has no effect" in n and "stays tied" in n for n in result.report["notes"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
