"""AdaMerging's memory on a Llama-shaped model of about 1 GB (bf16): ``cpu_stream`` against
``gpu_cache`` (both on the CPU here), for 1, 2 and 4 sources, and LoRA task vectors kept factored
against dense.

    python plugins/mk-adamerging/benchmarks/memory_benchmark.py --out /tmp/ada-mem [--size-gb 1]

Writes a synthetic Llama (transformers' config: hidden 2048, intermediate 5632, 16 heads, vocab
32000, as many layers as the size allows) as a base, 4 full fine-tunes (base + N(0, 0.002)) and 4
rank-16 LoRA adapters on every linear module; the objective is the next-token entropy on random
token batches (an evaluator of this script's own). Each configuration runs 3 AdaMerging steps in a
fresh process, so its peak RSS (``ru_maxrss``) is its own; steps per second are the median of the
last 2 steps. Writes OUT/adamerging_memory.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

HIDDEN, INTERMEDIATE, VOCAB, HEADS, RANK = 2048, 5632, 32000, 16, 16
LINEAR = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN),
          "o_proj": (HIDDEN, HIDDEN), "gate_proj": (INTERMEDIATE, HIDDEN), "up_proj": (INTERMEDIATE, HIDDEN),
          "down_proj": (HIDDEN, INTERMEDIATE)}


def module_path(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{'self_attn' if name.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{name}"


def llama_config(layers: int) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": HEADS,
            "num_key_value_heads": HEADS, "vocab_size": VOCAB, "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def generate(root: Path, size_gb: float) -> tuple[Path, int]:
    """Base, ft0..ft3 and lora0..lora3 under ``root`` (kept when present)."""
    import torch
    from safetensors.torch import save_file

    per_layer = 2 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN)
    layers = max(1, round((size_gb * 1e9 - 2 * 2 * VOCAB * HIDDEN) / per_layer))
    if (root / "done").is_file():
        return root, layers
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        for name, shape in LINEAR.items():
            shapes[f"{module_path(i, name)}.weight"] = shape
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (HIDDEN,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (HIDDEN,)
    base = {}
    for k, shape in shapes.items():
        g = torch.Generator().manual_seed(len(base))
        base[k] = (torch.ones(shape) if k.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
                   ).to(torch.bfloat16)
    for name in ["base"] + [f"ft{i}" for i in range(4)]:
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(100 + len(name))
        tensors = base if name == "base" else {
            k: (v.float() + torch.randn(v.shape, generator=g) * 0.002).to(torch.bfloat16) for k, v in base.items()}
        save_file(tensors, str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps(llama_config(layers)))
        del tensors
    for s in range(4):
        out = root / f"lora{s}"
        out.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(200 + s)
        factors = {}
        for i in range(layers):
            for name, (rows, cols) in LINEAR.items():
                prefix = f"base_model.model.{module_path(i, name)}"
                factors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, cols, generator=g) * 0.01
                factors[f"{prefix}.lora_B.weight"] = torch.randn(rows, RANK, generator=g) * 0.01
        save_file(factors, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": list(LINEAR),
            "base_model_name_or_path": str(root / "base"), "task_type": "CAUSAL_LM"}))
    (root / "done").write_text("")
    return root, layers


def _entropy_evaluator(layers: int) -> Any:
    """Next-token prediction entropy of the merged Llama on random token batches."""
    import torch
    from torch.func import functional_call
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from mergekit_core import Evaluator, TaskInfo, hookimpl

    config = LlamaConfig(**{k: v for k, v in llama_config(layers).items() if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    skeleton.model.rotary_emb = LlamaRotaryEmbedding(config)  # a real buffer; the weights come from the merge

    class TokenEntropy(Evaluator):
        name = "token_entropy"
        description = "next-token entropy on random tokens (memory benchmark)"

        def tasks(self, params):
            return [TaskInfo("tokens", "entropy", higher_is_better=False)]

        def evaluate(self, model, task, split, subset, params):
            raise NotImplementedError("the memory benchmark only adapts")

        def unlabeled_batches(self, task, split, params):
            g = torch.Generator().manual_seed(0)
            for _ in range(4):
                yield torch.randint(0, VOCAB, (2, 32), generator=g)

        def forward(self, model, task, inputs, params):
            logits = functional_call(skeleton, model, (inputs,), strict=False).logits
            return logits.reshape(-1, logits.shape[-1])

    plugin = types.ModuleType("memory_benchmark_evaluator")
    plugin.mk_evaluators = hookimpl(lambda: [TokenEntropy()])
    plugin.mk_evaluators.__name__ = "mk_evaluators"
    return plugin


def child(root: Path, layers: int, sources: int, residency: str, kind: str, out: Path) -> None:
    import torch

    from mergekit_core.api import MergeConfig, optimize_and_merge
    from mergekit_core.testing import fresh_host

    torch.set_num_threads(2)
    host = fresh_host({"bench": _entropy_evaluator(layers)}, entry_points=True)
    prefix = "lora" if kind == "lora" else "ft"
    data = {"sources": [str(root / f"{prefix}{i}") for i in range(sources)], "base_model": str(root / "base"),
            "method": "task_arithmetic", "evaluator": "token_entropy", "eval_tasks": ["tokens"],
            "output_dir": str(out / "runs"), "output": {"kind": "model", "save": False},
            "optimizer": {"name": "adamerging", "params": {
                "granularity": "layer", "steps": 3, "batch_size": 2, "batches_per_step": 1, "dtype_compute": "fp32",
                "delta_residency": residency, "factored": kind != "lora_dense", "split": "test"}}}
    started = time.perf_counter()
    result = optimize_and_merge(MergeConfig.from_dict(data).to_spec(), host, in_memory=False, write_bundle=False)
    report = result.metadata["optimizer"]["report"]
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "task_vector_mb": report["task_vector_mb"], "steps_per_second": report["steps_per_second"],
                      "wall_s": time.perf_counter() - started}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the models and the results")
    parser.add_argument("--size-gb", type=float, default=1.0, help="base model size in GB (bf16)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    root, layers = generate(args.out / "models", args.size_gb)
    if args.child:
        sources, residency, kind, _ = args.child
        child(root, layers, int(sources), residency, kind, args.out)
        return
    runs = [(n, r, "full") for r in ("cpu_stream", "gpu_cache") for n in (1, 2, 4)]
    runs += [(4, "cpu_stream", "lora"), (4, "cpu_stream", "lora_dense")]
    rows = []
    for sources, residency, kind in runs:
        done = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--size-gb", str(args.size_gb),
                               "--child", str(sources), residency, kind, "x"], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{sources} {residency} {kind} failed:\n{done.stderr[-2000:]}")
        row = {"sources": sources, "delta_residency": residency, "task_vectors": kind,
               **json.loads(done.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"size_gb": args.size_gb, "layers": layers, "rows": rows}
    (args.out / "adamerging_memory.json").write_text(json.dumps(result, indent=1))
    print("| sources | task vectors | delta_residency | task vectors held (MB) | peak RSS (MB) | steps/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sources']} | {r['task_vectors']} | {r['delta_residency']} | {r['task_vector_mb']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {r['steps_per_second']:.2f} |")


if __name__ == "__main__":
    main()
