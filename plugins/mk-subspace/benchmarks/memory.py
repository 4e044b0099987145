"""Peak memory and wall time of TSV-M and Iso-C against SVD-Hybrid on a synthetic Llama-shaped set.

    OMP_NUM_THREADS=1 python plugins/mk-subspace/benchmarks/memory.py --root /tmp/subspace18/memory \
        --size-gb 0.5 --sources 4 --json plugins/mk-subspace/benchmarks/results/memory.json

Generates (once, under ``--root``) a base and ``--sources`` fine-tunes of about ``--size-gb`` each:
bf16, Llama's tensor names and proportions (hidden ``--hidden``, MLP 2.75x hidden, vocabulary
32000, untied embeddings, ``--layers`` or as many layers as the size allows), sharded at 500 MB.
Each fine-tune is the base plus Gaussian noise at 10% of the weights' scale, so every task matrix
has full rank and the SVDs do their full work.

Then runs ``run_merge`` for each method, each in a fresh subprocess so its peak RSS
(``ru_maxrss``) is its own, alternating the methods within each repetition, writing a sharded
model under ``--root``. ``task_arithmetic`` (no SVD) is the streaming floor. Reports the median
wall time, CPU time (user + system: the fair measure on a shared, loaded machine) and peak RSS
of each, and the ratios to ``svd_hybrid``. ``--combine a.json b.json`` prints one table from
runs on the same set made by separate invocations (e.g. run concurrently to save time; peak RSS
and CPU time do not depend on it, wall time does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

VOCAB = 32000
METHODS = ("task_arithmetic", "tsv_m", "iso_c", "svd_hybrid")
PARAMS = {"task_arithmetic": {"lambda": 0.3}, "tsv_m": {}, "iso_c": {}, "svd_hybrid": {}}


def llama_shapes(hidden: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    inter = int(hidden * 2.75)
    out = [("model.embed_tokens.weight", (VOCAB, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (hidden,)),
                (p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (hidden, hidden)),
                (p + "self_attn.v_proj.weight", (hidden, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                (p + "post_attention_layernorm.weight", (hidden,)),
                (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                (p + "mlp.down_proj.weight", (hidden, inter))]
    return out + [("model.norm.weight", (hidden,)), ("lm_head.weight", (VOCAB, hidden))]


def layers_for(size_gb: float, hidden: int) -> int:
    per_layer = 4 * hidden * hidden + 3 * hidden * int(hidden * 2.75) + 2 * hidden
    return max(1, round((size_gb * 1e9 / 2 - 2 * VOCAB * hidden) / per_layer))


def generate(root: Path, hidden: int, layers: int, sources: int) -> Path:
    """Base + fine-tunes as bf16 sharded safetensors (skipped when already there)."""
    import torch
    from safetensors.torch import save_file

    pool = root / f"llama_h{hidden}_l{layers}"
    names = ["base"] + [f"ft{i}" for i in range(sources)]
    if all((pool / n / "done").exists() for n in names):
        return pool
    shapes = llama_shapes(hidden, layers)
    for idx, name in enumerate(names):
        out = pool / name
        out.mkdir(parents=True, exist_ok=True)
        shard, size, weight_map = {}, 0, {}

        def flush() -> None:
            nonlocal shard, size
            if shard:
                fname = f"model-{len(set(weight_map.values())):05d}.safetensors"
                save_file(shard, str(out / fname))
                weight_map.update({k: fname for k in shard})
                shard, size = {}, 0

        for j, (key, shape) in enumerate(shapes):
            w = torch.randn(*shape, generator=torch.Generator().manual_seed(j)) * 0.02
            if idx:
                w += torch.randn(*shape, generator=torch.Generator().manual_seed(1000 * idx + j)) * 0.002
            shard[key] = w.to(torch.bfloat16)
            size += w.numel() * 2
            if size > 500e6:
                flush()
        flush()
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (out / "done").touch()
    return pool


def child(method: str, pool: Path, out: Path) -> None:
    import resource

    from mergekit_core import PluginHost
    from mergekit_core.api import MergeConfig, run_merge

    shutil.rmtree(out, ignore_errors=True)
    sources = sorted(str(p) for p in pool.iterdir() if p.name.startswith("ft"))
    data = {"sources": sources, "base_model": str(pool / "base"), "method": method,
            "method_params": PARAMS[method], "output": {"path": str(out), "shard_size": "500MB"},
            "output_dir": str(out.parent / "bundles")}
    start = time.perf_counter()
    run_merge(MergeConfig.from_dict(data).to_spec(), PluginHost())
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}))
    shutil.rmtree(out, ignore_errors=True)


def measure(method: str, pool: Path, scratch: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", method, "--pool", str(pool),
                           "--scratch", str(scratch)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/mk-subspace-memory"), help="pool and scratch folder")
    ap.add_argument("--size-gb", type=float, default=0.5, help="about this many GB per model (bf16)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=0, help="0: as many as --size-gb allows")
    ap.add_argument("--sources", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--combine", type=Path, nargs="+", default=None,
                    help="print one table from result files of runs on the same set (each method's runs pooled)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pool", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scratch", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.pool, args.scratch / f"out_{args.child}")
        return
    if args.combine:
        records = [json.loads(p.read_text()) for p in args.combine]
        combined = {**records[0], "runs": {}, "load_average": [r.get("load_average") for r in records]}
        for r in records:
            assert (r["hidden"], r["layers"], r["sources"]) == (records[0]["hidden"], records[0]["layers"],
                                                                records[0]["sources"]), "different sets"
            for m, rs in r["runs"].items():
                combined["runs"].setdefault(m, []).extend(rs)
        report(combined)
        if args.json:
            args.json.write_text(json.dumps(combined, indent=1) + "\n")
        return
    layers = args.layers or layers_for(args.size_gb, args.hidden)
    pool = generate(args.root, args.hidden, layers, args.sources)
    model_bytes = sum(f.stat().st_size for f in (pool / "base").glob("*.safetensors"))
    methods = args.methods.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for rep in range(args.repeats):
        for m in (methods if rep % 2 == 0 else methods[::-1]):
            runs[m].append(measure(m, pool, args.root))
            print(f"{m}: {runs[m][-1]}", flush=True)
    record = {"model_gb": model_bytes / 1e9, "sources": args.sources, "hidden": args.hidden, "layers": layers,
              "repeats": args.repeats, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "machine": platform.machine(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
              "runs": runs}
    report(record)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")


def report(record: dict) -> None:
    """Print the Markdown table of a result record (medians of each method's runs)."""
    runs = record["runs"]
    rows = {m: {key: statistics.median(r[key] for r in rs) for key in ("wall_s", "cpu_s", "peak_rss_mb")
                if all(key in r for r in rs)} for m, rs in runs.items()}
    ref = rows.get("svd_hybrid", {})
    print(f"\n{record['sources']} sources of {record['model_gb']:.2f} GB (bf16, hidden {record['hidden']}, "
          f"{record['layers']} layers)\n")
    print("| method | wall (s) | CPU (s) | peak RSS (MB) | CPU vs svd_hybrid | peak RSS vs svd_hybrid |")
    print("|---|---|---|---|---|---|")
    for m, r in rows.items():
        cpu = f"{r['cpu_s']:.0f}" if "cpu_s" in r else "-"
        cpu_ratio = f"{r['cpu_s'] / ref['cpu_s']:.2f}x" if "cpu_s" in r and "cpu_s" in ref else "-"
        rss_ratio = f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x" if ref else "-"
        print(f"| {m} | {r['wall_s']:.0f} | {cpu} | {r['peak_rss_mb']:.0f} | {cpu_ratio} | {rss_ratio} |")


if __name__ == "__main__":
    main()
