"""The lm_eval evaluator on a tiny offline Llama pool: lm-eval's numbers, the in-memory and the
directory paths, peft adapters, `mk merge --eval-tasks`, `mk sweep` and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mk_lm_eval.tiny import TASKS, docs, tokenizer

from mergekit_core import ConfigError, FormatError
from mergekit_core.testing import fresh_host, run_mk

HOST = fresh_host(entry_points=True)


def params(pool, **extra):
    ev = HOST.get("evaluator", "lm_eval")
    return ev, ev.resolve_params({"tasks": [str(pool[f"{t}.yaml"]) for t in TASKS],
                                  "base_model": str(pool["base"]), "device": "cpu", **extra})


def state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def reference_accuracy(folder: Path, task: str, split: str) -> float:
    """Multiple-choice accuracy by hand: the choice whose token has the highest log-probability
    after the question (each choice is one token, so this is lm-eval's ``acc``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tok = tokenizer()
    right = 0
    for doc in docs(task, split):
        ids = torch.tensor([tok(doc["question"])["input_ids"]])
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits[0, -1].log_softmax(-1)
        scores = [logprobs[tok(c)["input_ids"][0]] for c in doc["choices"]]
        right += int(max(range(4), key=lambda i: scores[i]) == doc["label"])
    return right / len(docs(task, split))


def test_tasks_labels_and_accuracy_match_a_hand_reference(pool):
    ev, p = params(pool)
    infos = ev.tasks(p)
    assert [(t.name, t.metric, t.higher_is_better) for t in infos] == [("tiny_a", "acc", True),
                                                                        ("tiny_b", "acc", True)]
    assert ev.labels("tiny_b", "test", p) == [d["label"] for d in docs("tiny_b", "test")]
    assert len(ev.labels("tiny_a", "validation", {**p, "limit": 5})) == 5
    for model in ("base", "tiny_a", "tiny_b"):
        for task in TASKS:
            got = ev.evaluate(str(pool[model]), task, "test", None, p)
            assert got["samples"] == 24
            assert got["acc"] == pytest.approx(reference_accuracy(pool[model], task, "test"), abs=1e-12)
    # each fine-tune has learnt its own task and not the other one
    assert ev.evaluate(str(pool["tiny_a"]), "tiny_a", "test", None, p)["acc"] > 0.9
    assert ev.evaluate(str(pool["tiny_a"]), "tiny_b", "test", None, p)["acc"] < 0.6


def test_subsets_agree_with_lm_evals_own_simple_evaluate(pool):
    """Our call of lm-eval's loop on already-loaded tasks gives what ``simple_evaluate`` gives."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    ev, p = params(pool)
    indices = [1, 4, 5, 9, 10, 17, 20]
    ours = ev.evaluate(str(pool["tiny_b"]), "tiny_b", "test", indices, p)
    theirs = simple_evaluate(model="hf", model_args={"pretrained": str(pool["tiny_b"]), "device": "cpu"},
                             tasks=[str(pool["tiny_b.yaml"])], samples={"tiny_b": indices},
                             bootstrap_iters=0, log_samples=False,
                             task_manager=TaskManager(include_defaults=False))  # no registry index: faster
    assert ours["samples"] == len(indices) == theirs["n-samples"]["tiny_b"]["effective"]
    assert ours["acc"] == theirs["results"]["tiny_b"]["acc,none"]
    assert ev.evaluate(str(pool["tiny_b"]), "tiny_b", "test", None, {**p, "limit": 6})["samples"] == 6


def test_in_memory_merge_scores_like_its_directory(pool, tmp_path):
    from mergekit_core.api import MergeConfig, run_merge

    ev, p = params(pool)
    spec = MergeConfig.from_dict({"sources": [str(pool[t]) for t in TASKS], "base_model": str(pool["base"]),
                                  "method": "task_arithmetic", "method_params": {"lambda": 0.4},
                                  "output": {"path": str(tmp_path / "merged")},
                                  "output_dir": str(tmp_path / "artifacts")}).to_spec()
    in_memory = run_merge(spec, HOST, in_memory=True, write_bundle=False).state_dict
    written = run_merge(spec, HOST).output_path
    for task in TASKS:
        for split in ("validation", "test"):
            from_disk = ev.evaluate(str(written), task, split, None, p)
            assert ev.evaluate(in_memory, task, split, None, p) == from_disk
    # the reused base-architecture model is fully overwritten by each state dict
    assert ev.evaluate(state_dict(pool["tiny_a"]), "tiny_a", "test", None, p) == \
        ev.evaluate(str(pool["tiny_a"]), "tiny_a", "test", None, p)
    assert ev.evaluate(state_dict(pool["base"]), "tiny_a", "test", None, p) == \
        ev.evaluate(str(pool["base"]), "tiny_a", "test", None, p)


def test_adapter_is_scored_with_peft_applied_not_merged(pool):
    from mk_lm_eval.models import from_directory
    from peft import PeftModel

    ev, p = params(pool)
    model, tok_folder = from_directory(str(pool["lora_a"]), None, "float32", "cpu")
    assert isinstance(model, PeftModel) and tok_folder == str(pool["base"])  # base from adapter_config.json
    merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    from mergekit_core.api import MergeConfig, run_merge

    # what mk merge --eval-tasks scores for an adapter output: the core's dense base + delta
    dense = run_merge(MergeConfig.from_dict({"sources": [str(pool["lora_a"])], "base_model": str(pool["base"]),
                                             "method": "uniform", "output": {"kind": "model"}}).to_spec(),
                      HOST, in_memory=True, write_bundle=False).state_dict
    for task in TASKS:
        applied = ev.evaluate(str(pool["lora_a"]), task, "test", None, p)
        assert applied["acc"] == pytest.approx(ev.evaluate(merged, task, "test", None, p)["acc"], abs=1e-12)
        assert applied["acc"] == pytest.approx(ev.evaluate(dense, task, "test", None, p)["acc"], abs=1e-12)
    assert ev.evaluate(str(pool["lora_a"]), "tiny_a", "test", None, p)["acc"] > \
        ev.evaluate(str(pool["base"]), "tiny_a", "test", None, p)["acc"] + 0.3


def _config(pool, tmp_path, **extra) -> Path:
    import yaml

    data = {"sources": list(TASKS), "sources_root": str(pool["base"].parent), "base_model": str(pool["base"]),
            "method": "task_arithmetic", "method_params": {"lambda": 0.5}, "evaluator": "lm_eval",
            "evaluator_params": {"include_path": str(pool["tiny_a.yaml"].parent), "tasks": list(TASKS),
                                 "base_model": str(pool["base"]), "device": "cpu"},
            "split": "validation", "output": {"path": str(tmp_path / "merged")},
            "output_dir": str(tmp_path / "artifacts"), **extra}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_mk_merge_eval_tasks_records_accuracy_and_interference(pool, tmp_path):
    ev, p = params(pool)
    result = run_mk(["merge", str(_config(pool, tmp_path)), "--eval-tasks", "tiny_a", "tiny_b", "--json"], host=HOST)
    assert result.exit_code == 0, result.stderr
    evaluation = json.loads(result.stdout)["evaluation"]
    assert evaluation["evaluator"] == "lm_eval" and evaluation["split"] == "validation"
    for task in TASKS:
        entry = evaluation["tasks"][task]
        own = ev.evaluate(str(pool[task]), task, "validation", None, p)["acc"]
        merged = ev.evaluate(str(tmp_path / "merged"), task, "validation", None, p)["acc"]
        assert entry["metric"] == "acc" and entry["individual"] == own and entry["value"] == merged
        assert entry["interference_delta"] == pytest.approx(merged - own)
    index = Path(evaluation["written"]["index"]).read_text()
    assert '"kind": "individual"' in index and '"evaluator": "lm_eval"' in index


def test_mk_sweep_grid_on_a_subset(pool, tmp_path):
    config = _config(pool, tmp_path, search={"type": "grid", "grid": {"lambda": [0.0, 0.5, 1.0]}},
                     eval_subset={"enabled": True, "seed": 0, "stratified": True, "max_samples": 8})
    result = run_mk(["sweep", str(config), "--json"], host=HOST)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    points = {r["point"]["lambda"]: r for r in summary["points"]}
    assert sorted(points) == [0.0, 0.5, 1.0]
    for record in points.values():
        assert set(record["metrics"]) == set(TASKS) and set(record["interference_delta"]) == set(TASKS)
    # lambda 0 is the base model: chance level, far below each fine-tune on its own task
    assert all(points[0.0]["interference_delta"][t] < -0.3 for t in TASKS)
    assert points[1.0]["score"] > points[0.0]["score"]
    combo = tmp_path / "artifacts" / "merged" / "task_arithmetic" / "tiny_a_tiny_b"
    subset_files = sorted((combo.parent.parent.parent / "eval_subsets").glob("tiny_a_validation_subset-*.json"))
    assert len(subset_files) == 1
    indices = json.loads(subset_files[0].read_text())["indices"]
    per_task = sorted((combo / "eval" / "validation" / "per_task" / "tiny_a").glob("*subset-*_metrics.json"))
    assert len(per_task) == 3 and all(json.loads(f.read_text())["metrics"]["samples"] == 8 for f in per_task)
    ev, p = params(pool)  # the recorded value is the metric on exactly the cached subset
    own = json.loads(per_task[0].read_text())["individual"]
    assert own == ev.evaluate(str(pool["tiny_a"]), "tiny_a", "validation", indices, p)["acc"]


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code != 0
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    first = result.stderr.strip().splitlines()[0]
    assert all(n in first for n in needles), result.stderr


def test_missing_data_file_unknown_task_and_bad_model_each_stop_with_one_line(pool, tmp_path):
    broken = tmp_path / "tasks"
    broken.mkdir()
    text = pool["tiny_a.yaml"].read_text().replace(str(pool["tiny_a.yaml"].parent / "tiny_a_test.jsonl"),
                                                  str(broken / "gone.jsonl"))
    (broken / "tiny_a.yaml").write_text(text)
    base = ["evaluate", str(pool["tiny_a"]), "--evaluator", "lm_eval", "--split", "test",
            "--output-dir", str(tmp_path / "results"), "--param", f"base_model={pool['base']}"]
    _one_line_error(run_mk([*base, "--param", f"tasks={broken / 'tiny_a.yaml'}"], host=HOST),
                    "data file", "gone.jsonl", "tiny_a")
    _one_line_error(run_mk([*base, "--param", f"include_path={pool['tiny_a.yaml'].parent}",
                            "--param", "tasks=[tiny_a, tiny_aa_missing]"], host=HOST),
                    "no task 'tiny_aa_missing'", "registry")
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 30,
                                                 "num_attention_heads": 4}))
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    _one_line_error(run_mk(["evaluate", str(bad), *base[2:], "--param", f"tasks={pool['tiny_a.yaml']}"], host=HOST),
                    str(bad), "cannot be loaded")
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").rglob("eval_results_*.json"))


def test_state_dict_of_another_architecture_is_refused(pool):
    ev, p = params(pool)
    state = state_dict(pool["tiny_a"])
    with pytest.raises(FormatError, match="lacks 1 of its tensors .*lm_head.weight"):
        ev.evaluate({k: v for k, v in state.items() if k != "lm_head.weight"}, "tiny_a", "test", None, p)
    state["model.norm.weight"] = torch.ones(7)
    with pytest.raises(FormatError, match=r"model.norm.weight has shape \(7,\)"):
        ev.evaluate(state, "tiny_a", "test", None, p)
    with pytest.raises(ConfigError, match="needs evaluator_params.base_model"):
        ev.evaluate(state, "tiny_a", "test", None, {**p, "base_model": None})
    with pytest.raises(ConfigError, match="has no train split"):
        ev.evaluate(str(pool["tiny_a"]), "tiny_a", "train", None, p)


def test_tied_embeddings_that_differ_in_a_merge_are_refused(pool, tmp_path):
    from mk_lm_eval.tiny import config
    from transformers import LlamaForCausalLM

    cfg = config()
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tied")
    ev, p = params(pool, base_model=str(tmp_path / "tied"))
    state = state_dict(pool["tiny_a"])  # untied: lm_head differs from the embeddings
    with pytest.raises(FormatError, match="model.embed_tokens.weight and lm_head.weight are one tensor"):
        ev.evaluate(state, "tiny_a", "test", None, p)


def test_device_cuda_without_a_gpu_is_one_line_before_anything_runs():
    import torch
    from mk_lm_eval.evaluator import LmEvalEvaluator

    from mergekit_core import ConfigError

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: device cuda is valid here")
    with pytest.raises(ConfigError, match="torch sees no GPU"):
        LmEvalEvaluator().resolve_params({"tasks": ["x"], "device": "cuda"})
