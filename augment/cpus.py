"""How many CPUs a job may use: the ones this process may really run on, shared fairly with the other augment jobs
running on the machine at the time.

`os.cpu_count()` is the machine's count. A container limited by a cgroup quota, a process pinned by `taskset`, and
two jobs on one Prefect worker all get fewer: measured, two default jobs started together on 2 cores, each with
torch's default of 2 threads, pretrained at 1.5-1.8 steps/s each against 9 steps/s for one alone (5-6x slower
where a fair share is 2x). So each stage sizes its torch threads, and each run its worker processes, from
`usable_cpus() // running jobs`, counted when the stage starts: a stage keeps its count to its end, and its result
is reproducible for that count (a float reduction split over another number of threads can round differently).
`AUGMENT_THREADS=n` fixes the count instead (runs that must match bit for bit whatever else runs).

Running jobs are counted through lock files: each job holds an exclusive `flock` on a file of its own in a folder
of the user's (`AUGMENT_JOBS_DIR`, by default `<tmp>/augment-jobs-<uid>`) for as long as it runs; the kernel drops
the lock when the process ends, however it ends, so a killed job stops counting at once and its file is removed by
the next job that looks.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

THREADS_ENV = "AUGMENT_THREADS"
JOBS_ENV = "AUGMENT_JOBS_DIR"


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota (in CPUs) of this process's cgroup and its ancestors, the smallest; None when unlimited."""
    limits = []
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":  # cgroup v2: cpu.max is "max 100000" or "<quota> <period>"
            folder = root / path.lstrip("/")
            while True:
                with contextlib.suppress(OSError, ValueError):
                    quota, period = (folder / "cpu.max").read_text().split()[:2]
                    if quota != "max":
                        limits.append(int(quota) / int(period))
                if folder == root or root not in folder.parents:
                    break
                folder = folder.parent
        elif "cpu" in controllers.split(","):  # cgroup v1: cpu.cfs_quota_us is -1 when unlimited
            for folder in (root / controllers / path.lstrip("/"), root / "cpu" / path.lstrip("/"), root / "cpu"):
                with contextlib.suppress(OSError, ValueError):
                    quota = int((folder / "cpu.cfs_quota_us").read_text())
                    period = int((folder / "cpu.cfs_period_us").read_text())
                    if quota > 0 and period > 0:
                        limits.append(quota / period)
                    break
    return min(limits) if limits else None


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, a container's cpuset), capped by its cgroup's
    CPU quota (a container's --cpus), rounded up."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def jobs_dir() -> Path:
    """The folder of running jobs' lock files: created private (0700); refused if it is a link or not ours (a
    predictable name in a shared temporary folder could be planted)."""
    folder = Path(os.environ.get(JOBS_ENV) or Path(tempfile.gettempdir()) / f"augment-jobs-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700, parents=True)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError(f"{folder} is not a folder of this user's: set {JOBS_ENV} to one that is")
    return folder


def running_jobs() -> int:
    """How many augment jobs hold a lock file now (this one included when it is running); stale files (their
    process ended) are removed. 1 when the folder cannot be used: sharing is then off, never a failure."""
    try:
        folder = jobs_dir()
        files = list(folder.glob("*.job"))
    except OSError:
        return 1
    live = 0
    for path in files:
        if path.name == _JOB.get("name"):
            live += 1
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            live += 1
        except OSError:
            pass
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        finally:
            os.close(fd)
    return max(1, live)


_JOB: dict = {}  # this process's registration: {"name": file name, "fd": descriptor holding the lock}


@contextlib.contextmanager
def job() -> Iterator[None]:
    """Count this process as a running job for the block (nested blocks count once). Never fails a run: a folder
    that cannot be written only turns sharing off."""
    if _JOB:  # the outer block holds the registration
        yield
        return
    fd = None
    with contextlib.suppress(OSError):
        folder = jobs_dir()
        name = f"{os.getpid()}-{os.urandom(4).hex()}.job"
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        _JOB.update(name=name, fd=fd)
    try:
        yield
    finally:
        if fd is not None:
            _JOB.clear()
            with contextlib.suppress(OSError):
                (folder / name).unlink()
            os.close(fd)


# A forked child (a task runner's process) is not the job: the lock belongs to the parent's open file.
os.register_at_fork(after_in_child=_JOB.clear)


def fair_share() -> int:
    """CPUs for this job now: `AUGMENT_THREADS` if set, else usable_cpus() over the running jobs (at least 1)."""
    fixed = os.environ.get(THREADS_ENV, "").strip()
    if fixed:
        try:
            n = int(fixed)
        except ValueError:
            n = 0
        if n < 1:
            from augment.config import ConfigError

            raise ConfigError(f"{THREADS_ENV}={fixed!r}: give a whole number of threads, at least 1")
        return n
    return max(1, usable_cpus() // running_jobs())


def share_threads() -> int:
    """Set torch's intra-op threads to this job's fair share (a stage calls it as it starts); returns the count."""
    import torch

    n = fair_share()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
