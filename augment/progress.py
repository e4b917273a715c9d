"""Progress of the long stages: a bar in a terminal, log lines everywhere else.

`augment run` chooses with `AUGMENT_PROGRESS`: `1` draws one tqdm bar per stage (standard error is a terminal),
`0` shows nothing (`--quiet`), anything else (and a library call, a served deployment, a scheduler's worker) logs
lines through the stage's `log`: when another tenth is done (at most one line per 10 s), and every 25 s while the
stage runs even when nothing finishes in between (so a log never goes quiet for 30 s), and at the end.
"""

from __future__ import annotations

import contextvars
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

ENV = "AUGMENT_PROGRESS"


def mode() -> str:
    """"bar", "off" or "log" (the default)."""
    return {"1": "bar", "0": "off"}.get(os.environ.get(ENV, ""), "log")


def terminal_bar(description: str, unit: str = "step", file=None) -> Callable[[int, int], None]:
    """A callback(done, total) drawing one tqdm bar (created on the first call, so a reused stage draws none;
    closed when done reaches total). Rate and ETA are tqdm's, measured from the first update."""
    from tqdm.auto import tqdm

    state: dict = {}

    def update(done: int, total: int) -> None:
        bar = state.get("bar")
        if bar is None:
            # the first update may come after earlier work (a resumed stage): count from there
            bar = state["bar"] = tqdm(total=total, initial=done, desc=description, unit=unit, dynamic_ncols=True,
                                      file=file or sys.stderr, leave=True, disable=None if file is None else False)
        else:
            bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    return f"{s // 60} min {s % 60:02d} s" if s < 3600 else f"{s // 3600} h {s // 60 % 60:02d} min"


class LogLines:
    """A callback(done, total) that reports a stage's progress as log lines, with its rate and time left.

    A line when another `tenth` of the work is done and `gap` seconds have passed since the last line; a line
    every `every` seconds in any case while the stage runs (`start()` .. `stop()`: a daemon thread, so a stage
    whose units each take minutes still shows it is alive); one line when the work is done. The rate counts from
    the first update, as the bars do (a resumed stage's earlier work is not in it); until a second update, from the
    start."""

    def __init__(self, what: str, unit: str, log: Callable[[str], None], every: float = 25.0, gap: float = 10.0,
                 tenth: float = 0.1):
        self.what, self.unit, self.log, self.every, self.gap, self.tenth = what, unit, log, every, gap, tenth
        self.t0 = self.last = time.monotonic()
        self.first: tuple[float, int] | None = None
        self.done, self.total, self.step, self.ended = 0, 0, 0, False
        self.lock, self.quit = threading.Lock(), threading.Event()
        self.thread: threading.Thread | None = None

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        with self.lock:
            if self.first is None:
                self.first = (now, done)
            self.done, self.total = done, total
            if done >= total:
                if not self.ended:
                    self.ended = True
                    self._say(now, final=True)
                return
            step = int(done / max(total, 1) / self.tenth)
            if (step > self.step and now - self.last >= self.gap) or now - self.last >= self.every:
                self.step = step
                self._say(now)

    def _say(self, now: float, final: bool = False) -> None:
        self.last = now
        units = f"{self.unit}s"
        if final:
            self.log(f"{self.what}: {self.done}/{self.total} {units} in {duration(now - self.t0)} "
                     f"({_per_time(self._rate(now), units)})")
            return
        if self.first is None:
            self.log(f"{self.what}: running for {duration(now - self.t0)}" +
                     (f", no {self.unit} finished yet" if self.unit else ""))
            return
        pct = 100.0 * self.done / max(self.total, 1)
        line = f"{self.what}: {self.done}/{self.total} {units} ({pct:.0f}%)"
        rate = self._rate(now)
        if rate > 0:
            line += f", {_per_time(rate, units)}, about {duration((self.total - self.done) / rate)} left"
        self.log(f"{line} ({duration(now - self.t0)} so far)")

    def _rate(self, now: float) -> float:
        """Units per second since the first update (as the bars count); until a second one, since the start."""
        t, d = self.first
        if self.done > d and now > t:
            return (self.done - d) / (now - t)
        return self.done / (now - self.t0) if now > self.t0 else 0.0

    def _beat(self) -> None:
        while not self.quit.wait(min(1.0, self.every / 4)):
            now = time.monotonic()
            with self.lock:
                if not self.ended and now - self.last >= self.every:
                    self._say(now)

    def start(self) -> "LogLines":
        self.t0 = self.last = time.monotonic()
        # in a copy of this thread's context: a logger such as Prefect's finds its settings (the API URL) and its
        # run there; without them it started a temporary server of its own for the first heartbeat line
        self.thread = threading.Thread(target=contextvars.copy_context().run, args=(self._beat,),
                                       name=f"progress:{self.what}", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.quit.set()
        if self.thread is not None:
            self.thread.join()


def _per_time(rate: float, units: str) -> str:
    return f"{rate:.1f} {units}/s" if rate >= 1 else f"{60 * rate:.1f} {units}/min"


@contextmanager
def stage(what: str, unit: str, log: Callable[[str], None] = print,
          every: float = 25.0) -> Iterator[Callable[[int, int], None] | None]:
    """The progress callback for one stage, as `mode()` says: a terminal bar, log lines (with their heartbeat
    for as long as the block runs), or None. A stage without a count (`unit` "") gets the heartbeat only."""
    m = mode()
    if m == "bar":
        yield terminal_bar(what, unit) if unit else None
    elif m == "off":
        yield None
    else:
        lines = LogLines(what, unit, log, every=every).start()
        try:
            yield lines
        finally:
            lines.stop()


def both(*callbacks: Callable[[int, int], None] | None) -> Callable[[int, int], None]:
    """One progress callback that forwards to several."""
    live = [c for c in callbacks if c is not None]

    def update(done: int, total: int) -> None:
        for c in live:
            c(done, total)

    return update
