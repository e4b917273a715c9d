"""Scale-out: the evaluation stage's wall time on 1 and 2 workers, as Prefect tasks on local Dask clusters (and
the local process pool for reference), on a finished default job.

    python benchmarks/speed.py                 # once: leaves the cold default job in outputs/benchmark/speed
    python benchmarks/scale.py [--seeds 4]     # then this

Every other stage is reused from that job (copied per variant); only the downstream trainings run. Results must
be identical across variants (checked here too).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, print_table, run_job  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "digits.yaml"))
    p.add_argument("--job", default="outputs/benchmark/speed/job-8px", help="a finished run folder of --config")
    p.add_argument("--cache", default="outputs/benchmark/speed/cache-8px")
    p.add_argument("--seeds", type=int, default=4, help="evaluation.seeds (diagnostic arms get half)")
    p.add_argument("--out", default="outputs/benchmark/scale")
    a = p.parse_args()
    job, out = Path(a.job), Path(a.out)
    if not (job / "evaluation" / "results.json").exists():
        sys.exit(f"{job} is not a finished run: run benchmarks/speed.py first")
    variants = [("local pool", "local", 1), ("local pool", "local", 2), ("Dask", "dask", 1), ("Dask", "dask", 2)]
    rows, results = [], {}
    for name, kind, n in variants:
        run = out / f"{kind}-{n}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(job, run, ignore=shutil.ignore_patterns(".augment-run.lock", "evaluation"))
        overrides = [f"publish.output_dir={run}", f"base.cache_dir={a.cache}", f"evaluation.seeds={a.seeds}",
                     f"evaluation.diagnostic_seeds={max(1, a.seeds // 2)}", f"runner.kind={kind}"]
        overrides += [f"runner.local_workers={n}"] if kind == "local" else [f"runner.workers={n}"]
        _, wall = run_job(a.config, overrides)
        stages = json.loads((run / "run.json").read_text())["stages"]
        res = json.loads((run / "evaluation" / "results.json").read_text())
        results[(kind, n)] = {k: [{x: y for x, y in r.items() if x != "seconds"} for r in v]
                              for k, v in res["runs"].items()}
        units = sum(len(v) for v in res["runs"].values())
        rows.append([name, n, units, f"{stages['evaluate']['seconds']:.1f}", f"{wall:.1f}"])
    base = float(rows[2][3])
    for r in rows:
        r.append(f"{base / float(r[3]):.2f}x" if r[0] == "Dask" else "")
    same = all(v == results[("local", 1)] for v in results.values())
    print_table(f"Evaluation stage, {a.seeds} seeds ({'identical results' if same else 'RESULTS DIFFER'})",
                ["runner", "workers", "trainings", "evaluate s", "flow wall s", "Dask speed-up"], rows)


if __name__ == "__main__":
    main()
