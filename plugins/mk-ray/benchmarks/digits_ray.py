"""The same 16-point sweep on the digits pool with the local executor and with Ray on 1 and 2
workers, and the start-up cost of a private Ray cluster.

    unshare -n bash -c 'ip link set lo up && exec python plugins/mk-ray/benchmarks/digits_ray.py \
        --pool demo-output/digits-pool --out plugins/mk-ray/benchmarks/results/digits.json'

(The network namespace keeps Ray on loopback; without root, drop the ``unshare`` wrapper: the
executor's own defaults still bind 127.0.0.1 only.) Builds the pool when it is missing.

The sweep: task arithmetic of the pool's 8 full fine-tunes, a grid of 16 lambdas in
[0.05, 0.8], scored by the ``digits`` evaluator on a stratified 200-example validation subset per
task; every run writes into a fresh output folder, so each pays for the 8 fine-tunes' own metrics
too. Each round runs, in turn:

- ``local``: the sweep with the local executor;
- ``ray_1``, ``ray_2``: the sweep through ``executor: ray`` with ``max_concurrent`` 1 and 2 and
  ``address: local`` on 2 CPUs: each starts and stops its own private cluster, as a user's does;
- on one cluster that this process starts (``startup_s``: ``ray.init`` as the executor does it)
  and stops (``shutdown_s``), the executor attaching to it: ``cold_1`` (the first sweep: its
  worker imports mergekit and loads the evaluator's data), ``warm_1``, ``cold_2`` (the first
  sweep on 2 workers: the second one starts cold), ``warm_2``.

Medians over the rounds. Per-trial overhead of a warm cluster: (warm_1 - local) / 16; of a
user's whole Ray sweep: (ray_1 - local) / 16, start-up included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = ["upright", "rotated", "mirrored", "inverted", "shifted", "noisy", "parity", "mod3"]
LAMBDAS = [round(0.05 + 0.05 * i, 2) for i in range(16)]
_HOST = []


def host():
    """One plugin host for every sweep of this process: the local executor keeps the evaluator's
    loaded data from sweep to sweep, as a warm Ray worker does."""
    from mergekit_core import PluginHost

    if not _HOST:
        _HOST.append(PluginHost())
    return _HOST[0]


def sweep_config(pool: Path, out: Path, executor: dict | None) -> dict:
    data = {"sources": [str(pool / t) for t in TASKS], "base_model": str(pool / "base"),
            "method": "task_arithmetic", "search": {"type": "grid", "grid": {"lambda": LAMBDAS}},
            "evaluator": "digits", "evaluator_params": {"pool": str(pool)}, "eval_tasks": TASKS,
            "split": "validation",
            "eval_subset": {"enabled": True, "seed": 0, "stratified": True, "max_samples": 200},
            "output_dir": str(out)}
    if executor:
        data["executor"] = executor
    return data


def timed_sweep(pool: Path, work: Path, name: str, executor: dict | None) -> dict:
    from mergekit_core.api import MergeConfig, run_sweep

    out = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
    t0 = time.perf_counter()
    result = run_sweep(MergeConfig.from_dict(sweep_config(pool, out, executor)), host())
    wall = time.perf_counter() - t0
    assert len(result["points"]) == 16 and not result["failed"], result.get("failed")
    return {"wall_s": wall, "scores": {str(r["point"]["lambda"]): r["score"] for r in result["points"]},
            "trial_s": statistics.median(r["merge_s"] + r["eval_s"] for r in result["points"])}


def on_one_cluster(pool: Path, work: Path) -> dict:
    """A private cluster started and stopped the way the executor does it; three sweeps on it."""
    from mk_ray.executor import RayExecutor, RaySession

    session = RaySession(RayExecutor().resolve_params({"cluster_cpus": 2}))
    t0 = time.perf_counter()
    session.connect()
    out = {"startup_s": time.perf_counter() - t0}
    try:
        for name, n in (("cold_1", 1), ("warm_1", 1), ("cold_2", 2), ("warm_2", 2)):
            out[name] = timed_sweep(pool, work, name, {"name": "ray", "params": {"max_concurrent": n}})
    finally:
        t1 = time.perf_counter()
        session.close()
    out["shutdown_s"] = time.perf_counter() - t1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=Path, required=True, help="the digits pool (built when missing)")
    ap.add_argument("--out", type=Path, required=True, help="results JSON")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new one in /tmp)")
    args = ap.parse_args()
    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                       "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1"}.items():
        os.environ.setdefault(key, value)
    import torch

    torch.set_num_threads(1)
    if not (args.pool / "pool.json").is_file():
        subprocess.run([str(Path(sys.executable).parent / "mk"), "digits", "build", "--out", str(args.pool)],
                       check=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="mk-ray-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {"local": [], "ray_1": [], "ray_2": [], "cluster": []}
    for r in range(args.rounds):
        runs["local"].append(timed_sweep(args.pool, work, "local", None))
        for n in (1, 2):
            executor = {"name": "ray", "params": {"cluster_cpus": 2, "max_concurrent": n}}
            runs[f"ray_{n}"].append(timed_sweep(args.pool, work, f"ray{n}", executor))
        runs["cluster"].append(on_one_cluster(args.pool, work))
        c = runs["cluster"][-1]
        print(f"round {r + 1}: local {runs['local'][-1]['wall_s']:.1f} s, ray_1 {runs['ray_1'][-1]['wall_s']:.1f} s, "
              f"ray_2 {runs['ray_2'][-1]['wall_s']:.1f} s, start-up {c['startup_s']:.1f} s, cold_1 "
              f"{c['cold_1']['wall_s']:.1f} s, warm_1 {c['warm_1']['wall_s']:.1f} s, "
              f"cold_2 {c['cold_2']['wall_s']:.1f} s, warm_2 {c['warm_2']['wall_s']:.1f} s", flush=True)
    reference = runs["local"][0]["scores"]
    for name in ("local", "ray_1", "ray_2"):  # where a trial runs must not change its score
        assert all(run["scores"] == reference for run in runs[name]), name
    assert all(c[k]["scores"] == reference for c in runs["cluster"] for k in ("cold_1", "warm_1", "cold_2", "warm_2"))

    def median(values) -> float:
        return statistics.median(list(values))

    med = {k: median(x["wall_s"] for x in runs[k]) for k in ("local", "ray_1", "ray_2")}
    med.update({k: median(c[k]["wall_s"] for c in runs["cluster"]) for k in ("cold_1", "warm_1", "cold_2", "warm_2")})
    summary = {
        **{f"{k}_s": v for k, v in med.items()},
        "startup_s": median(c["startup_s"] for c in runs["cluster"]),
        "shutdown_s": median(c["shutdown_s"] for c in runs["cluster"]),
        "local_trial_s": median(x["trial_s"] for x in runs["local"]),
        "overhead_per_trial_warm_s": (med["warm_1"] - med["local"]) / 16,
        "overhead_per_trial_ray_1_s": (med["ray_1"] - med["local"]) / 16,
        "warm_2_over_warm_1": med["warm_2"] / med["warm_1"],
    }
    import ray as ray_module

    result = {"summary": summary, "runs": runs, "rounds": args.rounds, "points": 16,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                          "ray": ray_module.__version__,
                          "note": "2 cores shared with other agents' jobs while measuring"},
              "pool_settings": json.loads((args.pool / "pool.json").read_text()).get("settings")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
