"""The process pool that a run's stages share (augment.parallel): batches reuse the workers, each batch's units see
its own shared data, a failed batch stops the workers, and a run leaves no worker behind."""

import os

import pytest

from augment import parallel
from augment.parallel import close_pool, run_each, spawn_pool, worker_state
from conftest import alive, still_alive_after

_DATA: dict = {}
_KEPT = worker_state()


def _share(value):
    _DATA["value"] = value


def _unit(i):
    """(worker pid, this batch's shared value + i, what the worker cache held from earlier units)."""
    seen = sorted(_KEPT)
    _KEPT[i] = True
    return os.getpid(), _DATA["value"] + i, seen


def _fail(i):
    if i == 1:
        raise ValueError("unit 1 fails")
    return os.getpid()


@pytest.fixture(autouse=True)
def _no_pool():
    close_pool()
    yield
    close_pool()


def test_batches_share_the_workers_and_each_sees_its_own_data():
    first = run_each(_unit, [(i,) for i in range(4)], 2, _share, (100,))
    second = run_each(_unit, [(i,) for i in range(4)], 2, _share, (1000,))
    assert [v for _, v, _ in first] == [100, 101, 102, 103]
    assert [v for _, v, _ in second] == [1000, 1001, 1002, 1003]
    pids = {p for p, _, _ in first} | {p for p, _, _ in second}
    assert os.getpid() not in pids and len(pids) <= 2  # the same two processes served both batches
    # the worker cache lives within a batch: nothing the first batch kept is seen in the second
    assert all(set(seen) <= {0, 1, 2, 3} for _, _, seen in second)
    assert all(not seen or max(seen) < i for i, (_, _, seen) in enumerate(second))


def test_a_failed_batch_stops_the_workers_and_the_next_batch_starts_new_ones():
    before = {p for p, _, _ in run_each(_unit, [(i,) for i in range(2)], 2, _share, (0,))}
    with pytest.raises(ValueError, match="unit 1 fails"):
        run_each(_fail, [(i,) for i in range(3)], 2)
    assert not parallel._POOL  # stopped, not left with a worker in an unknown state
    after = {p for p, _, _ in run_each(_unit, [(i,) for i in range(2)], 2, _share, (0,))}
    assert not before & after


def test_the_shared_data_file_is_removed_when_the_batch_ends(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    batch = spawn_pool(2, _share, (5,))
    assert [f.result()[1] for f in [batch.submit(_unit, 1)]] == [6]
    assert list(tmp_path.glob("augment-batch-*"))
    batch.shutdown()
    assert not list(tmp_path.glob("augment-batch-*"))


def test_a_pool_of_another_size_replaces_the_old_one():
    run_each(_unit, [(i,) for i in range(2)], 2, _share, (0,))
    old = parallel._POOL["executor"]
    run_each(_unit, [(i,) for i in range(3)], 3, _share, (0,))
    assert parallel._POOL["executor"] is not old and parallel._POOL["workers"] == 3


def test_a_run_leaves_no_worker_process_behind(tiny_cfg):
    from augment import pipeline

    started = []

    def call(stage, kept):
        if not started:  # the first stage uses the pool, as selection and evaluation do
            started.append(run_each(_unit, [(i,) for i in range(2)], 2, _share, (0,)))
            assert parallel._POOL
        return {}

    pipeline.walk(tiny_cfg, call)
    assert started and not parallel._POOL


def test_a_forked_child_does_not_reuse_the_parents_pool():
    run_each(_unit, [(i,) for i in range(2)], 2, _share, (0,))
    assert parallel._POOL
    pid = os.fork()
    if pid == 0:  # the child: the parent's executor has no management thread here
        os._exit(0 if not parallel._POOL else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and parallel._POOL


def _sleep(seconds):
    import time

    time.sleep(seconds)
    return os.getpid()


HOLDER = r"""
import sys, time
from augment.parallel import spawn_pool
from tests_parallel_unit import sleep_unit
batch = spawn_pool(2)
futures = [batch.submit(sleep_unit, 300) for _ in range(2)]
print(" ".join(str(p.pid) for p in batch.executor._processes.values()), flush=True)
time.sleep(300)
"""


def test_workers_exit_when_the_run_is_killed_with_sigkill(tmp_path):
    """kill -9 of a run leaves no worker behind (they were orphaned, ~400 MB each, blocked on a pipe)."""
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "tests_parallel_unit.py").write_text("import time, os\n\ndef sleep_unit(s):\n    time.sleep(s)\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = run.stdout.readline()
        workers = [int(p) for p in line.split()]
        time.sleep(1.0)
        assert len(workers) == 2 and alive(workers) == set(workers)
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    assert not still_alive_after(workers, 10), "a worker outlived its killed run"


def test_an_interrupt_cuts_the_units_in_flight_instead_of_waiting_for_them():
    """Ctrl-C or SIGTERM during a batch of long units stops in seconds (the units are recomputed on resume)."""
    import time

    calls = [(0.1,)] + [(60,)] * 3

    def interrupt():
        raise KeyboardInterrupt

    t0 = time.time()
    with pytest.raises(KeyboardInterrupt):
        run_each(_sleep, calls, 2, tick=interrupt)
    assert time.time() - t0 < 15 and not parallel._POOL


def test_a_killed_runs_batch_files_are_swept_and_live_ones_kept(tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f"augment-batch-{dead}-abc.pkl"
    live = tmp_path / f"augment-batch-{os.getppid()}-abc.pkl"
    foreign = tmp_path / f"notes-{dead}-abc.pkl"
    for f in (stale, live, foreign):
        f.write_bytes(b"x")
    batch = spawn_pool(2, _share, (5,))
    try:
        assert batch.submit(_unit, 1).result()[1] == 6
        assert not stale.exists() and live.exists() and foreign.exists()
    finally:
        batch.shutdown()


def _die_once(marker: str, i: int):
    """A unit whose worker is killed (as by the out-of-memory killer) the first time any unit runs."""
    import signal
    from pathlib import Path

    if i == 1 and not Path(marker).exists():
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    if i == 1 and marker.endswith("always"):
        os.kill(os.getpid(), signal.SIGKILL)
    return i * 10


@pytest.mark.parametrize("always", [False, True], ids=["once", "every-time"])
def test_a_worker_killed_mid_stage_is_replaced_once_then_one_line(tmp_path, always, capsys):
    """A worker killed mid-shard (kill -9, the OOM killer) was a BrokenProcessPool traceback: the stage now runs
    again on new workers once (resuming from what is finished), and a second death is one line."""
    from augment.errors import USER_ERRORS
    from augment.stages.core import Stage

    marker = str(tmp_path / ("always" if always else "once"))
    said = []
    probe = Stage("probe", "probe", "",
                  lambda cfg, log, progress: run_each(_die_once, [(marker, i) for i in range(4)], 2))
    if not always:
        assert probe.call(None, {}, log=said.append) == [0, 10, 20, 30]
        assert len(said) == 1 and "a worker process died" in said[0] and "again on new workers" in said[0]
        return
    with pytest.raises(USER_ERRORS) as err:
        probe.call(None, {}, log=said.append)
    assert "died twice" in str(err.value) and "runner.local_workers" in str(err.value) and "\n" not in str(err.value)
    assert not parallel._POOL
