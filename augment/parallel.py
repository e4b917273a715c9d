"""Independent trainings on spawned worker processes (one torch thread each), results in submission order."""

from __future__ import annotations

from collections.abc import Callable


def spawn_pool(workers: int, initializer: Callable, initargs: tuple):
    """A process pool started with `spawn` (no fork of a process holding torch threads); each worker runs
    `initializer(*initargs)` once (send the shared data there, not with every unit)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=initializer,
                               initargs=initargs)


def ordered_map(pool, fn: Callable, calls: list[tuple], tick: Callable[[], None]) -> list:
    """fn(*args) for every args tuple on the pool; `tick()` as each finishes; results in the order of `calls`."""
    from concurrent.futures import as_completed

    futures = {pool.submit(fn, *args): i for i, args in enumerate(calls)}
    out = [None] * len(calls)
    for fut in as_completed(futures):
        out[futures[fut]] = fut.result()
        tick()
    return out
