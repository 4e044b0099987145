"""The README's first command: build a small synthetic pool (no download) and merge it.

The pool is a Llama-shaped base model, three full fine-tunes and two LoRA adapters, written in
the formats users have (safetensors model directories, PEFT adapter directories). Every config
in ``configs/`` runs against it.

    python -m mergekit_core.demo [--out demo-output]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

POOL_LAYERS = 4
HIDDEN, INTERMEDIATE, VOCAB = 64, 128, 256
FULL_TASKS = ("task_a", "task_b", "task_c")
ADAPTER_TASKS = ("lora_a", "lora_b")


def _model_config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": POOL_LAYERS, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": VOCAB, "tie_word_embeddings": False, "torch_dtype": "float32",
    }


def _base_state(seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    kv = HIDDEN // 2

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

    state = {"model.embed_tokens.weight": w(VOCAB, HIDDEN)}
    for i in range(POOL_LAYERS):
        p = f"model.layers.{i}."
        state.update({
            p + "self_attn.q_proj.weight": w(HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": w(kv, HIDDEN),
            p + "self_attn.v_proj.weight": w(kv, HIDDEN), p + "self_attn.o_proj.weight": w(HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": w(INTERMEDIATE, HIDDEN), p + "mlp.up_proj.weight": w(INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": w(HIDDEN, INTERMEDIATE),
            p + "input_layernorm.weight": torch.ones(HIDDEN), p + "post_attention_layernorm.weight": torch.ones(HIDDEN),
        })
    state["model.norm.weight"] = torch.ones(HIDDEN)
    state["lm_head.weight"] = w(VOCAB, HIDDEN)
    return state


def build_pool(root: Path, seed: int = 0) -> dict[str, Path]:
    """Write the pool under ``root`` (skipped when it is already there); returns name -> path."""

    from mergekit_core.io.destination import AtomicDirectory

    root = Path(root)
    paths = {name: root / name for name in ("base", *FULL_TASKS, *ADAPTER_TASKS)}
    if all(p.exists() for p in paths.values()):
        return paths
    with AtomicDirectory(root, kind="demo_pool", what="pool directory") as tmp:
        _write_pool(tmp, seed, paths["base"])
    return paths


def _write_pool(root: Path, seed: int, final_base: Path) -> None:
    import torch
    from safetensors.torch import save_file

    paths = {name: root / name for name in ("base", *FULL_TASKS, *ADAPTER_TASKS)}
    base = _base_state(seed)
    g = torch.Generator().manual_seed(seed + 1)
    for name in ("base", *FULL_TASKS):
        state = base if name == "base" else {
            k: v + 0.02 * torch.randn(v.shape, generator=g) * v.abs().mean() for k, v in base.items()}
        paths[name].mkdir(exist_ok=True)
        save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(paths[name] / "model.safetensors"))
        (paths[name] / "config.json").write_text(json.dumps(_model_config(), indent=2))
    for i, name in enumerate(ADAPTER_TASKS):
        r = 8 if i == 0 else 4
        tensors = {}
        for layer in range(POOL_LAYERS):
            for module, (out_dim, in_dim) in (("self_attn.q_proj", (HIDDEN, HIDDEN)),
                                              ("self_attn.v_proj", (HIDDEN // 2, HIDDEN))):
                key = f"base_model.model.model.layers.{layer}.{module}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(r, in_dim, generator=g) * 0.05
                tensors[f"{key}.lora_B.weight"] = torch.randn(out_dim, r, generator=g) * 0.05
        paths[name].mkdir(exist_ok=True)
        save_file(tensors, str(paths[name] / "adapter_model.safetensors"))
        (paths[name] / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "use_rslora": i == 1,
            "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(final_base),
        }, indent=2))


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from mergekit_core.config import load_merge_config
    from mergekit_core.engine import run_merge
    from mergekit_core.errors import MergekitError
    from mergekit_core.plugins import PluginHost

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-output", help="where the pool and the merges go")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()  # config paths are relative to the config file, so pass absolute ones
    console = Console()
    try:
        pool = build_pool(out / "pool")
    except MergekitError as exc:
        console.print(f"[red]Error:[/] {exc}\nhint: give the demo another --out (it writes a pool under it)")
        raise SystemExit(exc.exit_code) from None
    console.print(f"pool: {len(pool)} checkpoints in {out / 'pool'}")
    host = PluginHost()
    configs = Path(__file__).resolve().parent.parent / "configs"
    table = Table(title="demo merges")
    for col in ("config", "method", "output", "tensors merged", "moved / energy", "seconds"):
        table.add_column(col)
    written = []
    for name in ("merge_weighted_scalar.yaml", "merge_weighted_per_layer.yaml", "merge_adapters_lora.yaml"):
        try:
            cfg = load_merge_config(configs / name)
            spec = cfg.with_overrides({"sources_root": str(out / "pool"), "base_model": str(pool["base"]),
                                       "output_dir": str(out / "artifacts"),
                                       "output.path": str(out / "merged" / Path(name).stem)}).to_spec()
            result = run_merge(spec, host)
        except MergekitError as exc:
            console.print(f"[red]{name}: {exc}[/]")
            raise SystemExit(1) from None
        moved = result.report.get("relative_delta_norm")
        energy = result.report.get("energy_kept")
        table.add_row(Path(name).stem, result.method, result.output_kind, str(result.report["merged"]),
                      f"{moved:.4f}" if moved is not None else f"{energy:.2%} kept",
                      f"{result.metadata['wall_time_s']:.2f}")
        written.append(f"{Path(name).stem}: {result.output_path}")
    console.print(table)
    console.print("written to:\n  " + "\n  ".join(written))
    console.print(f"run bundles (metadata, checksums, reports): {out / 'artifacts' / 'merged'}")
    console.print("inspect one with: mk inspect " + str(out / "merged" / "merge_weighted_scalar"))


if __name__ == "__main__":
    main()
