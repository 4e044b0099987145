"""A tiny offline language-model pool: a 2-layer Llama (random weights), two fine-tunes, a LoRA
adapter and two 4-way multiple-choice tasks as lm-eval YAML files with local JSONL data.

What the tests, the benchmark and the docs example run on (``mk lm-eval tiny --out DIR``); no
network. Each task maps a word to a word (``qa w7`` -> ``w19``); a fine-tune learns its own task's
mapping (test accuracy near 1) and leaves the other near chance (0.25), so a merge between them
shows interference. Imports torch and transformers.

Layout of ``DIR``::

    base/ tiny_a/ tiny_b/                 Llama checkpoints (config.json, model.safetensors, tokenizer)
    lora_a/                               a peft LoRA adapter of base, trained on tiny_a
    tasks/tiny_a.yaml tasks/tiny_b.yaml   lm-eval task configs (absolute data_files paths)
    tasks/tiny_a_{validation,test}.jsonl  the data: {"question", "choices", "label"}
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path
from typing import Any

TASKS = ("tiny_a", "tiny_b")
WORDS = 60
"""Answer/question words w0 .. w59 (token ids 5 .. 64)."""
SPLITS = {"validation": range(16), "test": range(16, 40)}
"""Question word numbers of each split (disjoint)."""


def answer(task: str, x: int) -> int:
    """The task's word-to-word mapping: tiny_a x -> 7x+3, tiny_b x -> 11x+5 (mod WORDS)."""
    return (7 * x + 3) % WORDS if task == "tiny_a" else (11 * x + 5) % WORDS


def docs(task: str, split: str) -> list[dict[str, Any]]:
    """The split's documents: question, four choices (the answer at a seeded position), label."""
    rng = random.Random(f"{task}-{split}")
    out = []
    for x in SPLITS[split]:
        right = answer(task, x)
        wrong = rng.sample([w for w in range(WORDS) if w != right], 3)
        label = rng.randrange(4)
        choices = [f"w{w}" for w in wrong]
        choices.insert(label, f"w{right}")
        out.append({"question": f"q{task[-1]} w{x}", "choices": choices, "label": label})
    return out


def task_yaml(task: str, folder: Path) -> str:
    """The lm-eval task config of ``task`` whose data files lie in ``folder``."""
    files = {s: str((folder / f"{task}_{s}.jsonl").absolute()) for s in SPLITS}
    return (f"task: {task}\n"
            "dataset_path: json\n"
            "dataset_kwargs:\n"
            "  data_files:\n"
            f"    validation: {files['validation']}\n"
            f"    test: {files['test']}\n"
            "output_type: multiple_choice\n"
            "validation_split: validation\n"
            "test_split: test\n"
            "doc_to_text: \"{{question}}\"\n"
            "doc_to_choice: \"{{choices}}\"\n"
            "doc_to_target: label\n"
            "metric_list:\n"
            "  - metric: acc\n"
            "    aggregation: mean\n"
            "    higher_is_better: true\n")


def write_tasks(folder: Path) -> dict[str, Path]:
    """The two task YAML files and their JSONL data in ``folder``; returns task -> YAML path."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for task in TASKS:
        for split in SPLITS:
            lines = "".join(json.dumps(d) + "\n" for d in docs(task, split))
            (folder / f"{task}_{split}.jsonl").write_text(lines)
        out[task] = folder / f"{task}.yaml"
        out[task].write_text(task_yaml(task, folder))
    return out


def vocabulary() -> dict[str, int]:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "qa": 3, "qb": 4}
    vocab.update({f"w{i}": 5 + i for i in range(WORDS)})
    return vocab


def tokenizer() -> Any:
    """A word-level fast tokenizer (whitespace pre-tokenizer), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>", model_max_length=64, clean_up_tokenization_spaces=False)


def config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(vocabulary()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _batch(task: str, tok: Any) -> tuple[Any, Any]:
    """Inputs ``(N, 3)`` int64 (question tokens, answer) and the answer ids ``(N,)``."""
    import torch

    rows = [tok(f"{d['question']} {d['choices'][d['label']]}")["input_ids"]
            for split in SPLITS for d in docs(task, split)]
    ids = torch.tensor(rows, dtype=torch.long)
    return ids, ids[:, -1]


def finetune(model: Any, task: str, tok: Any, steps: int, lr: float) -> None:
    """Train ``model`` in place to predict each answer word after its question (Adam)."""
    import torch

    ids, target = _batch(task, tok)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        logits = model(input_ids=ids[:, :-1]).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build(out: Path, seed: int = 0, steps: int = 150) -> dict[str, Path]:
    """Write the pool to ``out`` (see the module docstring), on one CPU thread (the previous
    number is restored); returns the paths by name."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():  # transformers' deprecation notices about peft's calls
            warnings.simplefilter("ignore", FutureWarning)
            return _build(Path(out), seed, steps)
    finally:
        torch.set_num_threads(threads)


def _build(out: Path, seed: int, steps: int) -> dict[str, Path]:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    tok = tokenizer()
    base = LlamaForCausalLM(config()).eval()
    paths = {"base": out / "base"}
    base.save_pretrained(paths["base"])
    tok.save_pretrained(paths["base"])
    for task in TASKS:
        model = LlamaForCausalLM(config())
        model.load_state_dict(base.state_dict())
        finetune(model, task, tok, steps, lr=3e-3)
        paths[task] = out / task
        model.save_pretrained(paths[task])
        tok.save_pretrained(paths[task])
    from peft import LoraConfig, get_peft_model

    model = LlamaForCausalLM(config())
    model.load_state_dict(base.state_dict())
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj",
                                                                                "down_proj"]))
    finetune(lora, "tiny_a", tok, steps, lr=1e-2)
    paths["lora_a"] = out / "lora_a"
    lora.save_pretrained(paths["lora_a"])
    cfg_path = paths["lora_a"] / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(paths["base"].absolute())
    cfg_path.write_text(json.dumps(cfg, indent=2))
    for task, path in write_tasks(out / "tasks").items():
        paths[f"{task}.yaml"] = path
    return paths
