"""Run independent slices of a tensor computation on worker threads.

Each worker runs its torch operations single-threaded: a slice's small operations then never
wait for a whole team of intra-op threads (on two cores shared with other processes that wait
was most of the time). Results come back in input order, so what a caller combines from them
does not depend on the thread count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # pragma: no cover
    import torch

T = TypeVar("T")
R = TypeVar("R")


def map_slices(fn: Callable[[T], R], items: Sequence[T], device: torch.device | None = None, *,
               pool: ThreadPoolExecutor | None = None, name: str = "mk-work") -> list[R]:
    """``[fn(i) for i in items]``, on ``torch.get_num_threads()`` worker threads (in order).

    One thread, here, for a single item, one torch thread, or a ``device`` other than the CPU.
    ``pool``: an executor to run on (one that lives across calls keeps its threads' thread-local
    buffers); else one is made for this call.
    """
    import torch

    threads = torch.get_num_threads()
    if threads < 2 or len(items) < 2 or (device is not None and device.type != "cpu"):
        return [fn(i) for i in items]

    def single(item: T) -> R:
        torch.set_num_threads(1)
        return fn(item)

    try:
        if pool is not None:
            return list(pool.map(single, items))
        with ThreadPoolExecutor(max_workers=min(len(items), threads), thread_name_prefix=name) as own:
            return list(own.map(single, items))
    finally:
        torch.set_num_threads(threads)
