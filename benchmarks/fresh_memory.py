"""How fast a process gets memory it has not touched yet, on this machine: writing a file into the
page cache, and filling a new buffer, each the first time and again at once on the pages just
freed.

On a virtual machine whose host takes back the guest's free memory, the first touch of a page
faults into the host and is many times slower than a page the guest used a moment ago; merges
and the I/O floor both write their output into such pages, so their times swing with what ran
before them. This script shows the size of that effect, nothing of mk's.

    python benchmarks/fresh_memory.py [--gb 1.32] [--dir /tmp] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def write_file(path: Path, data: memoryview, step: int = 64 << 20) -> float:
    """Seconds to write ``data`` into a new file (page cache only, no fsync)."""
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for pos in range(0, len(data), step):
            os.write(fd, data[pos:pos + step])
    finally:
        os.close(fd)
    return time.perf_counter() - start


def fill_new_buffer(nbytes: int) -> float:
    """Seconds to allocate and fill a new buffer of ``nbytes``."""
    start = time.perf_counter()
    buf = bytearray(nbytes)  # calloc: fresh zero pages, touched by the fill below
    buf[::4096] = b"\x01" * len(range(0, nbytes, 4096))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.32, help="bytes per write or buffer, in GB")
    parser.add_argument("--dir", default="/tmp", help="where the test file is written (deleted after)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    nbytes = int(args.gb * 1e9)
    data = memoryview(bytearray(os.urandom(1 << 20)) * (nbytes >> 20))
    path = Path(args.dir) / f"fresh_memory_{os.getpid()}.bin"
    rows = []
    try:
        for _ in range(args.rounds):
            first = write_file(path, data)
            path.unlink()  # its pages go back to the free lists, still backed by the host
            again = write_file(path, data)
            path.unlink()
            time.sleep(5)  # long enough for a host to take freed pages back
            rows.append({"file_first_GBps": round(len(data) / first / 1e9, 2),
                         "file_again_GBps": round(len(data) / again / 1e9, 2),
                         "buffer_first_GBps": round(nbytes / fill_new_buffer(nbytes) / 1e9, 2),
                         "buffer_again_GBps": round(nbytes / fill_new_buffer(nbytes) / 1e9, 2)})
            time.sleep(5)
    finally:
        path.unlink(missing_ok=True)
    print(json.dumps({"bytes": len(data), "rounds": rows}, indent=1))


if __name__ == "__main__":
    main()
