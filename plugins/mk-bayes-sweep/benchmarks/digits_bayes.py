"""Bayesian search of task-arithmetic coefficients on the offline digits pool, against a grid and
against Optuna's GPSampler and TPESampler.

    pip install torch==2.13.0 optuna          # the peers (the plugin's `benchmark` extra)
    python plugins/mk-bayes-sweep/benchmarks/digits_bayes.py --pool demo-output/digits-pool \
        --out plugins/mk-bayes-sweep/benchmarks/results/digits.json

Builds the pool when it is missing. The objective of every search is the mean accuracy of the
merged model over the 8 tasks on the full validation split; test accuracy is measured once, for
the point each search found best on validation. Every merge is task arithmetic of the 8
fine-tunes (``weighted_delta`` with the ``per_task`` policy: base + sum_t lambda_t tau_t), merged
in memory by ``run_merge`` and scored by the ``digits`` evaluator.

(a) one lambda for all tasks, lambda in [0, 1]: the best of a 41-point grid (step 0.025), and how
    many evaluations each search needs to come within 0.5 accuracy points of it (budget --budget-a).
(b) one lambda per task (8 dimensions, each in [0, 1]), budget --budget-b: the best validation
    accuracy found and its test accuracy, against the grid's best scalar lambda.

Every search starts from the same number of quasi-random points (``--init-a``, ``--init-b``;
Optuna's ``n_startup_trials``); seeds 0, 1, 2 by default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mergekit_core import PluginHost
from mergekit_core.api import MergeConfig, make_setup, run_merge, score

TASKS = ["upright", "rotated", "mirrored", "inverted", "shifted", "noisy", "parity", "mod3"]


class Objective:
    """Mean accuracy over the 8 tasks of ``base + sum_t lambdas[t] * tau_t``; counts merges."""

    def __init__(self, pool: Path, host: PluginHost, work: Path) -> None:
        self.host = host
        self.spec = MergeConfig.from_dict({
            "sources": [str(pool / t) for t in TASKS], "base_model": str(pool / "base"),
            "method": "weighted_delta", "lambda_policy": "per_task", "output_dir": str(work / "art"),
        }).to_spec()
        self.setups = {split: make_setup(host, "digits", {"pool": str(pool)}, TASKS, split, None, work / "art")
                       for split in ("validation", "test")}
        self.merges = 0

    def accuracy(self, lambdas: list[float], split: str = "validation") -> float:
        values = {f"task.{t}": float(v) for t, v in enumerate(lambdas)}
        merged = run_merge(self.spec, self.host, in_memory=True, write_bundle=False, values=values).state_dict
        self.merges += 1
        setup = self.setups[split]
        return float(np.mean([score(setup, merged, t)[0][t.metric] for t in setup.tasks]))


def run_bayes(f, dims: int, budget: int, init: int, seed: int) -> list[tuple[list[float], float]]:
    from mk_bayes_sweep.search import BayesSearch
    from mk_bayes_sweep.space import parse_space
    from mk_bayes_sweep.strategy import BayesStrategy

    space = parse_space({"x": {"type": "float", "min": 0.0, "max": 1.0, "size": "tasks"}},
                        num_sources=dims, layers=lambda: [])
    search = BayesSearch(space, BayesStrategy().resolve_params({"budget": budget, "init_points": init}), seed)
    history = []
    while (point := search.ask()) is not None:
        y = f(point["x"])
        search.tell(point, y)
        history.append((point["x"], y))
    return history


def run_optuna(f, dims: int, budget: int, init: int, seed: int, kind: str) -> list[tuple[list[float], float]]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = (optuna.samplers.GPSampler(seed=seed, n_startup_trials=init) if kind == "gp"
               else optuna.samplers.TPESampler(seed=seed, n_startup_trials=init))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    history = []

    def objective(trial):
        x = [trial.suggest_float(f"x{i}", 0.0, 1.0) for i in range(dims)]
        y = f(x)
        history.append((x, y))
        return y

    study.optimize(objective, n_trials=budget)
    return history


SEARCHES = {"mk bayes": lambda f, d, b, i, s: run_bayes(f, d, b, i, s),
            "optuna GPSampler": lambda f, d, b, i, s: run_optuna(f, d, b, i, s, "gp"),
            "optuna TPESampler": lambda f, d, b, i, s: run_optuna(f, d, b, i, s, "tpe")}


PRIORS = {
    "none (maximum likelihood, scikit-optimize's fit)": None,
    "log l ~ N(sqrt(2) + log(d)/2, 3) (Hvarfner et al. 2024, BoTorch)": (2 ** 0.5 + np.log(8) / 2, 3 ** 0.5),
    "log l ~ N(0, 1) (the default)": (0.0, 1.0),
}


def compare_priors(f: Objective, args: argparse.Namespace) -> dict[str, Any]:
    """(b) for mk's search under each length-scale prior: what chose the default."""
    import mk_bayes_sweep.gp as gp

    default = gp.LENGTH_PRIOR
    out = {}
    try:
        for label, prior in PRIORS.items():
            gp.LENGTH_PRIOR = prior
            best = [max(y for _, y in run_bayes(f.accuracy, 8, args.budget_b, args.init_b, seed)) for seed in args.seeds]
            out[label] = best
            print(f"(b) mk bayes, length-scale prior {label}: validation {np.mean(best):.4f}", flush=True)
    finally:
        gp.LENGTH_PRIOR = default
    return out


def evaluations_to_reach(history: list[tuple[list[float], float]], target: float) -> int | None:
    for i, (_, y) in enumerate(history, 1):
        if y >= target:
            return i
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=Path, required=True, help="the digits pool (built when missing)")
    parser.add_argument("--out", type=Path, required=True, help="the results JSON")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget-a", type=int, default=25)
    parser.add_argument("--init-a", type=int, default=4)
    parser.add_argument("--budget-b", type=int, default=30)
    parser.add_argument("--init-b", type=int, default=8)
    parser.add_argument("--searches", nargs="+", default=list(SEARCHES), choices=list(SEARCHES))
    parser.add_argument("--priors", action="store_true", help="also run (b) for mk's search under each "
                        "length-scale prior of its GP")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not (args.pool / "pool.json").is_file():
        from mk_digits.build import BuildSettings, build_pool

        build_pool(args.pool, BuildSettings())
    host = PluginHost()
    with tempfile.TemporaryDirectory(prefix="mk-bayes-bench-") as work:
        return run(args, Objective(args.pool, host, Path(work)))


def run(args: argparse.Namespace, f: Objective) -> int:
    started = time.time()

    grid = [round(0.025 * i, 3) for i in range(41)]
    grid_acc = {lam: f.accuracy([lam] * 8) for lam in grid}
    best_lam = max(grid, key=lambda lam: grid_acc[lam])
    target = grid_acc[best_lam] - 0.005
    scalar_test = f.accuracy([best_lam] * 8, "test")
    print(f"grid: best lambda {best_lam}, validation {grid_acc[best_lam]:.4f}, test {scalar_test:.4f}", flush=True)
    results: dict[str, Any] = {
        "pool": json.loads((args.pool / "pool.json").read_text()).get("settings"),
        "objective": "mean accuracy over the 8 tasks, full validation split",
        "grid": {"lambdas": grid, "validation": [grid_acc[lam] for lam in grid], "best_lambda": best_lam,
                 "best_validation": grid_acc[best_lam], "test_at_best": scalar_test},
        "a": {"budget": args.budget_a, "init": args.init_a, "target": target, "runs": {}},
        "b": {"budget": args.budget_b, "init": args.init_b, "runs": {}},
        "seeds": args.seeds,
    }
    for name in args.searches:
        for seed in args.seeds:
            t0 = time.time()
            history = SEARCHES[name](lambda x: grid_acc.get(round(x[0], 12)) or f.accuracy([x[0]] * 8), 1,
                                     args.budget_a, args.init_a, seed)
            reached = evaluations_to_reach(history, target)
            results["a"]["runs"].setdefault(name, []).append({
                "seed": seed, "evaluations_to_target": reached, "best": max(y for _, y in history),
                "best_lambda": max(history, key=lambda h: h[1])[0][0], "wall_s": round(time.time() - t0, 1)})
            print(f"(a) {name} seed {seed}: {reached} evaluations to within 0.5 points", flush=True)
    for name in args.searches:
        for seed in args.seeds:
            t0 = time.time()
            history = SEARCHES[name](f.accuracy, 8, args.budget_b, args.init_b, seed)
            x, y = max(history, key=lambda h: h[1])
            test = f.accuracy(x, "test")
            results["b"]["runs"].setdefault(name, []).append({
                "seed": seed, "best_validation": y, "test_at_best": test, "lambdas": x,
                "curve": list(np.maximum.accumulate([h[1] for h in history])),
                "wall_s": round(time.time() - t0, 1)})
            print(f"(b) {name} seed {seed}: validation {y:.4f}, test {test:.4f}", flush=True)
    if args.priors:
        results["b_priors"] = compare_priors(f, args)
    results["merges"] = f.merges
    results["wall_s"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(summary(results))
    return 0


def summary(results: dict[str, Any]) -> str:
    """The two tables of the docs page, as markdown."""
    a, b = results["a"], results["b"]
    lines = [f"(a) evaluations to within 0.5 points of the grid's best ({results['grid']['best_validation']:.4f} "
             f"at lambda {results['grid']['best_lambda']}), budget {a['budget']}, {a['init']} initial points",
             "", "| search | " + " | ".join(f"seed {r['seed']}" for r in next(iter(a["runs"].values()))) + " |",
             "|---|" + "---|" * len(results["seeds"])]
    for name, runs in a["runs"].items():
        cells = [str(r["evaluations_to_target"]) if r["evaluations_to_target"] else f"> {a['budget']}" for r in runs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"(b) one lambda per task, budget {b['budget']} ({b['init']} initial points): best validation "
              "accuracy and its test accuracy (mean of the seeds, min-max)", "",
              "| search | validation | test | evaluations to beat the scalar lambda (per seed) |", "|---|---|---|---|",
              f"| best scalar lambda (41-point grid) | {results['grid']['best_validation']:.4f} | "
              f"{results['grid']['test_at_best']:.4f} | 41 |"]
    for name, runs in b["runs"].items():
        v = [r["best_validation"] for r in runs]
        t = [r["test_at_best"] for r in runs]
        beat = [next((i for i, y in enumerate(r["curve"], 1) if y > results["grid"]["best_validation"]), None)
                for r in runs]
        lines.append(f"| {name} | {np.mean(v):.4f} ({min(v):.4f}-{max(v):.4f}) | "
                     f"{np.mean(t):.4f} ({min(t):.4f}-{max(t):.4f}) | "
                     + ", ".join(str(n) if n else f"> {b['budget']}" for n in beat) + " |")
    if results.get("b_priors"):
        lines += ["", "(b) mk's search under each length-scale prior: best validation accuracy (mean, per seed)", "",
                  "| prior | validation | per seed |", "|---|---|---|"]
        for label, best in results["b_priors"].items():
            lines.append(f"| {label} | {np.mean(best):.4f} | " + ", ".join(f"{v:.4f}" for v in best) + " |")
    return "\n".join(lines)


def show(path: Path) -> None:
    """Print the tables of a results file written earlier (``--show RESULTS_JSON``)."""
    print(summary(json.loads(path.read_text())))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--show"]:
        show(Path(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
