"""Independent units (trainings, generation shards) on spawned worker processes, one torch thread each, results
in submission order.

One thread everywhere, here or in a worker of any runner: float reductions split over threads sum in another
order, and a sample or a training can come out one rounding step apart with another thread count (seen with AVX2
kernels: one generated pixel in 2,000 differed between a 1-thread and a 2-thread process). Results that must not
depend on where a unit ran run under `one_thread()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one intra-op thread inside the block; the process's own count after it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def worker_count(workers: int) -> int:
    """`workers` as configured: 0 = one per CPU core."""
    import os

    return workers or (os.cpu_count() or 1)


def spawn_pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()):
    """A process pool started with `spawn` (no fork of a process holding torch threads) whose workers run torch on
    one thread; each worker runs `initializer(*initargs)` once (send the shared data there, not with every
    unit)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread_then,
                               initargs=(initializer, initargs))


def ordered_map(pool, fn: Callable, calls: list[tuple], tick: Callable[[], None]) -> list:
    """fn(*args) for every args tuple on the pool; `tick()` as each finishes; results in the order of `calls`."""
    from concurrent.futures import as_completed

    futures = {pool.submit(fn, *args): i for i, args in enumerate(calls)}
    out = [None] * len(calls)
    for fut in as_completed(futures):
        out[futures[fut]] = fut.result()
        tick()
    return out


def run_each(fn: Callable, calls: list[tuple], workers: int, initializer: Callable | None = None,
             initargs: tuple = (), tick: Callable[[], None] | None = None) -> list:
    """fn(*args) for every args tuple, each on one torch thread, results in order: on a pool of `workers` spawned
    processes (started for these calls and closed after; 0 = one per core), or here when that is 1. One thread
    everywhere, so the results are the same for any number of workers. `initializer(*initargs)` first sets up what
    fn shares; `tick()` as each call finishes."""
    tick = tick or (lambda: None)
    workers = worker_count(workers)
    if workers <= 1 or len(calls) <= 1:
        if initializer is not None:
            initializer(*initargs)
        return here(fn, calls, tick)
    pool = spawn_pool(min(workers, len(calls)), initializer, initargs)
    try:
        return ordered_map(pool, fn, calls, tick)
    finally:
        pool.shutdown(cancel_futures=True)


def _one_thread_then(initializer: Callable | None, initargs: tuple) -> None:
    import torch

    torch.set_num_threads(1)
    if initializer is not None:
        initializer(*initargs)


def here(fn: Callable, calls: list[tuple], tick: Callable[[], None]) -> list:
    """fn(*args) for every args tuple in this process, on one torch thread as a pool worker would be; `tick()`
    after each."""
    out = []
    with one_thread():
        for args in calls:
            out.append(fn(*args))
            tick()
    return out
