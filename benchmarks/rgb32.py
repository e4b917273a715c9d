"""Stage times of the README's 32 px RGB example beside the 8 px default job, side by side in one run, cold (empty
cache and run folder), each job through `augment run` in its own process, one after the other.

- `8px`: configs/digits.yaml as it ships.
- `32px`: configs/rgb32.yaml (every classifier the base's features with a linear head) on the `colour` set of
  benchmarks/bench_data.py (3 classes of 32 px RGB digits, 10 labeled per class, a pool of 300, 102 test images).
- With `--old REF` (a commit), the same jobs with the code at REF too, from a git worktree of it: its 8 px default
  job, and its README example, configs/digits.yaml with the data section the README shows (32 px, 3 channels),
  which is all a code without configs/rgb32.yaml can run (small CNNs: about a minute of 2 cores per training).

    python benchmarks/rgb32.py                          # now: 8 px and 32 px (about 12 minutes on 2 cores)
    python benchmarks/rgb32.py --old 166a4f6 --jobs 8px # the default job before and now
    python benchmarks/rgb32.py --old 166a4f6            # also the 32 px example before: hours on 2 cores

Prints one Markdown table: seconds per stage (run.json's), and the wall time of each command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, print_table  # noqa: E402
from bench_data import write_colour  # noqa: E402

README_DATA = ["data.image_size=32", "data.channels=3", "data.shots_per_class=10", "data.test_fraction=0.2",
               "data.val_fraction=0.0", "data.max_pool_size=300"]


def command(tree: Path, job: str, colour: Path, has_rgb32: bool) -> list[str]:
    if job == "8px":
        return ["configs/digits.yaml"]
    if has_rgb32:  # the same size as the README's example before: 10 labeled per class, a pool of 300
        return ["configs/rgb32.yaml", "--set", f"data.source={colour}", "--set", "data.shots_per_class=10",
                "--set", "data.max_pool_size=300"]
    return ["configs/digits.yaml", "--set", f"data.source={colour}", *(x for s in README_DATA for x in ("--set", s))]


def run(tree: Path, job: str, colour: Path, out: Path) -> dict:
    """One job, cold, with the code in `tree`; its stage seconds and wall time."""
    folder, cache = out / "run", out / "cache"
    shutil.rmtree(out, ignore_errors=True)
    args = [sys.executable, "-m", "flows.cli", "run",
            *command(tree, job, colour, (tree / "configs" / "rgb32.yaml").is_file()),
            "--output-dir", str(folder), "--set", f"base.cache_dir={cache}", "-q"]
    env = {**os.environ, "PYTHONPATH": str(tree), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    t0 = time.time()
    done = subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if done.returncode:
        raise SystemExit(f"{job} in {tree} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    info = json.loads((folder / "run.json").read_text())
    seconds = {k: v.get("seconds") for k, v in info["stages"].items()}
    verdict = next((line for line in done.stdout.splitlines() if "test accuracy" in line), "")
    return {"seconds": seconds, "wall": wall, "verdict": verdict}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", nargs="+", default=["8px", "32px"], choices=["8px", "32px"])
    p.add_argument("--old", help="a commit: run the jobs with its code too (a git worktree, removed after)")
    p.add_argument("--out", default="outputs/benchmark/rgb32")
    a = p.parse_args()
    out = Path(a.out).resolve()
    colour = write_colour(out / "datasets" / "colour")
    trees = {"now": ROOT}
    if a.old:
        old = out / "old-tree"
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(old), a.old], cwd=ROOT, check=True,
                       capture_output=True)
        trees = {f"before ({a.old})": old, "now": ROOT}
    from augment.diffusion.tensors import cpu_kind

    print(f"CPU: {cpu_kind()}, {os.cpu_count()} CPUs")
    results = {}
    try:
        for job in a.jobs:
            for name, tree in trees.items():
                results[job, name] = run(tree, job, colour, out / f"{job}-{name.split()[0]}")
                print(f"{job} {name}: {results[job, name]['wall']:.0f} s; {results[job, name]['verdict']}",
                      flush=True)
    finally:
        if a.old:
            subprocess.run(["git", "worktree", "remove", "--force", str(out / "old-tree")], cwd=ROOT,
                           capture_output=True)
    columns = list(results)
    stages = list(dict.fromkeys(s for r in results.values() for s in r["seconds"]))
    rows = [[s, *(f"{results[c]['seconds'].get(s) or 0:.1f}" for c in columns)] for s in stages]
    rows.append(["**wall (the command)**", *(f"{results[c]['wall']:.1f}" for c in columns)])
    print_table("Seconds per stage, cold, one job after the other", ["stage", *(f"{j} {n}" for j, n in columns)],
                rows)


if __name__ == "__main__":
    main()
