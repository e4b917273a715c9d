"""Progress in the terminal: one bar per long stage, with its rate and time left.

`augment run` turns the bars on (`AUGMENT_PROGRESS=1`) when its standard error is a terminal and `--quiet` is not
given; the Prefect flow then shows each stage's progress both as a bar and as a Prefect progress artifact.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

ENV = "AUGMENT_PROGRESS"


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


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


def stage_bar(description: str, unit: str = "step") -> Callable[[int, int], None] | None:
    """A `terminal_bar` when `augment run` asked for bars, else None (no bar)."""
    return terminal_bar(description, unit) if enabled() else None


def both(*callbacks: Callable[[int, int], None] | None) -> Callable[[int, int], None]:
    """One progress callback that forwards to several."""
    live = [c for c in callbacks if c is not None]

    def update(done: int, total: int) -> None:
        for c in live:
            c(done, total)

    return update
