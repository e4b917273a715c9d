"""The process pool that a run's stages share (augment.parallel): batches reuse the workers, each batch's units see
its own shared data, a failed batch stops the workers, and a run leaves no worker behind."""

import os

import pytest

from augment import parallel
from augment.parallel import close_pool, run_each, spawn_pool, worker_cache

_DATA: dict = {}
_KEPT = worker_cache()


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
