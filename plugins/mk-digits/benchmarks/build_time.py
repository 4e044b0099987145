"""Wall time of `mk digits build` with one torch thread against torch's default thread count.

    python plugins/mk-digits/benchmarks/build_time.py --work /tmp/me/build-time [--repeats 2] [--quick]

Builds the pool into fresh folders, alternating the two settings, and prints the median of each
and their ratio (the machine's other load counts in both; the script reports the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
from mk_digits.build import BuildSettings, build_pool


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="a scratch folder (emptied)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the quick pool settings")
    parser.add_argument("--out", type=Path, help="write the timings here as JSON")
    args = parser.parse_args(argv)
    default = torch.get_num_threads()
    settings = BuildSettings.quick() if args.quick else BuildSettings()
    times: dict[str, list[float]] = {"1 thread": [], f"torch default ({default} threads)": []}
    loads = []
    for i in range(args.repeats):
        for label, threads in zip(times, (1, None)):
            folder = args.work / f"pool-{i}-{threads}"
            shutil.rmtree(folder, ignore_errors=True)
            started = time.perf_counter()
            build_pool(folder, settings, threads=threads)
            times[label].append(time.perf_counter() - started)
            loads.append(os.getloadavg()[0])
            shutil.rmtree(folder)
            print(f"{label}: {times[label][-1]:.1f} s (load average {loads[-1]:.1f})", flush=True)
            if args.out:  # after every build: a long run stopped early keeps what it measured
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"quick": args.quick, "seconds": times, "cores": os.cpu_count(),
                                                "load_average": loads}, indent=2))
    medians = {k: statistics.median(v) for k, v in times.items()}
    one, many = medians.values()
    print(f"median: 1 thread {one:.1f} s, default {many:.1f} s, default / 1 thread = {many / one:.2f}; "
          f"{os.cpu_count()} cores, load average {min(loads):.1f}-{max(loads):.1f}")
    if args.out:
        args.out.write_text(json.dumps({"quick": args.quick, "seconds": times, "median": medians,
                                        "cores": os.cpu_count(), "load_average": loads}, indent=2))


if __name__ == "__main__":
    main()
