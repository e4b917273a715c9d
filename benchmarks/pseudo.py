"""Pseudo-label benchmark: does the cross-validated, class-balanced pseudo rule label pool images, and does the
pseudo-labeled pool beat labeled data alone? No generator: the pseudo stage's choices, then the baselines.

Per (dataset, K shots per class, few-shot draw = data.seed): the splits of the product's data stage, the choices of
its pseudo stage (augment.pseudo.select_and_label: recipe and amount out of fold, on labeled data only), and the
downstream model (evaluation.model) trained on real, real+classic, and the chosen recipe with the pool, `--seeds`
paired seeds each, scored once on the real test split. Intervals: two-level bootstrap over draws, then seeds.
Not a test.

    python benchmarks/pseudo.py --datasets mnist --shots 10 --draws 3 --seeds 5
    python benchmarks/pseudo.py --datasets digits --shots 10 --draws 1 --rule validation   # the old rule
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, print_table  # noqa: E402
from bench_data import source_override  # noqa: E402

DATASETS = {  # overrides of configs/digits.yaml
    "digits": ["data.source=sklearn-digits"],
    "mnist": ["data.image_size=8", "data.test_fraction=0.3"],  # 8 px like the default job; source: bench_data
    "lfw": ["data.test_fraction=0.3"],
}


def run_one(cfg, out: Path) -> dict:
    from augment.data import make_splits
    from augment.evaluate import evaluate, summarize_results
    from augment.trainings import Examples, TrainingSets
    from augment.pseudo import pseudo_label, select_and_label
    from augment.results import Selection

    t0 = time.time()
    splits = make_splits(cfg.data)
    if cfg.selection.rule == "cross_validation":
        labels, decisions = select_and_label(cfg.pseudo, cfg.selection, splits.train, splits.pool,
                                             workers=cfg.runner.local_workers, log=lambda m: None)
    else:
        labels, decisions = pseudo_label(cfg.pseudo, splits.train, splits.validation, splits.pool,
                                         log=lambda m: None), Selection()
    t_select = time.time() - t0
    pseudo = Examples(splits.pool.images[labels.index], labels.labels) if len(labels) else None
    recipe = decisions.recipe.chosen if decisions.recipe else "real+classic"
    arms = ["real", "real+classic"] + ([f"{recipe}+pseudo"] if pseudo is not None else [])
    empty = Examples(splits.train.images[:0], splits.train.labels[:0])
    ev = cfg.evaluation.model_copy(update={"arms": arms, "filter_ablation": False, "recipe": "auto"})
    sets = TrainingSets(splits, empty, empty, pseudo)
    res = evaluate(ev, sets, out, log=lambda m: None, decisions=decisions)
    s = summarize_results(res)
    chosen = decisions.pseudo.chosen if decisions.pseudo else res.recipe  # the recipe, with the pool if it helps
    return {"runs": {a: [r.accuracy for r in rs if r.accuracy is not None] for a, rs in res.runs.items()},
            "recipe": res.recipe, "product_recipe": chosen, "pseudo": labels.summary.to_json(),
            "decisions": decisions.to_json(), "best_baseline": s.best_baseline,
            "seconds_select": t_select, "seconds": time.time() - t0}


def main() -> None:
    from augment.configfile import load_config
    from augment.stats import clustered_difference

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "digits.yaml"))
    p.add_argument("--datasets", nargs="+", default=["digits", "mnist"], choices=list(DATASETS))
    p.add_argument("--shots", type=int, nargs="+", default=[10])
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--rule", choices=["cross_validation", "validation"], default="cross_validation")
    p.add_argument("--out", default="outputs/benchmark-pseudo")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args()
    out = Path(a.out)
    results_path = out / "pseudo.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for ds in a.datasets:
        extra = [*DATASETS[ds], *source_override(ds, out)]
        if a.rule == "validation":
            extra.append("data.val_fraction=0.1")
        rows = []
        for k in a.shots:
            jobs = []
            for d in range(a.draws):
                over = [*extra, f"data.shots_per_class={k}", f"data.seed={d}", f"evaluation.seeds={a.seeds}",
                        f"selection.rule={a.rule}", *a.overrides]
                key = json.dumps(over)
                if key not in results:
                    cfg = load_config(a.config, over)
                    results[key] = run_one(cfg, out / f"{ds}-K{k}-d{d}-{a.rule}")
                    out.mkdir(parents=True, exist_ok=True)
                    results_path.write_text(json.dumps(results))
                j = results[key]
                jobs.append(j)
                ps = j["pseudo"]
                print(f"{ds} K={k} draw {d}: recipe {_recipe(j)}, pseudo {ps.get('count', 0)} of "
                      f"{ps.get('pool_size')} (per class {ps.get('per_class_amount', ps.get('threshold'))}), "
                      f"labeler OOF {ps.get('labeler_oof_accuracy')}, {j['seconds']:.0f}s "
                      f"(choices {j['seconds_select']:.0f}s)", flush=True)
            rows.append(_row(k, jobs, clustered_difference))
        print_table(f"{ds}: rule {a.rule}; {a.draws} draws x {a.seeds} seeds; test accuracy in % (mean over draws "
                    "and seeds); intervals: two-level bootstrap over draws and seeds",
                    ["K", "labeler out-of-fold", "pool labeled", "real", "real+classic", "recipe+pseudo",
                     "recipe+pseudo − real (pts)", "recipe+pseudo − best of real, real+classic (pts)",
                     "product recipe",
                     "wall s"], rows)


def _row(k, jobs, clustered) -> list:
    def mean(arm_of) -> str:
        vals = [v for j in jobs for v in j["runs"].get(arm_of(j), [])]
        return f"{100 * np.mean(vals):.1f}" if vals else "n/a"

    def gain(pair_of) -> str:
        groups = [np.subtract(j["runs"][a], j["runs"][b]) for j in jobs for a, b in [pair_of(j)]
                  if a in j["runs"] and b in j["runs"]]
        if not groups:
            return "n/a"
        g = clustered(groups)
        return f"{100 * g['mean']:+.1f} [{100 * g['ci_low']:+.1f}, {100 * g['ci_high']:+.1f}]"

    def pseudo_arm(j):
        return f"{j['recipe']}+pseudo"

    def best_plain(j):
        return max(("real", "real+classic"), key=lambda a: np.mean(j["runs"][a]))

    oof = [j["pseudo"].get("labeler_oof_accuracy") for j in jobs if j["pseudo"].get("labeler_oof_accuracy")]
    return [k, f"{100 * np.mean(oof):.1f}" if oof else "n/a",
            " / ".join(f"{j['pseudo'].get('count', 0)}" for j in jobs),
            mean(lambda j: "real"), mean(lambda j: "real+classic"), mean(pseudo_arm),
            gain(lambda j: (pseudo_arm(j), "real")), gain(lambda j: (pseudo_arm(j), best_plain(j))),
            ", ".join(sorted({_recipe(j) for j in jobs})), f"{sum(j['seconds'] for j in jobs):.0f}"]


def _recipe(j: dict) -> str:
    return (j["decisions"].get("pseudo") or {}).get("chosen") or j["recipe"]


if __name__ == "__main__":
    main()
