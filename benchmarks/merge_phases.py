"""Where a merge's time goes, per phase: read, deltas (cast to float32 and subtract the base),
select (top-k masks), elect + aggregate, prepare passes (TIES ``trim_scope: model``), cast and
checks, write.

Wraps the engine's and mk-ties' functions with timers (no change to what they compute) and runs
one ``run_merge`` in this process. Reading happens on a reader thread while the main thread
computes, so "read (reader thread)" overlaps the rest; "wait for read" is the main thread's idle
time waiting for it; the same for "write (writer thread)" and "wait for write". "other" is the main thread's remaining time: casts to the output dtype,
finiteness checks, norms, plan and bookkeeping.

    python benchmarks/merge_phases.py --pool DIR --method ties --trim-scope tensor --out /tmp/x/out

``--trees this,OLD --repeats 5`` runs the same merge in fresh processes, alternating this tree
with an earlier one (``OLD``: a folder holding its ``mergekit_core`` and ``mk_ties``, put first on
the import path), and prints the medians of wall time, CPU seconds and phases for each.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

TIMES: dict[str, float] = defaultdict(float)
_ACTIVE = threading.local()
PREPARE = "prepare passes (model-scope threshold)"
_IN_PREPARE: set[str] = set()


def timed(owner: Any, attr: str, label: str) -> None:
    """Replace ``owner.attr`` by a wrapper adding its wall time to ``TIMES[label]`` (outermost call only)."""
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if getattr(_ACTIVE, label, False):
            return fn(*args, **kwargs)
        key = f"{PREPARE}: {label}" if PREPARE in _IN_PREPARE and label != PREPARE else label
        setattr(_ACTIVE, label, True)
        if label == PREPARE:
            _IN_PREPARE.add(PREPARE)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[key] += time.perf_counter() - start
            setattr(_ACTIVE, label, False)
            _IN_PREPARE.discard(label)

    setattr(owner, attr, wrapper)


def instrument() -> None:
    from mergekit_core.engine import merger, stream
    from mergekit_core.io import writer

    timed(merger.TensorMerger, "read", "read (reader thread)")
    timed(merger.TensorMerger, "read_copy", "read (reader thread)")
    timed(merger.TensorMerger, "deltas", "deltas (to float32, minus base)")
    timed(merger.TensorMerger, "fused", "fused linear (deltas, sum, cast)")
    timed(writer.StreamingSafetensorsWriter, "write", "write (writer thread)")
    timed(writer.StreamingSafetensorsWriter, "close", "write (writer thread)")
    from mergekit_core.io import destination

    timed(destination, "_settle_tree", "flush to disk (fsync before publishing)")
    if hasattr(stream, "_BackgroundSink"):
        timed(stream._BackgroundSink, "drain", "wait for write")
    original = stream._prefetched

    def waiting(m: Any, tensors: Any) -> Any:
        it = original(m, tensors)
        while True:
            start = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                TIMES["wait for read"] += time.perf_counter() - start
            yield item

    stream._prefetched = waiting
    try:
        import mk_ties.global_trim as gt
        import mk_ties.kernels as kernels
        import mk_ties.methods as methods
        import mk_ties.select as select
    except ImportError:
        return
    timed(select, "top_mask", "select (top-k masks)")
    if hasattr(select, "top_magnitude_mask"):
        timed(select, "top_magnitude_mask", "select (top-k masks)")
    timed(gt.GlobalTrim, "mask", "select (top-k masks)")
    timed(kernels, "elect_and_merge", "elect + aggregate")
    timed(kernels, "dare", "dare masks")
    timed(methods.Ties, "prepare", PREPARE)
    if hasattr(kernels, "ties_merge"):
        timed(kernels, "ties_merge", "select + elect + aggregate (fused)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", required=True, help="a base/ and ft*/ folders (make_models.py or merge_speed.py)")
    parser.add_argument("--method", default="ties")
    parser.add_argument("--trim-scope", default="tensor")
    parser.add_argument("--out", required=True, help="output folder (deleted before and after)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--params", help="method parameters as JSON (default: lambda 0.3 and --trim-scope)")
    parser.add_argument("--trees", help="comma-separated: 'this' and folders of earlier trees, run alternately")
    parser.add_argument("--repeats", type=int, default=5, help="with --trees: runs of each")
    args = parser.parse_args()
    if args.trees:
        compare_trees(args)
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from mergekit_core.config import MergeConfig
    from mergekit_core.engine import run_merge
    from mergekit_core.plugins import PluginHost

    instrument()
    pool, out = Path(args.pool), Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    params: dict[str, Any] = {"lambda": 0.3} if args.method != "ties" else {"lambda": 0.3, "trim_scope": args.trim_scope}
    if args.params:
        params = json.loads(args.params)
    data = {"sources": sorted(str(p) for p in pool.iterdir() if p.name.startswith("ft")),
            "base_model": str(pool / "base"), "method": args.method, "method_params": params,
            "output": {"path": str(out), "shard_size": "500MB"}, "output_dir": str(out.parent / "bundles")}
    spec, host = MergeConfig.from_dict(data).to_spec(), PluginHost()
    cpu = time.process_time()
    start = time.perf_counter()
    run_merge(spec, host)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    shutil.rmtree(out, ignore_errors=True)
    main_thread = sum(v for k, v in TIMES.items()
                      if "thread)" not in k and not k.startswith(PREPARE + ":"))
    phases = {k: round(v, 2) for k, v in sorted(TIMES.items(), key=lambda kv: -kv[1])}
    phases["other (cast, checks, norms, plan)"] = round(wall - main_thread, 2)
    print(json.dumps({"method": args.method, "trim_scope": args.trim_scope if args.method == "ties" else None,
                      "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "phases_s": phases,
                      "mergekit_core": str(Path(sys.modules["mergekit_core"].__file__).parent)}, indent=1))


def compare_trees(args: argparse.Namespace) -> None:
    """This script once per tree and repetition, in fresh processes, alternating; medians."""
    import os
    import statistics
    import subprocess

    trees = args.trees.split(",")
    forwarded = ["--pool", args.pool, "--method", args.method, "--trim-scope", args.trim_scope, "--out", args.out,
                 "--threads", str(args.threads)] + (["--params", args.params] if args.params else [])
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in trees}
    for _ in range(args.repeats):
        for tree in trees:
            env = dict(os.environ)
            if tree != "this":
                env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")
            done = subprocess.run([sys.executable, __file__, *forwarded], env=env, capture_output=True,
                                  text=True, check=True)
            result = json.loads(done.stdout)
            if tree != "this" and not Path(result["mergekit_core"]).resolve().is_relative_to(Path(tree).resolve()):
                raise SystemExit(f"{tree}: its mergekit_core is not the one imported ({result['mergekit_core']})")
            runs[tree].append(result)
    summary = {}
    for tree, results in runs.items():
        phases = {k for r in results for k in r["phases_s"]}
        summary[tree] = {"wall_s": statistics.median(r["wall_s"] for r in results),
                         "walls_s": [r["wall_s"] for r in results],
                         "cpu_s": statistics.median(r["cpu_s"] for r in results),
                         "phases_s": {k: statistics.median(r["phases_s"].get(k, 0.0) for r in results)
                                      for k in sorted(phases)}}
    print(json.dumps({"method": args.method, "repeats": args.repeats, "trees": summary}, indent=1))


if __name__ == "__main__":
    main()
