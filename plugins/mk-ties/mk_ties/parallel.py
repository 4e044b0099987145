"""Run independent slices of a tensor computation on worker threads.

Each worker runs its torch operations single-threaded: a slice's small operations then never
wait for a whole team of intra-op threads (on two cores shared with other processes that wait
was most of the time). Results come back in input order, so what a caller combines from them
does not depend on the thread count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def map_slices(fn: Callable[[T], R], items: Sequence[T], device: torch.device, name: str = "mk-ties") -> list[R]:
    """``[fn(i) for i in items]``, on ``torch.get_num_threads()`` worker threads on the CPU
    (in order; one thread, here, elsewhere or for a single item)."""
    workers = min(len(items), torch.get_num_threads()) if device.type == "cpu" else 1
    if workers < 2:
        return [fn(i) for i in items]
    threads = torch.get_num_threads()

    def single(item: T) -> R:
        torch.set_num_threads(1)
        return fn(item)

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as pool:
            return list(pool.map(single, items))
    finally:
        torch.set_num_threads(threads)
