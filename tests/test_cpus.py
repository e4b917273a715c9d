"""CPUs a job may use: affinity and cgroup quota, shared with the other augment jobs running on the machine."""

import os
import signal
import subprocess
import sys
import time

import pytest

from augment import cpus
from augment.config import ConfigError


@pytest.fixture
def jobs(tmp_path, monkeypatch):
    folder = tmp_path / "jobs"
    monkeypatch.setenv(cpus.JOBS_ENV, str(folder))
    monkeypatch.delenv(cpus.THREADS_ENV, raising=False)
    return folder


def _cgroup(tmp_path, lines: str, files: dict):
    root = tmp_path / "cg"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "self-cgroup"
    proc.write_text(lines)
    return root, proc


def test_cgroup_v2_quota_is_the_smallest_along_the_path(tmp_path):
    root, proc = _cgroup(tmp_path, "0::/a/b\n", {"cpu.max": "max 100000", "a/cpu.max": "150000 100000",
                                                 "a/b/cpu.max": "300000 100000"})
    assert cpus._cgroup_quota(root, proc) == 1.5
    root, proc = _cgroup(tmp_path / "u", "0::/\n", {"cpu.max": "max 100000"})
    assert cpus._cgroup_quota(root, proc) is None


def test_cgroup_v1_quota(tmp_path):
    root, proc = _cgroup(tmp_path, "4:cpu,cpuacct:/docker/x\n",
                         {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "50000",
                          "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000"})
    assert cpus._cgroup_quota(root, proc) == 0.5
    root, proc = _cgroup(tmp_path / "u", "4:cpu,cpuacct:/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "-1",
                                                                "cpu,cpuacct/cpu.cfs_period_us": "100000"})
    assert cpus._cgroup_quota(root, proc) is None


def test_usable_cpus_follows_the_affinity_mask_and_the_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: None)
    assert cpus.usable_cpus() == 4
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: 1.5)
    assert cpus.usable_cpus() == 2
    monkeypatch.setattr(cpus, "_cgroup_quota", lambda: 0.2)
    assert cpus.usable_cpus() == 1


HOLD = """
import sys, time
from augment import cpus
with cpus.job():
    print("registered", flush=True)
    time.sleep(120)
"""


def test_two_running_jobs_each_get_half_and_a_killed_one_stops_counting(jobs, monkeypatch):
    monkeypatch.setattr(cpus, "usable_cpus", lambda: 4)
    with cpus.job():
        assert cpus.running_jobs() == 1 and cpus.fair_share() == 4
        other = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, cpus.JOBS_ENV: str(jobs)})
        try:
            assert other.stdout.readline().strip() == "registered"
            assert cpus.running_jobs() == 2 and cpus.fair_share() == 2
            assert len(list(jobs.glob("*.job"))) == 2
        finally:
            other.send_signal(signal.SIGKILL)
            other.wait()
        assert cpus.running_jobs() == 1 and cpus.fair_share() == 4
        assert len(list(jobs.glob("*.job"))) == 1  # the killed job's file was cleaned up
    assert not list(jobs.glob("*.job")) and cpus.running_jobs() == 1


def test_augment_threads_fixes_the_count_and_a_bad_value_is_one_line(jobs, monkeypatch):
    monkeypatch.setenv(cpus.THREADS_ENV, "3")
    assert cpus.fair_share() == 3
    monkeypatch.setenv(cpus.THREADS_ENV, "many")
    with pytest.raises(ConfigError, match="AUGMENT_THREADS='many'"):
        cpus.fair_share()


def test_a_planted_link_for_the_jobs_folder_is_refused_and_only_turns_sharing_off(tmp_path, monkeypatch):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "jobs").symlink_to(target)
    monkeypatch.setenv(cpus.JOBS_ENV, str(tmp_path / "jobs"))
    with pytest.raises(PermissionError, match="not a folder of this user's"):
        cpus.jobs_dir()
    with cpus.job():  # a run still runs
        assert cpus.running_jobs() == 1
    assert not list(target.iterdir())


def test_a_stage_sets_torch_threads_to_the_jobs_share(jobs, monkeypatch):
    import torch

    from augment.stages.core import Stage

    seen = []
    stage = Stage("probe", "probing", "", lambda cfg, log, progress: seen.append(torch.get_num_threads()))
    threads = torch.get_num_threads()
    try:
        monkeypatch.setattr(cpus, "usable_cpus", lambda: 2)
        monkeypatch.setattr(cpus, "running_jobs", lambda: 2)
        stage.call(None, {})
        monkeypatch.setattr(cpus, "running_jobs", lambda: 1)
        stage.call(None, {})
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 2]
