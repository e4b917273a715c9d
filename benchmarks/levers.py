"""Levers: compare settings at one K on the validation split (never test), one row per override set.

    python benchmarks/levers.py                      # the built-in list below
    python benchmarks/levers.py --variant "generation.guidance_scale=6" --variant "evaluation.synthetic_prob=0.3"

Each variant reuses whatever stages its overrides leave unchanged (the base is pretrained once).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, arm, gain, pct, print_table, run_job  # noqa: E402

VARIANTS = [
    "",
    "generation.guidance_scale=2",
    "generation.guidance_scale=7",
    "generation.strengths=[0.25,0.5,0.75,1.0]",
    "evaluation.synthetic_prob=0.25",
    "evaluation.synthetic_prob=0.75",
    "filter.max_similarity=0.95",
    "filter.order=[class_consistency]",
    "lora.max_train_steps=400",
    "lora.rank=16 lora.lora_alpha=16",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "digits.yaml"))
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--variant", action="append", help="space-separated key=value overrides (repeatable)")
    p.add_argument("--out", default="outputs/levers")
    a = p.parse_args()
    rows = []
    for i, v in enumerate(a.variant or VARIANTS):
        over = [f"data.shots_per_class={a.shots}", f"evaluation.seeds={a.seeds}", "evaluation.split=validation",
                "evaluation.arms=[real, real+classic, real+synthetic, real+synthetic+classic]",
                "evaluation.filter_ablation=false", f"publish.output_dir={a.out}/v{i}"] + v.split()
        m, seconds = run_job(a.config, over)
        rows.append([v or "(default)", m["generation"]["kept"], pct(arm(m, "real")), pct(arm(m, "real+classic")),
                     pct(arm(m, "real+synthetic")), pct(arm(m, "real+synthetic+classic")),
                     gain(m["gain_over_best_baseline"]), f"{seconds:.0f}"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    header = ["variant", "kept", "real", "real+classic", "real+synthetic", "real+synthetic+classic",
              "gain over best (pts, 95% CI)", "wall s"]
    print_table(f"K={a.shots}, validation split, {a.seeds} seeds; accuracy in % (mean ± std)", header, rows)


if __name__ == "__main__":
    main()
