"""`mk merge --method svd_hybrid`: wall time and peak RSS of this tree against an earlier one.

    git archive HEAD plugins/mk-svd-hybrid | tar -x -C /tmp/svdh/before
    python plugins/mk-svd-hybrid/benchmarks/one_pass_speed.py --before /tmp/svdh/before/plugins/mk-svd-hybrid \
        --pool demo-output/digits-pool --work /tmp/svdh --out plugins/mk-svd-hybrid/benchmarks/results/one_pass.json

Two workloads: (a) the digits pool (8 fine-tunes; built with mk-digits when missing) and (b) 8
synthetic fine-tunes of one 4096 x 4096 bf16 tensor (a rank-64 change, half of it shared, plus
10% dense noise), generated under ``--work``. Contenders: ``before`` (the same merge with
``--before`` first on PYTHONPATH, so that its ``mk_svd_hybrid`` is the one imported), ``after``
(this tree, default ``block_mb``) and ``after-one-block`` (this tree, ``block_mb`` large enough
for one block per tensor: the same values as ``before``, bit for bit). Each run is a fresh
process with one torch thread; the contenders alternate within each of ``--repeats`` repetitions
and medians are reported, with the sha256 of every merged model's tensors and, for the merges
that differ from ``before``, ||after - before|| / ||before - base|| over all tensors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZE = 4096
TASKS = 8
TENSOR = "model.layers.0.mlp.up_proj.weight"


def synthetic_models(root: Path) -> Path:
    """base + 8 fine-tunes of one [4096, 4096] bf16 tensor, written once."""
    import torch
    from safetensors.torch import save_file

    if (root / "done").is_file():
        return root
    g = torch.Generator().manual_seed(0)
    base = 0.02 * torch.randn(SIZE, SIZE, generator=g)
    shared = torch.randn(SIZE, 32, generator=g)
    models = {"base": base}
    for t in range(TASKS):
        left = torch.cat([shared, torch.randn(SIZE, 32, generator=g)], 1)
        low = left @ torch.randn(64, SIZE, generator=g)
        low *= 2e-3 / float(low.std())
        noise = torch.randn(SIZE, SIZE, generator=g)
        models[f"ft{t}"] = base + low + noise * (0.1 * float(low.norm()) / float(noise.norm()))
    for name, x in models.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        save_file({TENSOR: x.to(torch.bfloat16).contiguous()}, str(root / name / "model.safetensors"))
        (root / name / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "done").write_text("")
    return root


def digits_pool(pool: Path) -> Path:
    if not (pool / "pool.json").is_file():
        from mk_digits.build import BuildSettings, build_pool

        build_pool(pool, BuildSettings())
    return pool


def sources(workload: str, path: Path) -> tuple[Path, list[Path]]:
    if workload == "digits":
        tasks = json.loads((path / "pool.json").read_text())["tasks"]
        return path / "base", [path / t for t in tasks]
    return path / "base", [path / f"ft{t}" for t in range(TASKS)]


ONE_BLOCK_MB = 1 << 20
"""block_mb of the ``after-one-block`` contender: every tensor in one block."""


def child(kind: str, workload: str, path: Path, out: Path, keep: Path | None) -> None:
    """One merge in this process; prints wall time, peak RSS and the output's sha256 as JSON;
    ``keep``: move the merged model there."""
    import resource

    import torch

    torch.set_num_threads(1)
    import mk_svd_hybrid

    from mergekit_core import PluginHost
    from mergekit_core.api import MergeConfig, run_merge

    base, models = sources(workload, path)
    shutil.rmtree(out, ignore_errors=True)
    spec = MergeConfig.from_dict({"base_model": str(base), "sources": [str(m) for m in models],
                                  "method": "svd_hybrid", "output": {"path": str(out)},
                                  "method_params": {"block_mb": ONE_BLOCK_MB} if kind == "after-one-block" else {},
                                  "output_dir": str(out.parent / "runs")}).to_spec()
    host = PluginHost()
    start = time.perf_counter()
    run_merge(spec, host, write_bundle=False)
    wall = time.perf_counter() - start
    from safetensors.torch import load_file

    merged = load_file(str(out / "model.safetensors"))
    digest = hashlib.sha256()  # of the tensors (the file's header names the output path)
    for name in sorted(merged):
        digest.update(name.encode() + merged[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest = digest.hexdigest()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall_s": wall, "peak_rss_mb": rss, "sha256": digest,
                      "plugin": str(Path(mk_svd_hybrid.__file__).parent)}))
    if keep is not None:
        shutil.rmtree(keep, ignore_errors=True)
        shutil.move(out, keep)
    shutil.rmtree(out, ignore_errors=True)


def relative_difference(a: Path, b: Path, base: Path) -> float:
    """||a - b|| / ||b - base|| over every tensor of two merged models."""
    from safetensors.torch import load_file

    x, y, z = (load_file(str(p / "model.safetensors")) for p in (a, b, base))
    num = sum(float(((x[n].float() - y[n].float()) ** 2).sum()) for n in y)
    den = sum(float(((y[n].float() - z[n].float()) ** 2).sum()) for n in y)
    return (num / den) ** 0.5 if den else 0.0


def measure(kind: str, workload: str, path: Path, work: Path, before: Path, keep: Path | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if kind == "before":
        env["PYTHONPATH"] = str(before) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--child-workload", workload,
                           "--child-path", str(path), "--work", str(work)]
                          + (["--child-keep", str(keep)] if keep else []), env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{kind} on {workload} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = str(before) if kind == "before" else str(Path(__file__).resolve().parents[1])
    if not result["plugin"].startswith(expected):
        raise SystemExit(f"{kind} imported mk_svd_hybrid from {result['plugin']}, not {expected}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, help="an earlier tree's plugins/mk-svd-hybrid (git archive)")
    ap.add_argument("--pool", type=Path, default=Path("demo-output/digits-pool"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/svdh"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workloads", nargs="*", default=["digits", "synthetic"])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-workload", help=argparse.SUPPRESS)
    ap.add_argument("--child-path", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-keep", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.child_workload, args.child_path, args.work / f"out-{os.getpid()}", args.child_keep)
        return
    if args.before is None or not (args.before / "mk_svd_hybrid").is_dir():
        raise SystemExit("--before: give the plugin folder of an earlier tree (see this script's docstring)")
    paths = {"digits": digits_pool(args.pool), "synthetic": synthetic_models(args.work / "synthetic")}
    results: dict = {"repeats": args.repeats, "threads": 1, "machine": platform.processor() or platform.machine(),
                     "cpus": os.cpu_count(), "workloads": {}}
    for workload in args.workloads:
        runs: dict[str, list[dict]] = {"before": [], "after": [], "after-one-block": []}
        kept = {kind: args.work / f"kept-{workload}-{kind}" for kind in runs}
        for i in range(args.repeats):
            for kind in runs:  # alternating
                runs[kind].append(measure(kind, workload, paths[workload], args.work, args.before,
                                          kept[kind] if i == 0 else None))
                print(f"{workload:10s} {kind:7s} {runs[kind][-1]['wall_s']:7.2f} s "
                      f"{runs[kind][-1]['peak_rss_mb']:8.1f} MiB", file=sys.stderr, flush=True)
        row = {kind: {"wall_s": round(statistics.median(r["wall_s"] for r in rs), 2),
                      "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in rs), 1),
                      "sha256": sorted({r["sha256"] for r in rs})} for kind, rs in runs.items()}
        for kind in ("after", "after-one-block"):
            same = row[kind]["sha256"] == row["before"]["sha256"] and len(row[kind]["sha256"]) == 1
            row[kind]["same_output_as_before"] = same
            if not same:
                row[kind]["relative_difference_to_before"] = relative_difference(
                    kept[kind], kept["before"], sources(workload, paths[workload])[0])
            row[kind]["over_before"] = {k: round(row[kind][k] / row["before"][k], 3)
                                        for k in ("wall_s", "peak_rss_mb")}
        results["workloads"][workload] = row
        print(json.dumps({workload: row}, indent=2), file=sys.stderr)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
