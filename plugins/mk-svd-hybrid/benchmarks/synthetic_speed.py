"""Compress and reconstruct time of SVD-Hybrid on synthetic large tensors.

    python plugins/mk-svd-hybrid/benchmarks/synthetic_speed.py --size 4096 --tasks 8 \
        --out plugins/mk-svd-hybrid/benchmarks/results/synthetic.json

One tensor per task, each a low-rank signal (rank ``--signal-rank``) plus dense noise at 10% of its
norm, like a fine-tuning delta. Times the codec itself (the part `mk svd-hybrid compress` adds to
reading the checkpoints): encode (masks, shared basis, projection, quantization, bit packing) and
decode (every task's tensor, then the weighted merge), for the exact and the randomized SVD.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from mk_svd_hybrid.codec import CodecSettings, Decoder, encode


def synthetic(size: int, tasks: int, signal_rank: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(size, signal_rank, generator=g) / signal_rank**0.5
    out = []
    for _ in range(tasks):
        own = torch.randn(size, signal_rank, generator=g) / signal_rank**0.5
        low = torch.cat([shared, own], 1) @ torch.randn(2 * signal_rank, size, generator=g) * 1e-3 / size**0.5
        noise = torch.randn(size, size, generator=g)
        out.append(low + noise * (0.1 * float(low.norm()) / float(noise.norm())))
    return out


def run(deltas: list[torch.Tensor], settings: CodecSettings) -> dict[str, float]:
    started = time.perf_counter()
    record = encode(deltas, settings)
    encoded = time.perf_counter()
    decoder = Decoder(record)
    errors = []
    for t, d in enumerate(deltas):
        errors.append(float(torch.linalg.norm(decoder.task(t) - d) / torch.linalg.norm(d)))
    tasks_done = time.perf_counter()
    decoder.combine([1.0 / len(deltas)] * len(deltas))
    merged = time.perf_counter()
    fp32 = sum(d.numel() * 4 for d in deltas)
    return {"compress_s": round(encoded - started, 2), "reconstruct_all_tasks_s": round(tasks_done - encoded, 2),
            "reconstruct_merged_s": round(merged - tasks_done, 2), "rank": record.meta["clusters"][0]["rank"],
            "fp16_rank": record.meta["clusters"][0]["fp16_rank"], "compression_ratio_vs_fp32": fp32 / record.nbytes,
            "mean_relative_error": sum(errors) / len(errors)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--signal-rank", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    deltas = synthetic(args.size, args.tasks, args.signal_rank)
    results = {"size": args.size, "tasks": args.tasks, "signal_rank": args.signal_rank,
               "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
               "torch": torch.__version__, "runs": {}}
    for name, settings in {
        "exact": CodecSettings(),
        "randomized (q=256)": CodecSettings(svd="randomized", oversample_rank=256),
    }.items():
        r = run(deltas, settings)
        results["runs"][name] = r
        print(f"{name:20s} " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in r.items()), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
