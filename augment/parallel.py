"""Independent units (trainings, generation shards) on spawned worker processes, one torch thread each, results
in submission order.

One thread everywhere, here or in a worker of any runner: float reductions split over threads sum in another
order, and a sample or a training can come out one rounding step apart with another thread count (seen with AVX2
kernels: one generated pixel in 2,000 differed between a 1-thread and a 2-thread process). Results that must not
depend on where a unit ran run under `one_thread()`.
"""

from __future__ import annotations

import contextlib
import os
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
    """`workers` as configured: 0 = one per CPU this job may use, its fair share beside the other augment jobs
    running now (augment/cpus.py)."""
    from augment.cpus import fair_share

    return workers or fair_share()


def spawn_pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()) -> "Batch":
    """A batch of units on this process's pool of `workers` spawned processes (`spawn`: no fork of a process
    holding torch threads), whose workers run torch on one thread. Each worker runs `initializer(*initargs)` once
    per batch, before its first unit of it (send the shared data there, not with every unit).

    The processes outlive the batch: a run's stages (selection, generation, filtering, choice, evaluation) share
    them instead of each starting its own (measured: starting two workers and closing them costs 4.5 s on 2
    cores, and a run started five). They stop when a pool of another size is asked for, when a batch ends with
    an error or an interrupt, and when this process exits."""
    return Batch(_executor(workers), initializer, initargs)


BATCH_PREFIX = "augment-batch-"  # a batch's shared data in the temporary folder (augment/tempfiles.py)
_POOL: dict = {}  # the process's one pool: {"workers": n, "executor": ProcessPoolExecutor}
# A forked child (a task runner's process) starts its own pool: the parent's executor has no threads there.
os.register_at_fork(after_in_child=_POOL.clear)


def _executor(workers: int):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if _POOL and (_POOL["workers"] != workers or getattr(_POOL["executor"], "_broken", False)):
        close_pool()
    if not _POOL:
        _POOL.update(workers=workers, executor=ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_start,
            initargs=(os.getpid(),)))
    return _POOL["executor"]


def close_pool(kill: bool = False) -> None:
    """Stop the worker processes (queued units are dropped; running ones finish, or with `kill` are cut short:
    an interrupted run stops in seconds, and its units are recomputed on resume). The next batch starts new
    ones."""
    if not _POOL:
        return
    executor = _POOL.pop("executor")
    _POOL.clear()
    if not kill:
        executor.shutdown(wait=True, cancel_futures=True)
        return
    processes = list((getattr(executor, "_processes", None) or {}).values())
    for p in processes:
        with contextlib.suppress(Exception):
            p.terminate()
    executor.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        with contextlib.suppress(Exception):
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(1)


class Batch:
    """Units submitted together with the data they share: `submit` as on an executor, then `shutdown` (what the
    `spawn_pool` callers already do with a pool of their own). The shared data travels once, in a temporary file
    that each worker reads before its first unit of the batch."""

    def __init__(self, executor, initializer: Callable | None, initargs: tuple):
        import pickle
        import uuid

        from augment import tempfiles

        self.executor, self.initializer, self.futures = executor, initializer, []
        self.key, self.path = uuid.uuid4().hex, None
        if initializer is not None:
            fd, self.path = tempfiles.create(BATCH_PREFIX, ".pkl")
            with open(fd, "wb") as f:
                pickle.dump(initargs, f, protocol=pickle.HIGHEST_PROTOCOL)

    def submit(self, fn: Callable, *args):
        future = self.executor.submit(_in_batch, self.key, self.path, self.initializer, fn, args)
        self.futures.append(future)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """End the batch: with `cancel_futures` its queued units are dropped; `wait` for the running ones. A batch
        that did not finish every unit cleanly (an error, an interrupt) stops the processes, so that a later
        batch never meets a worker in an unknown state."""
        from concurrent.futures import wait as wait_for

        clean = all(f.done() and not f.cancelled() and f.exception() is None for f in self.futures)
        if cancel_futures:
            for f in self.futures:
                f.cancel()
        ours = _POOL.get("executor") is self.executor
        if not clean and ours:  # an error or an interrupt: units in flight are cut, not waited for (minutes)
            close_pool(kill=True)
        elif wait:
            wait_for(self.futures)
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.remove(self.path)


_BATCH: dict = {}  # in a worker: the key of the batch whose shared data its initializer last received
_CACHES: list[dict] = []


def worker_state() -> dict:
    """The one kind of per-process state: a dict for what a process keeps between the units of one batch (the
    shared data its batch's initializer handed it, a model it loaded, the training sets it read); in a pool worker
    it is emptied when the worker starts a unit of another batch, so that nothing large stays in an idle worker's
    memory past its batch. Every module-level cache of a unit function is one of these."""
    cache: dict = {}
    _CACHES.append(cache)
    return cache


def _in_batch(key: str, path: str | None, initializer: Callable | None, fn: Callable, args: tuple):
    if _BATCH.get("key") != key:
        import pickle

        for cache in _CACHES:
            cache.clear()
        if initializer is not None:
            with open(path, "rb") as f:
                initializer(*pickle.load(f))
        _BATCH["key"] = key
    return fn(*args)


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
    processes (the process's pool, `spawn_pool`; 0 = one per core), or here when that is 1. One thread
    everywhere, so the results are the same for any number of workers. `initializer(*initargs)` first sets up what
    fn shares; `tick()` as each call finishes."""
    tick = tick or (lambda: None)
    workers = worker_count(workers)
    if workers <= 1 or len(calls) <= 1:
        if initializer is not None:
            initializer(*initargs)
        return here(fn, calls, tick)
    pool = spawn_pool(workers, initializer, initargs)
    try:
        return ordered_map(pool, fn, calls, tick)
    finally:
        pool.shutdown(cancel_futures=True)


def _worker_start(parent: int) -> None:
    """A worker: one torch thread; Ctrl-C is the parent's to handle (it stops the workers); and it exits when the
    parent is gone, even killed by SIGKILL, instead of waiting on its pipe forever (~400 MB each)."""
    import signal
    import threading

    import torch

    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="augment-parent-watch").start()


def _exit_with_parent(parent: int, every: float = 1.0) -> None:  # pragma: no cover (runs in a worker)
    import time

    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


def here(fn: Callable, calls: list[tuple], tick: Callable[[], None]) -> list:
    """fn(*args) for every args tuple in this process, on one torch thread as a pool worker would be; `tick()`
    after each."""
    out = []
    with one_thread():
        for args in calls:
            out.append(fn(*args))
            tick()
    return out
