"""SVD-Hybrid on the offline digits pool: rebuilt task models, merged model, compression ratio.

    python plugins/mk-svd-hybrid/benchmarks/digits_benchmark.py --pool demo-output/digits-pool \
        --out plugins/mk-svd-hybrid/benchmarks/results/digits.json

Builds the pool when it is missing (about 15 s). For every configuration: compress the 8
fine-tuned checkpoints, rebuild each task's model from the artifact alone and score it on the test
split against its fine-tuned model; merge with lambda chosen on the validation split (the same
grid for every method) and score the merged model on test. Task arithmetic and TIES (when mk-ties
is installed) are run through `run_merge` with the same lambda grid.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mergekit_core import PluginHost
from mergekit_core.api import MergeConfig, prepare_context, run_merge

LAMBDAS = [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0]
"""Task arithmetic's lambda multiplies the sum of task vectors; svd_hybrid's multiplies the weighted
average, so its grid is this one times the number of tasks."""

CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "energy 0.99": {"energy": 0.99},
    "no masks": {"mask": "none"},
    "task masks not stored": {"keep_task_masks": False},
    "majority masks": {"mask_strategy": "majority"},
    "performance": {"weighting": "performance", "accuracies": "evaluate"},
    "cluster (kmeans, 2)": {"weighting": "cluster", "n_clusters": 2},
}


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def accuracy(pool: Path, state: dict[str, torch.Tensor], task: str, split: str) -> float:
    from mk_digits.scoring import evaluate

    return evaluate(str(pool), state, task, split, None)["accuracy"]


def mean_accuracy(pool: Path, state: dict[str, torch.Tensor], tasks: list[str], split: str) -> float:
    return sum(accuracy(pool, state, t, split) for t in tasks) / len(tasks)


def merge_config(pool: Path, tasks: list[str], method: str, params: dict[str, Any], out: Path) -> MergeConfig:
    return MergeConfig.from_dict({
        "base_model": str(pool / "base"), "method": method, "method_params": params,
        "sources": [{"name": t, "path": str(pool / t)} for t in tasks], "output_dir": str(out),
        "evaluator": "digits", "evaluator_params": {"pool": str(pool)}, "eval_tasks": tasks,
    })


def best_lambda(pool: Path, tasks: list[str], build) -> dict[str, Any]:
    """Choose lambda on validation (mean accuracy), report test."""
    scored = []
    for lam in LAMBDAS:
        state = build(lam)
        scored.append((mean_accuracy(pool, state, tasks, "validation"), lam, state))
    val, lam, state = max(scored, key=lambda s: s[0])
    return {"lambda": lam, "validation": val, "test": mean_accuracy(pool, state, tasks, "test")}


def engine_method(pool: Path, tasks: list[str], host: PluginHost, method: str, work: Path) -> dict[str, Any]:
    def build(lam: float) -> dict[str, torch.Tensor]:
        spec = merge_config(pool, tasks, method, {"lambda": lam}, work).to_spec()
        return run_merge(spec, host, in_memory=True, write_bundle=False).state_dict

    return best_lambda(pool, tasks, build)


def svd_hybrid(pool: Path, tasks: list[str], host: PluginHost, params: dict[str, Any], work: Path,
               finetuned: dict[str, float]) -> dict[str, Any]:
    from mk_svd_hybrid.pipeline import compress, merged_delta
    from mk_svd_hybrid.store import ArtifactReader

    artifact = Path(tempfile.mkdtemp(dir=work))
    spec = merge_config(pool, tasks, "svd_hybrid", params, work).to_spec()
    started = time.perf_counter()
    with prepare_context(spec, host) as (context, comps):
        compress(context, comps.params, artifact)
    compress_s = time.perf_counter() - started
    reader = ArtifactReader(artifact)
    base = load_state(pool / "base")
    rebuilt = {}
    for i, task in enumerate(tasks):
        state = dict(base)
        for name, decoder in reader.records():
            state[name] = (decoder.task(i) + base[name].float()).to(base[name].dtype)
        acc = accuracy(pool, state, task, "test")
        rebuilt[task] = {"accuracy": acc, "finetuned": finetuned[task], "kept": acc / finetuned[task]}

    def build(lam: float) -> dict[str, torch.Tensor]:
        state = dict(base)
        for name in reader.names:
            state[name] = (merged_delta(reader, name, [lam * len(tasks)] * len(tasks)) + base[name].float()
                           ).to(base[name].dtype)
        return state

    merged = best_lambda(pool, tasks, build)
    merged["lambda"] = merged["lambda"] * len(tasks)
    overall = reader.json_file("diagnostics.json")["overall"]
    return {
        "params": params, "compress_s": round(compress_s, 2), "weights": reader.weights,
        "clusters": reader.manifest["clusters"],
        "compression_ratio_vs_fp32": overall["compression_ratio_vs_fp32"],
        "bits_per_entry_per_task": overall["bits_per_entry_per_task"],
        "mean_relative_error": overall["mean_relative_error"],
        "rebuilt": rebuilt, "min_kept": min(r["kept"] for r in rebuilt.values()),
        "mean_kept": sum(r["kept"] for r in rebuilt.values()) / len(rebuilt), "merged": merged,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=Path, default=Path("demo-output/digits-pool"))
    ap.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), help="Which configurations to run.")
    args = ap.parse_args()
    if not (args.pool / "pool.json").is_file():
        from mk_digits.build import BuildSettings, build_pool

        build_pool(args.pool, BuildSettings())
    meta = json.loads((args.pool / "pool.json").read_text())
    tasks = list(meta["tasks"])
    finetuned = {t: meta["tasks"][t]["finetuned_test_accuracy"] for t in tasks}
    host = PluginHost()
    results: dict[str, Any] = {"tasks": tasks, "finetuned_mean": sum(finetuned.values()) / len(tasks),
                               "lambda_grid": LAMBDAS}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = load_state(args.pool / "base")
        results["zero_shot"] = mean_accuracy(args.pool, base, tasks, "test")
        results["task_arithmetic"] = engine_method(args.pool, tasks, host, "task_arithmetic", work)
        if "ties" in host.names("merge_method"):
            results["ties"] = engine_method(args.pool, tasks, host, "ties", work)
        results["svd_hybrid"] = {}
        for name in args.configs:
            r = svd_hybrid(args.pool, tasks, host, CONFIGS[name], work, finetuned)
            results["svd_hybrid"][name] = r
            print(f"{name:22s} ratio {r['compression_ratio_vs_fp32']:5.2f}x  bits/entry/task "
                  f"{r['bits_per_entry_per_task']:.2f}  rebuilt kept min {r['min_kept']:.4f} mean "
                  f"{r['mean_kept']:.4f}  merged test {r['merged']['test']:.4f} (lambda {r['merged']['lambda']:g})",
                  file=sys.stderr)
    print(f"zero-shot {results['zero_shot']:.4f}  fine-tuned {results['finetuned_mean']:.4f}  "
          f"task arithmetic {results['task_arithmetic']['test']:.4f} (lambda {results['task_arithmetic']['lambda']})"
          + (f"  ties {results['ties']['test']:.4f} (lambda {results['ties']['lambda']})" if "ties" in results else ""),
          file=sys.stderr)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
