"""Time the lm_eval evaluator on the tiny pool (``mk lm-eval tiny``): one evaluation in memory
against from disk, lm-eval's own ``simple_evaluate`` as the peer, and the overhead per sweep point.

    python plugins/mk-lm-eval/benchmarks/eval_time.py [--out /tmp/lm-eval-bench] [--rounds 15]

One evaluation: task tiny_a, its test split (24 four-way documents), the model given as

- ``in_memory``: a merge's state dict, copied into the base-architecture model the evaluator
  loaded once (what sweeps and ``mk merge`` optimizers pass);
- ``from_disk``: the merged model's directory, loaded with ``from_pretrained`` per evaluation;
- ``lm_eval_simple_evaluate``: lm-eval's ``simple_evaluate(model="hf", pretrained=DIR)``, the
  same directory, task index without lm-eval's registry (its usual cost is higher).

The three alternate within each round; medians are reported. Then a grid sweep over 6 lambda
values on both tasks (validation split): wall time per point, and the part of it that is not
lm-eval's scoring loop itself (the same two scorings of an already-loaded model, timed alone):
``overhead_per_point_s`` = median (merge + evaluation) of a point - scoring alone. The sweep's
wall time also holds the one-time scoring of the two fine-tunes (their own metrics, then cached).
One CPU thread. Writes ``benchmarks/results/eval_time.json`` beside this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/lm-eval-bench"))
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_CACHE", str(args.out / "hf-datasets"))  # before datasets is imported

    import yaml
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from mk_lm_eval.run import evaluate as score
    from mk_lm_eval.run import wrap
    from mk_lm_eval.tiny import TASKS, build

    from mergekit_core.api import MergeConfig, run_merge, run_sweep
    from mergekit_core.testing import fresh_host

    host = fresh_host(entry_points=True)
    pool = build(args.out / "pool")
    spec = MergeConfig.from_dict({"sources": [str(pool[t]) for t in TASKS], "base_model": str(pool["base"]),
                                  "method": "task_arithmetic", "method_params": {"lambda": 0.5},
                                  "output": {"path": str(args.out / "merged")},
                                  "output_dir": str(args.out / "artifacts")}).to_spec()
    merged_dir = str(run_merge(spec, host, force=True).output_path)
    state = run_merge(spec, host, in_memory=True, write_bundle=False).state_dict

    ev = host.get("evaluator", "lm_eval")
    params = ev.resolve_params({"tasks": [str(pool[f"{t}.yaml"]) for t in TASKS], "base_model": str(pool["base"]),
                                "device": "cpu"})
    ev.tasks(params)  # tasks and data loaded once per process, as in mk merge and mk sweep
    t0 = time.perf_counter()
    first = ev.evaluate(state, "tiny_a", "test", None, params)
    first_in_memory = time.perf_counter() - t0  # includes loading the base architecture once
    manager = TaskManager(include_defaults=False)

    def in_memory() -> float:
        return ev.evaluate(state, "tiny_a", "test", None, params)["acc"]

    def from_disk() -> float:
        return ev.evaluate(merged_dir, "tiny_a", "test", None, params)["acc"]

    def peer() -> float:
        r = simple_evaluate(model="hf", model_args={"pretrained": merged_dir, "device": "cpu"},
                            tasks=[str(pool["tiny_a.yaml"])], bootstrap_iters=0, log_samples=False,
                            task_manager=manager)
        return r["results"]["tiny_a"]["acc,none"]

    runs = {"in_memory": in_memory, "from_disk": from_disk, "lm_eval_simple_evaluate": peer}
    times: dict[str, list[float]] = {k: [] for k in runs}
    accs: dict[str, float] = {}
    from mk_lm_eval.tasks import quiet

    with quiet():
        for _ in range(args.rounds):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                accs[name] = fn()
                times[name].append(time.perf_counter() - t0)
    assert len(set(accs.values())) == 1 and accs["in_memory"] == first["acc"], accs
    med = {k: statistics.median(v) for k, v in times.items()}

    grid = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    config = {"sources": list(TASKS), "sources_root": str(pool["base"].parent), "base_model": str(pool["base"]),
              "method": "task_arithmetic", "evaluator": "lm_eval",
              "evaluator_params": {"include_path": str(pool["tiny_a.yaml"].parent), "tasks": list(TASKS),
                                   "base_model": str(pool["base"]), "device": "cpu"},
              "split": "validation", "search": {"type": "grid", "grid": {"lambda": grid}},
              "output_dir": str(args.out / "sweep-artifacts")}
    path = args.out / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    from mergekit_core.api import load_merge_config

    t0 = time.perf_counter()
    sweep = run_sweep(load_merge_config(path), host)
    sweep_wall = time.perf_counter() - t0
    points = sweep["points"]
    # the scoring alone: lm-eval's loop on an already-loaded model, both tasks, per point
    from mk_lm_eval.models import language_model
    from mk_lm_eval.tasks import load_task

    bare = []
    with quiet():
        lm = wrap(*language_model(state, str(pool["base"]), "float32", "cpu"), 16)
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for task in TASKS:
                score(lm, load_task(str(pool[f"{task}.yaml"]), None, None).select("validation"), None)
            bare.append(time.perf_counter() - t0)
    per_point = statistics.median(r["merge_s"] + r["eval_s"] for r in points)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "rounds": args.rounds,
        "one_evaluation_s": {k: round(v, 4) for k, v in med.items()},
        "first_in_memory_evaluation_s": round(first_in_memory, 4),
        "from_disk_over_in_memory": round(med["from_disk"] / med["in_memory"], 2),
        "simple_evaluate_over_in_memory": round(med["lm_eval_simple_evaluate"] / med["in_memory"], 2),
        "sweep": {
            "points": len(points), "tasks": list(TASKS), "split": "validation",
            "wall_s": round(sweep_wall, 3), "wall_per_point_s": round(sweep_wall / len(points), 4),
            "median_point_s": round(per_point, 4),
            "median_merge_s": round(statistics.median(r["merge_s"] for r in points), 4),
            "median_eval_s": round(statistics.median(r["eval_s"] for r in points), 4),
            "scoring_alone_s": round(statistics.median(bare), 4),
            "overhead_per_point_s": round(per_point - statistics.median(bare), 4),
        },
    }
    out = Path(__file__).parent / "results" / "eval_time.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
