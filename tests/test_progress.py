"""Progress in logs: a stage run under a scheduler or into a file says how far it is, at a steady cadence."""

import re
import threading
import time

from augment import progress
from augment.progress import LogLines


def test_log_lines_report_tenths_rate_time_left_and_the_end():
    lines: list[str] = []
    p = LogLines("fine-tuning", "step", lines.append, every=60, gap=0).start()
    try:
        for step in range(1, 201):
            p(step, 200)
    finally:
        p.stop()
    # one line per tenth reached (10%..90%), then the final one; none repeated
    assert len(lines) == 10, lines
    assert re.fullmatch(r"fine-tuning: 20/200 steps \(10%\), [\d.]+ steps/(s|min), about .+ left \(.+ so far\)",
                        lines[0]), lines[0]
    assert re.fullmatch(r"fine-tuning: 200/200 steps in \d+ s \([\d.]+ steps/(s|min)\)", lines[-1]), lines[-1]


def test_a_stage_whose_units_take_long_still_logs_at_the_cadence():
    """An evaluation whose trainings each take minutes logs every `every` seconds, before its first unit ends
    and between units, and stops when the stage's block ends (also when the stage fails)."""
    lines: list[str] = []
    lock = threading.Lock()

    def log(s: str) -> None:
        with lock:
            lines.append((time.monotonic(), s))

    class Boom(Exception):
        pass

    t0 = time.monotonic()
    try:
        with progress.stage("evaluation", "training", log, every=0.3) as p:
            time.sleep(0.75)
            p(1, 4)
            time.sleep(0.75)
            raise Boom
    except Boom:
        pass
    ended = time.monotonic()
    time.sleep(0.5)
    assert lines[0][1] == "evaluation: running for 0 s, no training finished yet"
    assert any(s.startswith("evaluation: 1/4 trainings (25%), ") and "left" in s for _, s in lines), lines
    stamps = [t0] + [t for t, _ in lines] + [ended]
    assert max(b - a for a, b in zip(stamps, stamps[1:])) < 0.3 + 0.35, lines  # never quiet longer than the cadence
    assert all(t <= ended for t, _ in lines), "the heartbeat outlived its stage"


def test_a_stage_without_a_count_gets_the_heartbeat_and_bars_or_quiet_log_nothing(monkeypatch):
    lines: list[str] = []
    with progress.stage("filter", "", lines.append, every=0.2):
        time.sleep(0.5)
    assert lines and all(s.startswith("filter: running for ") for s in lines), lines
    for mode in ("1", "0"):  # a terminal's bars, or --quiet
        monkeypatch.setenv(progress.ENV, mode)
        quiet: list[str] = []
        with progress.stage("filter", "", quiet.append, every=0.1):
            time.sleep(0.3)
        assert quiet == []


def test_durations_read_as_a_person_writes_them():
    assert [progress.duration(s) for s in (0.4, 59, 61, 3599, 3725)] == ["0 s", "59 s", "1 min 01 s",
                                                                          "59 min 59 s", "1 h 02 min"]


def test_the_heartbeat_logs_in_the_stage_s_context():
    """Prefect's logger finds its settings (the API URL) and its run in context variables: the heartbeat thread
    runs in a copy of the stage's context, else its first line started a temporary Prefect server of its own."""
    import contextvars

    where = contextvars.ContextVar("where", default="no context")
    seen: list[str] = []
    token = where.set("the stage's context")
    try:
        with progress.stage("filter", "", lambda s: seen.append(where.get()), every=0.1):
            time.sleep(0.35)
    finally:
        where.reset(token)
    assert seen and set(seen) == {"the stage's context"}, seen
