"""Jobs that share a machine: the base pretraining throughput of one default job alone and of two started together,
with augment's thread sharing (augment/cpus.py) and with each job sized to the whole machine as before it (torch's
default: one thread per CPU; here `AUGMENT_THREADS=<usable CPUs>`), side by side in one run.

    python benchmarks/shared.py                 # 300 pretraining steps per job
    python benchmarks/shared.py --steps 750     # the default job's own count

Each job is the real command, `augment run configs/digits.yaml`, with its own output folder, base cache and Prefect
home; it is stopped (SIGTERM) as soon as its base pretraining reports its rate. Target (issue 34): each of two at
once keeps at least 1/2.2 of the alone rate.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RATE = re.compile(r"base pretraining: (\d+)/(\d+) steps in .*?\(([\d.]+) steps/(s|min)\)")


def _start(folder: Path, steps: int, env: dict) -> subprocess.Popen:
    (folder / "prefect").mkdir(parents=True)
    cmd = [sys.executable, "-m", "flows.cli", "run", str(ROOT / "configs" / "digits.yaml"),
           "--output-dir", str(folder / "run"), "--set", f"base.cache_dir={folder / 'cache'}",
           "--set", f"base.pretrain_steps={steps}"]
    env = {**env, "PREFECT_HOME": str(folder / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "AUGMENT_PROGRESS": "log"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _watch(proc: subprocess.Popen, out: dict, key: int) -> None:
    """The job's base pretraining rate from its last progress line; then the job is stopped."""
    tail: list[str] = []
    for line in proc.stderr:
        tail = (tail + [line])[-20:]
        m = RATE.search(line)
        if m and m.group(1) == m.group(2):
            out[key] = float(m.group(3)) / (60 if m.group(4) == "min" else 1)
            proc.send_signal(signal.SIGTERM)
            break
    proc.wait()
    if key not in out:
        out[key] = None
        print(f"  job {key} ended without a base rate (exit {proc.returncode}):\n" + "".join(tail), file=sys.stderr)


def setting(n: int, steps: int, extra_env: dict, jobs_dir: Path) -> list[float | None]:
    """`n` jobs started together; their base pretraining rates (steps/s)."""
    env = {k: v for k, v in os.environ.items() if k != "AUGMENT_THREADS"}
    env.update(extra_env, AUGMENT_JOBS_DIR=str(jobs_dir))  # only this benchmark's jobs count each other
    rates: dict = {}
    with tempfile.TemporaryDirectory(prefix="augment-shared-") as tmp:
        procs = [_start(Path(tmp) / f"job{i}", steps, env) for i in range(n)]
        watchers = [threading.Thread(target=_watch, args=(p, rates, i)) for i, p in enumerate(procs)]
        for w in watchers:
            w.start()
        for w in watchers:
            w.join()
    return [rates[i] for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="base pretraining steps per job")
    a = p.parse_args()
    from augment.cpus import usable_cpus
    from augment.diffusion.tensors import cpu_kind

    cpus = usable_cpus()
    print(f"{cpu_kind()}; {cpus} usable CPUs; {a.steps} base pretraining steps per job (configs/digits.yaml)")
    print(f"{'setting':<72} {'steps/s per job':>18} {'of alone':>10}", flush=True)
    t0, alone = time.time(), None
    settings = [("one job alone", 1, {}), ("two at once, shared (augment/cpus.py)", 2, {}),
                (f"two at once, each sized to the machine (AUGMENT_THREADS={cpus}, as before)", 2,
                 {"AUGMENT_THREADS": str(cpus)})]
    with tempfile.TemporaryDirectory(prefix="augment-jobs-bench-") as jobs:
        for name, n, env in settings:
            rates = setting(n, a.steps, env, Path(jobs))
            alone = rates[0] if alone is None else alone
            shown = ", ".join("n/a" if r is None else f"{r:.2f}" for r in rates)
            worst = min((r for r in rates if r is not None), default=None)
            share = "n/a" if worst is None or not alone else f"1/{alone / worst:.2f}"
            print(f"{name:<72} {shown:>18} {share:>10}", flush=True)
    print(f"(target: each of two at once >= 1/2.2 of alone; wall time {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
