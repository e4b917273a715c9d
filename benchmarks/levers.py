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
    "lora.use_pseudo_labeled=false",
    "generation.guidance_scale=2",
    "generation.guidance_scale=6",
    "generation.strengths=[0.5,0.75,1.0]",
    "lora.max_train_steps=1600",
    "lora.labeled_share=0.25",
    "generation.num_per_class=400",
    "evaluation.synthetic_prob=0.3",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "digits.yaml"))
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--variant", action="append", help="space-separated key=value overrides (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="applied to every variant")
    p.add_argument("--out", default="outputs/levers")
    a = p.parse_args()
    rows = []
    for i, v in enumerate(a.variant or VARIANTS):
        over = [f"data.shots_per_class={a.shots}", f"evaluation.seeds={a.seeds}", "evaluation.split=validation",
                "evaluation.filter_ablation=false", "evaluation.diagnostic_arms=false",
                f"publish.output_dir={a.out}/v{i}", *a.overrides, *v.split()]
        m, seconds = run_job(a.config, over)
        ev = m["evaluation"]
        recipe = ev["selection"]["recipe"]["chosen"]
        adds = ev["synthetic_adds"]
        rows.append([v or "(default)", m["generation"]["kept"], pct(arm(m, "real+classic")),
                     pct(arm(m, recipe + "+pseudo")), ev["product_arm"], pct(arm(m, ev["product_arm"])),
                     gain((ev["gains"].get("real+classic") or {}).get("accuracy")),
                     gain(m["gain_over_best_baseline"]),
                     gain((adds.get(f"{recipe}+pseudo+synthetic vs {recipe}+pseudo") or {}).get("accuracy")),
                     f"{seconds:.0f}"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    header = ["variant", "kept", "real+classic", "recipe+pseudo", "product arm", "product",
              "product − real+classic", "product − best baseline", "synthetic adds to recipe+pseudo", "wall s"]
    print_table(f"K={a.shots}, validation split, {a.seeds} seeds; accuracy in % (mean ± std); gains in points "
                "[95% CI]", header, rows)


if __name__ == "__main__":
    main()
