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

``--suite disk`` (issue 17) runs, on one pool (``--pool``, e.g. ../shared/bench/make_models.py's,
or a generated one), the contenders the speed targets are measured against, alternating, medians
of ``--repeats``:

- ``floor``: read every input file once and write (and flush) the output's bytes: the I/O floor;
- ``ideal-<method>``: ../shared/bench/ideal_merge.py (the plain torch loop, mergekit's formulas);
- ``suite-<method>``: ``mk merge`` of this tree in a fresh process, and, with ``--head DIR`` (a
  copy of an earlier tree's ``mergekit_core`` and ``mk_ties``, e.g. from ``git archive``),
  ``head-<method>``: the same command before a change, in the same run;
- ``inproc-task_arithmetic``: the same merge by ``run_merge`` in a process that imported torch and
  mk before the clock started (the merge alone, as the floor is timed), and ``import-torch``: a
  fresh ``python -c 'import torch'`` (most of what a fresh ``mk merge`` pays before it reads),
  and ``import-torch-mk`` the same with the garbage-collector settings of the ``mk`` process;
- ``ideal-<method>-passive`` with ``--passive-loop``: the loop with ``OMP_WAIT_POLICY=PASSIVE``,
  the OpenMP setting ``mk`` chooses for itself;
- ``mergekit-<method>`` with ``--peer``: mergekit's ``mergekit-yaml`` on the same inputs
  (``--peer-repeats N``: in the first N repetitions only; its TIES takes minutes).

Each row has the median wall time, peak RSS and ``cpu_s`` (user + system CPU seconds, child
processes included: the work done, whatever overlapped). TIES is timed with mergekit's conventions on both sides (k = 20% per tensor, weighted election,
weighted mean), DARE-TIES with density 0.2, L1 rescale and a plain sum; ``ties_model`` is mk's
default ``trim_scope: model``.
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


SUITE_PARAMS = {
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.3}),
    "ties": ("ties", {"lambda": 0.3, "k": 20.0, "trim_scope": "tensor", "weighted_election": True,
                      "aggregate": "weighted_mean", "sign_tie": "positive"}),
    "ties_model": ("ties", {"lambda": 0.3, "k": 20.0, "trim_scope": "model", "weighted_election": True,
                            "aggregate": "weighted_mean", "sign_tie": "positive"}),
    "dare_ties": ("dare_ties", {"lambda": 0.3, "p": 0.8, "rescale": "l1", "aggregate": "sum",
                                "weighted_election": True, "sign_tie": "positive"}),
}
"""The suite's mk settings: mergekit's conventions, as ideal_merge.py and mergekit compute them."""


def merge_config(pool: Path, out: Path, method: str, suite: bool = False) -> dict:
    """The merge of ``pool``'s fine-tunes into ``out``: the suite's settings, or the method's
    defaults with lambda 0.3."""
    sources = sorted(str(p) for p in pool.iterdir() if p.name.startswith("ft"))
    name, params = SUITE_PARAMS[method] if suite else (method, {})
    if not params and method in ("task_arithmetic", "ties", "dare_ties"):
        params = {"lambda": 0.3}
    data = {"sources": sources, "base_model": str(pool / "base"), "method": name,
            "output": {"path": str(out), "shard_size": "500MB"}, "output_dir": str(out.parent / "bundles")}
    return {**data, "method_params": params} if params else data


def run_mk_cli(pool: Path, out: Path, method: str) -> None:
    """``mk merge CONFIG`` in a fresh process: what a user runs (its startup and settings included)."""
    config = out.parent / "mk.yaml"  # JSON text: YAML reads it
    config.write_text(json.dumps(merge_config(pool, out, method, suite=True)))
    # `python -m mergekit_core` runs what the `mk` executable runs, and also an earlier tree's (--head,
    # first on PYTHONPATH); run from the scratch folder, as `-m` puts the working directory first on
    # the import path, before PYTHONPATH (from the repository root, --head would run this tree)
    subprocess.run([sys.executable, "-m", "mergekit_core", "merge", str(config), "--force"],
                   check=True, capture_output=True, cwd=out.parent)


def run_mk(pool: Path, out: Path, method: str) -> None:
    from mergekit_core.config import MergeConfig
    from mergekit_core.engine import run_merge
    from mergekit_core.plugins import PluginHost

    run_merge(MergeConfig.from_dict(merge_config(pool, out, method)).to_spec(), PluginHost())


def checkpoint_files(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def run_floor(pool: Path, out: Path) -> None:
    """The I/O floor: read every input file once (8 MiB reads), write the base's bytes, flush."""
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    for model in sorted(p for p in pool.iterdir() if p.is_dir() and (p / "config.json").exists()):
        for f in checkpoint_files(model):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(view):
                    pass
    out.mkdir(parents=True, exist_ok=True)
    for f in checkpoint_files(pool / "base"):
        size = f.stat().st_size
        fd = os.open(out / f.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            while size > 0:
                size -= os.write(fd, view[:min(size, len(buf))])
            os.fsync(fd)
        finally:
            os.close(fd)
    dfd = os.open(out, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)


IDEAL = Path(__file__).resolve().parents[2] / "shared" / "bench" / "ideal_merge.py"


def run_ideal(pool: Path, out: Path, method: str) -> None:
    models = sorted(str(p) for p in pool.iterdir() if p.name.startswith("ft"))
    subprocess.run([sys.executable, str(IDEAL), "--method", method, "--base", str(pool / "base"), "--models",
                    *models, "--weights", *["0.3"] * len(models), "--density", "0.2", "--out", str(out)],
                   check=True, capture_output=True)


def run_mergekit(pool: Path, out: Path, method: str) -> None:
    models = sorted(str(p) for p in pool.iterdir() if p.name.startswith("ft"))
    params = {"weight": 0.3} if method == "task_arithmetic" else {"weight": 0.3, "density": 0.2}
    lines = [f"merge_method: {method}", f"base_model: {pool / 'base'}", "dtype: bfloat16", "models:"]
    for m in models:
        lines += [f"  - model: {m}", "    parameters:"] + [f"      {k}: {v}" for k, v in params.items()]
    if method != "task_arithmetic":
        lines += ["parameters:", "  normalize: " + ("true" if method == "ties" else "false")]
    config = out.parent / "mergekit.yaml"
    config.write_text("\n".join(lines) + "\n")
    subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"), str(config), str(out)],
                   check=True, capture_output=True)


def child(kind: str, pool: Path, out: Path) -> None:
    import resource
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    if kind.startswith("inproc-"):  # the merge alone: torch and mk imported before the clock starts
        import mergekit_core.config
        import mergekit_core.engine
        import mergekit_core.plugins  # noqa: F401
    cpu_before = sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                       resource.getrusage(resource.RUSAGE_CHILDREN)))
    start = time.perf_counter()
    if kind == "import-torch":  # the fixed cost a fresh `mk merge` pays before it reads a byte
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
    elif kind == "import-torch-mk":  # the same with the garbage-collector settings of the mk process
        subprocess.run([sys.executable, "-c", "from mergekit_core.cli import fewer_collections; "
                        "fewer_collections(); import gc, torch; gc.freeze()"], check=True)
    elif kind.startswith("loop-"):
        method = kind.removeprefix("loop-")
        run_loop(pool, out, method.removesuffix("-durable"), durable=method.endswith("-durable"))
    elif kind == "floor":
        run_floor(pool, out)
    elif kind.startswith("ideal-"):
        run_ideal(pool, out, kind.removeprefix("ideal-").removesuffix("-passive"))
    elif kind.startswith("mergekit-"):
        run_mergekit(pool, out, kind.removeprefix("mergekit-"))
    elif kind.startswith(("suite-", "head-")):
        run_mk_cli(pool, out, kind.split("-", 1)[1])
    else:
        run_mk(pool, out, kind.removeprefix("mk-").removeprefix("inproc-"))
    wall = time.perf_counter() - start
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    rss = max(u.ru_maxrss for u in usage) / 1024
    cpu = sum(u.ru_utime + u.ru_stime for u in usage) - cpu_before
    print(json.dumps({"wall_s": wall, "peak_rss_mb": rss, "cpu_s": cpu}))
    shutil.rmtree(out, ignore_errors=True)


def measure(kind: str, pool: Path, scratch: Path, head: str | None = None) -> dict:
    env = dict(os.environ)
    if kind.endswith("-passive") or kind.startswith("inproc-"):  # inproc: as `mk` sets it
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if kind.startswith("head-"):  # the earlier tree's packages first on the path
        env["PYTHONPATH"] = head + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--child-pool", str(pool), "--scratch", str(scratch)],
                          capture_output=True, text=True, check=False, env=env)
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
    parser.add_argument("--suite", choices=("disk",), help="run the issue-17 contenders on --pool instead")
    parser.add_argument("--pool", dest="suite_pool", help="with --suite: a base/ and ft*/ pool (make_models.py)")
    parser.add_argument("--head", help="with --suite: a folder holding an earlier mergekit_core and mk_ties")
    parser.add_argument("--peer", action="store_true", help="with --suite: also time mergekit-yaml")
    parser.add_argument("--peer-repeats", type=int, default=0,
                        help="with --peer: run mergekit in the first N repetitions only (0: all)")
    parser.add_argument("--passive-loop", action="store_true",
                        help="with --suite: also time ideal_merge.py with OMP_WAIT_POLICY=PASSIVE (what mk sets)")
    parser.add_argument("--child")
    parser.add_argument("--child-pool", dest="pool")
    parser.add_argument("--scratch")
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.pool), Path(args.scratch) / "out")
        return
    data = Path(args.data)
    if args.suite:
        methods = tuple(m for m in args.methods.split(",") if m in ("task_arithmetic", "ties", "dare_ties"))
        suite(Path(args.suite_pool), data / "scratch", args.repeats, args.head, args.peer, args.json, methods,
              peer_repeats=args.peer_repeats, passive_loop=args.passive_loop)
        return
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


SUITE_RATIOS = [  # (row, compared with): the targets
    ("suite-task_arithmetic", "floor"), ("inproc-task_arithmetic", "floor"),
    ("suite-task_arithmetic", "ideal-task_arithmetic"),
    ("suite-ties", "ideal-ties"), ("suite-dare_ties", "ideal-dare_ties"), ("suite-ties_model", "suite-ties"),
    ("suite-ties", "ideal-ties-passive"), ("suite-dare_ties", "ideal-dare_ties-passive"),
    ("suite-ties", "head-ties"), ("suite-ties_model", "head-ties_model"), ("suite-dare_ties", "head-dare_ties"),
    ("suite-task_arithmetic", "head-task_arithmetic"),
    ("suite-task_arithmetic", "mergekit-task_arithmetic"), ("suite-ties", "mergekit-ties"),
    ("suite-dare_ties", "mergekit-dare_ties"),
]


def suite(pool: Path, scratch: Path, repeats: int, head: str | None, peer: bool, json_path: str | None,
          methods: tuple[str, ...] = ("task_arithmetic", "ties", "dare_ties"), *, peer_repeats: int = 0,
          passive_loop: bool = False) -> None:
    """Every contender once per repetition, in turn; medians, and the ratios of ``SUITE_RATIOS``
    (time of the row / time of the one it is compared with: below 1 is faster). mk runs as
    ``mk merge`` in a fresh process, as the loop and mergekit do."""
    kinds = ["floor"]
    for method in methods:
        if method == "task_arithmetic":  # the merge without the process start, and that start
            kinds += ["inproc-task_arithmetic", "import-torch", "import-torch-mk"]
        kinds.append(f"ideal-{method}")
        if passive_loop and method != "task_arithmetic":
            kinds.append(f"ideal-{method}-passive")
        kinds.append(f"suite-{method}")
        if head:
            kinds.append(f"head-{method}")
        if peer:
            kinds.append(f"mergekit-{method}")
        if method == "ties":
            kinds += ["suite-ties_model"] + (["head-ties_model"] if head else [])
    scratch.mkdir(parents=True, exist_ok=True)
    if head:  # the head contenders must import the earlier tree, not this one
        env = {**os.environ, "PYTHONPATH": head + os.pathsep + os.environ.get("PYTHONPATH", "")}
        found = subprocess.run([sys.executable, "-c", "import mergekit_core; print(mergekit_core.__file__)"], env=env,
                               cwd=scratch, capture_output=True, text=True, check=True).stdout.strip()
        if not Path(found).resolve().is_relative_to(Path(head).resolve()):
            raise SystemExit(f"--head {head}: its mergekit_core is not the one imported ({found})")
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for r in range(repeats):
        for kind in kinds:
            if kind.startswith("mergekit-") and peer_repeats and r >= peer_repeats:
                continue
            runs[kind].append(measure(kind, pool, scratch, head))
            print(f"repeat {r + 1}: {kind} {runs[kind][-1]['wall_s']:.2f} s", file=sys.stderr, flush=True)
    nbytes = input_bytes(pool)
    rows = {k: {"wall_s": round(statistics.median(x["wall_s"] for x in v), 2),
                "walls_s": [round(x["wall_s"], 2) for x in v],
                "cpu_s": round(statistics.median(x["cpu_s"] for x in v), 2),
                "peak_rss_mb": round(statistics.median(x["peak_rss_mb"] for x in v), 1)} for k, v in runs.items()}
    ratios = {f"{a} / {b}": round(rows[a]["wall_s"] / rows[b]["wall_s"], 2)
              for a, b in SUITE_RATIOS if a in rows and b in rows}
    result = {"pool": str(pool), "input_bytes": nbytes, "repeats": repeats, "load_average_after": os.getloadavg(),
              "runs": rows, "ratios": ratios}
    print(json.dumps(result, indent=2))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
