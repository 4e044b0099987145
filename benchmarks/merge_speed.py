"""Benchmark `mk merge` against the simplest hand-written streaming loop.

Generates synthetic Llama-shaped checkpoints (a base and 3 fine-tunes, fp16 or bf16, sharded like
Hugging Face models), then times, in one invocation and alternating the contenders:

- ``loop``: safetensors ``safe_open``, one tensor at a time, the same float32 arithmetic,
  ``save_file`` per shard (the baseline every merging tool starts from); ``loop-...-durable``
  also flushes each shard to disk, as mk does before it swaps its output into place;
- ``mk-task_arithmetic`` and ``mk-uniform``: ``run_merge`` writing a sharded model;
- ``mk-ties`` (trim_scope model: two extra passes to find the global threshold) and
  ``mk-dare_ties``, when the mk-ties plugin is installed; compared with the task-arithmetic loop.

It also times the exact top-k selection that trimming uses against a full argsort.

Each run is a fresh subprocess so its peak RSS is its own. Reports the median wall time, input
bytes per second, peak RSS, and the ratio to the loop. These machines evict idle page cache
after about 30 s, so contenders alternate within each repetition and medians are reported.

    python benchmarks/merge_speed.py --size-gb 1 --repeats 3 [--sizes 0.25,2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HIDDEN = 2048
INTERMEDIATE = 5632
VOCAB = 32000
DTYPE = "bfloat16"


def layer_bytes(elem: int) -> int:
    h, i = HIDDEN, INTERMEDIATE
    return elem * (4 * h * h + 3 * h * i + 2 * h)


def generate(root: Path, size_gb: float, dtype: str, sources: int = 3) -> Path:
    """Base + ``sources`` fine-tunes of about ``size_gb`` each (skipped when present)."""
    import torch
    from safetensors.torch import save_file

    elem = 2
    layers = max(1, round((size_gb * 1e9 - 2 * VOCAB * HIDDEN * elem) / layer_bytes(elem)))
    root = root / f"llama_{size_gb:g}gb_{dtype}"
    names = ["base"] + [f"ft{i}" for i in range(sources)]
    if all((root / n / "done").exists() for n in names):
        return root
    tdtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    for idx, name in enumerate(names):
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(idx)
        shard, shard_bytes, shard_id, weight_map = {}, 0, 0, {}

        def flush() -> None:
            nonlocal shard, shard_bytes, shard_id
            if shard:
                fname = f"model-{shard_id:05d}.safetensors"
                save_file(shard, str(out / fname))
                weight_map.update({k: fname for k in shard})
                shard, shard_bytes, shard_id = {}, 0, shard_id + 1

        def add(key: str, *shape: int) -> None:
            nonlocal shard_bytes
            base = torch.randn(*shape, generator=torch.Generator().manual_seed(hash(key) % 2**31)) * 0.02
            if idx:
                base += torch.randn(*shape, generator=gen) * 0.002
            shard[key] = base.to(tdtype)
            shard_bytes += shard[key].numel() * elem
            if shard_bytes > 500e6:
                flush()

        add("model.embed_tokens.weight", VOCAB, HIDDEN)
        for i in range(layers):
            p = f"model.layers.{i}."
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                add(p + f"self_attn.{n}.weight", HIDDEN, HIDDEN)
            add(p + "mlp.gate_proj.weight", INTERMEDIATE, HIDDEN)
            add(p + "mlp.up_proj.weight", INTERMEDIATE, HIDDEN)
            add(p + "mlp.down_proj.weight", HIDDEN, INTERMEDIATE)
            add(p + "input_layernorm.weight", HIDDEN)
            add(p + "post_attention_layernorm.weight", HIDDEN)
        add("model.norm.weight", HIDDEN)
        add("lm_head.weight", VOCAB, HIDDEN)
        flush()
        total = sum((out / f).stat().st_size for f in set(weight_map.values()))
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
        (out / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
        (out / "done").write_text("")
    del g
    return root


def run_loop(pool: Path, out: Path, method: str, durable: bool = False) -> None:
    """The baseline: the simplest correct streaming merge a user would write by hand.

    ``durable``: also flush every shard to disk (``fsync``), as mk does before it swaps an
    output into place; the like-for-like contender for mk's wall time.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    index = json.loads((pool / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    sources = sorted(p for p in pool.iterdir() if p.name.startswith("ft"))
    out.mkdir(parents=True, exist_ok=True)
    for shard in sorted(set(index.values())):
        result = {}
        with safe_open(str(pool / "base" / shard), "pt") as fb:
            handles = [safe_open(str(s / shard), "pt") for s in sources]
            for name in fb.keys():
                base = fb.get_tensor(name).float()
                acc = torch.zeros_like(base)
                for h in handles:
                    acc += h.get_tensor(name).float() - base
                if method == "uniform":
                    merged = base + acc / len(handles)
                else:
                    merged = base + 0.3 * acc
                result[name] = merged.to(torch.bfloat16)
        save_file(result, str(out / shard))
        if durable:
            fd = os.open(out / shard, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def run_mk(pool: Path, out: Path, method: str) -> None:
    from mergekit_core.config import MergeConfig
    from mergekit_core.engine import run_merge
    from mergekit_core.plugins import PluginHost

    sources = sorted(str(p) for p in pool.iterdir() if p.name.startswith("ft"))
    data = {"sources": sources, "base_model": str(pool / "base"), "method": method,
            "output": {"path": str(out), "shard_size": "500MB"}, "output_dir": str(out.parent / "bundles")}
    if method in ("task_arithmetic", "ties", "dare_ties"):
        data["method_params"] = {"lambda": 0.3}
    run_merge(MergeConfig.from_dict(data).to_spec(), PluginHost())


def child(kind: str, pool: Path, out: Path) -> None:
    import resource
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    if kind.startswith("loop-"):
        method = kind.removeprefix("loop-")
        run_loop(pool, out, method.removesuffix("-durable"), durable=method.endswith("-durable"))
    else:
        run_mk(pool, out, kind.removeprefix("mk-"))
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall_s": wall, "peak_rss_mb": rss}))
    shutil.rmtree(out, ignore_errors=True)


def measure(kind: str, pool: Path, scratch: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--pool", str(pool), "--scratch", str(scratch)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def input_bytes(pool: Path) -> int:
    return sum(f.stat().st_size for d in pool.iterdir() if d.is_dir() for f in d.glob("*.safetensors"))


LOOPS = ("task_arithmetic", "uniform")


def selection_time(n: int = 46_137_344, repeats: int = 3) -> dict:
    """Exact top-20% selection (bucket histogram + kthvalue in one bucket) versus a full argsort."""
    import torch

    try:
        from mk_ties.select import top_mask
    except ImportError:
        return {}
    a = torch.randn(n).abs()
    m = int(0.2 * n)
    out = {}
    for label, fn in (("histogram_top_mask", lambda: top_mask(a, m)),
                      ("argsort", lambda: torch.argsort(a, descending=True)[:m])):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[label + "_s"] = round(statistics.median(times), 3)
    out["elements"] = n
    out["speedup"] = round(out["argsort_s"] / out["histogram_top_mask_s"], 1)
    return out


def help_time(repeats: int = 5) -> dict:
    mk = Path(sys.executable).parent / "mk"
    out = {}
    for args in (["--help"], ["merge", "--help"], ["plugins", "list"]):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([str(mk), *args], capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        out["mk " + " ".join(args)] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1", help="comma-separated checkpoint sizes in GB (each of 4 models)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default=os.environ.get("MK_BENCH_DATA", "/tmp/mk-bench"),
                        help="where the synthetic checkpoints are generated (reused across runs)")
    parser.add_argument("--methods", default="task_arithmetic,uniform,ties,dare_ties")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child")
    parser.add_argument("--pool")
    parser.add_argument("--scratch")
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.pool), Path(args.scratch) / "out")
        return
    data = Path(args.data)
    results = {"help_seconds": help_time(), "selection": selection_time(), "sizes": {}}
    for size in [float(s) for s in args.sizes.split(",")]:
        pool = generate(data, size, DTYPE)
        nbytes = input_bytes(pool)
        scratch = data / "scratch"
        scratch.mkdir(parents=True, exist_ok=True)
        rows = {}
        for method in args.methods.split(","):
            loop = f"loop-{method}" if method in LOOPS else "loop-task_arithmetic"
            kinds = [loop, f"{loop}-durable", f"mk-{method}"] if loop not in rows else [f"mk-{method}"]
            runs: dict[str, list[dict]] = {k: [] for k in kinds}
            for _ in range(args.repeats):
                for kind in kinds:
                    runs[kind].append(measure(kind, pool, scratch))
            for kind in kinds:
                wall = statistics.median(r["wall_s"] for r in runs[kind])
                rows[kind] = {"wall_s": round(wall, 2), "input_MBps": round(nbytes / wall / 1e6, 1),
                              "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in runs[kind]), 1)}
            rows[f"mk-{method}"]["speed_vs_loop"] = round(rows[loop]["wall_s"] / rows[f"mk-{method}"]["wall_s"], 2)
            rows[f"mk-{method}"]["compared_with"] = loop
            rows[f"mk-{method}"]["speed_vs_durable_loop"] = round(
                rows[f"{loop}-durable"]["wall_s"] / rows[f"mk-{method}"]["wall_s"], 2)
        results["sizes"][f"{size:g}GB"] = {"input_bytes": nbytes, "runs": rows}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
