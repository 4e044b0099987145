"""Reading cached safetensors files into float32: ``pread`` into fresh memory against a private
memory map (what ``SafetensorsReader.get`` does since 2026-11-30), alternating, medians.

Each tensor-sized piece (256 MiB) is read, then converted from bfloat16 into a reused float32
buffer, as the merge's first step does. Reports wall, user and system seconds per pass.

    python benchmarks/read_paths.py --pool DIR [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

PIECE = 256 << 20


def files_of(pool: Path) -> list[Path]:
    return sorted(pool.glob("*/*.safetensors"))


def pieces(path: Path):
    size = path.stat().st_size
    for pos in range(0, size, PIECE):
        yield pos, min(PIECE, size - pos) // 2 * 2


def read_pread(files: list[Path], out) -> None:
    import torch

    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            for pos, n in pieces(path):
                buf = torch.empty(n, dtype=torch.uint8)
                os.preadv(fd, [buf.numpy()], pos)
                out[: n // 2].copy_(buf.view(torch.bfloat16))
        finally:
            os.close(fd)


def read_mapped(files: list[Path], out) -> None:
    import torch

    from mergekit_core.io.readers import _mapped

    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            for pos, n in pieces(path):
                buf = _mapped(fd, pos, n)
                out[: n // 2].copy_(buf.view(torch.bfloat16))
                del buf
        finally:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", required=True, help="folders of safetensors files (make_models.py's pool)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    files = files_of(Path(args.pool))
    out = torch.zeros(PIECE // 2)
    runs: dict[str, list[tuple[float, float, float]]] = {"pread": [], "mapped": []}
    for _ in range(args.repeats):
        for label, fn in (("pread", read_pread), ("mapped", read_mapped)):
            t0, c0 = time.perf_counter(), os.times()
            fn(files, out)
            c1 = os.times()
            runs[label].append((time.perf_counter() - t0, c1.user - c0.user, c1.system - c0.system))
    result = {"bytes": sum(f.stat().st_size for f in files), "repeats": args.repeats,
              "median_s": {k: {"wall": round(statistics.median(r[0] for r in v), 2),
                               "user": round(statistics.median(r[1] for r in v), 2),
                               "system": round(statistics.median(r[2] for r in v), 2)} for k, v in runs.items()}}
    result["pread_over_mapped"] = round(result["median_s"]["pread"]["wall"] / result["median_s"]["mapped"]["wall"], 2)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
