"""Judges benchmark: does the builtin base read as an encoder (`kind: encoder, backbone: base`, a linear head on the
base's cached denoising features) judge as well as the small CNN, and at what cost per training?

Per dataset: the product's splits and its builtin base (pretrained as the base stage does, cached under
`--out`/cache), then each judge trained as the protocol trains its classifiers (classic augmentation on, as in the
real+classic recipe):
- out of fold on the labeled images only (`--folds` stratified folds of the train split, one seed), the way the
  run's choices and pseudo-labels are judged;
- on every labeled image, scored on the held-out test split (`--seeds` seeds), the downstream model's yardstick;
- seconds per training (after the features are cached: the first training of the base judge also computes them,
  timed apart as `features s`).
Not a test; it prints a table.

    python benchmarks/judges.py                                   # digits (8 px), mnist (8 px), colour (32 px RGB)
    python benchmarks/judges.py --datasets colour --folds 5 --seeds 2
    python benchmarks/judges.py --judges "base encoder"          # the base judge alone (its bases are cached)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, print_table  # noqa: E402
from bench_data import source_override  # noqa: E402

DATASETS = {  # (config, overrides)
    "digits": ("configs/digits.yaml", []),
    "mnist": ("configs/digits.yaml", ["data.image_size=8", "data.test_fraction=0.3"]),
    "colour": ("configs/rgb32.yaml", ["data.shots_per_class=10", "data.max_pool_size=300"]),
}


def judges(cfg, info) -> dict:
    """The two judges: the CNN as the default job's evaluation.model, and the base read as an encoder."""
    from augment.config import ClassifierConfig

    cnn = ClassifierConfig()
    base = ClassifierConfig(kind="encoder", backbone="base")
    for c in (cnn, base):
        c._device, c._cache_dir, c._base = cfg.device, cfg.base.cache_dir, info.to_json()
    return {"cnn": cnn, "base encoder": base}


def measure(name: str, args) -> list[dict]:
    from sklearn.model_selection import StratifiedKFold

    from augment.classifier import train_classifier
    from augment.configfile import load_config
    from augment.data import make_splits
    from augment.stages.generator import backend_for

    config, overrides = DATASETS[name]
    out = Path(args.out)
    cfg = load_config(ROOT / config, [*overrides, *source_override(name, out), f"base.cache_dir={out / 'cache'}"])
    splits = make_splits(cfg.data)
    t0 = time.time()
    info = backend_for(cfg, splits).prepare(splits.train, splits.pool, log=lambda m: None)
    print(f"{name}: base ready in {time.time() - t0:.0f} s ({info.description})", flush=True)
    train, test, k = splits.train, splits.test, len(splits.class_names)
    rows = []
    for judge, clf in judges(cfg, info).items():
        if judge not in args.judges:
            continue
        t0 = time.time()
        if judge != "cnn":  # the features of every image the trainings below read, computed once and cached
            from augment.encoders import warm

            warm(clf, [train.images, test.images], [train.images])
        feature_s = time.time() - t0
        seconds, oof = [], np.zeros(len(train), bool)
        folds = StratifiedKFold(args.folds, shuffle=True, random_state=0).split(train.images, train.labels)
        for fit, held in folds:
            t0 = time.time()
            model = train_classifier(clf, train.images[fit], train.labels[fit], k, 0, augment=True)
            seconds.append(time.time() - t0)
            oof[held] = model.predict_proba(train.images[held]).argmax(1) == train.labels[held]
        tests = []
        for seed in range(args.seeds):
            t0 = time.time()
            model = train_classifier(clf, train.images, train.labels, k, seed, augment=True)
            seconds.append(time.time() - t0)
            tests.append(float(np.mean(model.predict_proba(test.images).argmax(1) == test.labels)))
        rows.append({"dataset": f"{name} ({train.images.shape[1]} px, {len(train)} labeled)", "judge": judge,
                     "out of fold": f"{100 * oof.mean():.1f}",
                     "test": f"{100 * np.mean(tests):.1f} ± {100 * np.std(tests):.1f}",
                     "s / training": f"{np.mean(seconds):.2f}", "features s": f"{feature_s:.1f}"})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--judges", nargs="+", default=["cnn", "base encoder"], choices=["cnn", "base encoder"])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="outputs/bench-judges")
    args = p.parse_args()
    rows = [r for name in args.datasets for r in measure(name, args)]
    print_table(f"Judges (classic augmentation on; {args.folds} folds, {args.seeds} test seeds)", list(rows[0]),
                [list(r.values()) for r in rows])


if __name__ == "__main__":
    main()
