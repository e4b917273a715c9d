"""Quality benchmark: does synthetic data beat the cheap baselines at K = 5, 10, 20 labeled shots per class?

Runs the product's own flow (configs/digits.yaml unless --config) once per K, with the rest of the non-test images
as the unlabeled pool, and prints one table: real only, real + classic augmentation, real + synthetic (filtered),
the paired gain over the better baseline with its 95% CI, the Classification Accuracy Score (synthetic only) and
the wall time. Not a test.

    python benchmarks/quality.py                                # digits, K = 5 10 20, 5 seeds, test split
    python benchmarks/quality.py --source /data/folder          # <folder>/{train,test[,validation][,pool]}/<class>/*
    python benchmarks/quality.py --split validation --set generation.guidance_scale=3   # choose settings
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, arm, gain, pct, print_table, run_job  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "digits.yaml"))
    p.add_argument("--source", help="image folder with train/ and test/ (and optional validation/, pool/)")
    p.add_argument("--shots", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--split", choices=["test", "validation"], default="test")
    p.add_argument("--out", default="outputs/benchmark")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args()
    rows = []
    for k in a.shots:
        name = Path(a.source).name if a.source else "digits"
        over = [f"data.shots_per_class={k}", f"evaluation.seeds={a.seeds}", f"evaluation.split={a.split}",
                "evaluation.arms=[real, real+classic, real+synthetic, synthetic]",
                "evaluation.filter_ablation=false", f"publish.output_dir={a.out}/{name}-K{k}"]
        if a.source:
            over.append(f"data.source={a.source}")
        m, seconds = run_job(a.config, over + a.overrides)
        rows.append([k, pct(arm(m, "real")), pct(arm(m, "real+classic")), pct(arm(m, "real+synthetic")),
                     f"{gain(m['gain_over_best_baseline'])} vs {m['gain_over_best_baseline']['baseline']}",
                     pct(arm(m, "synthetic")), f"{seconds:.0f}"])
        print(f"K={k} done in {seconds:.0f}s", flush=True)
    header = ["K", "real", "real+classic", "real+synthetic", "gain over best baseline (pts, 95% CI)",
              "CAS (synthetic only)", "wall s"]
    print_table(f"split: {a.split}; {a.seeds} seeds; accuracy in % (mean ± std over seeds)", header, rows)


if __name__ == "__main__":
    main()
