"""Pseudo-labels for the unlabeled pool (the cheap alternative to synthetic data, and food for the generator).

A classifier trained on the labeled train split only labels every pool image. Which labels to trust is decided on
the validation split, never on test: the threshold is the lowest candidate confidence at which the classifier's
confident validation predictions are at least `min_precision` accurate (with at least `min_support` of them).
The pool images above it become pseudo-labeled training images: for the `+pseudo` evaluation arms (Geng et al.
2024: retrieved real images are the baseline synthetic data must beat) and for semi-supervised fine-tuning of the
generator (DPT, You et al. 2023).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from augment.classifier import train_classifier
from augment.config import PseudoConfig, SelectionConfig
from augment.data import ImageSet
from augment import results
from augment.results import PseudoSummary, Selection


@dataclass
class PseudoLabels:
    index: np.ndarray  # rows of the pool that got a label
    labels: np.ndarray
    confidence: np.ndarray
    ids: list[str]
    summary: PseudoSummary  # a dict is read as one

    def __post_init__(self) -> None:
        if isinstance(self.summary, dict):
            self.summary = results.parse(PseudoSummary, self.summary, "pseudo-labels' summary")

    def __len__(self) -> int:
        return len(self.index)

    def save(self, folder: Path) -> None:
        from augment.runfolder import PseudoFolder

        out = PseudoFolder(folder)
        out.path.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"pool_index": self.index, "pool_id": self.ids, "label": self.labels,
                      "confidence": self.confidence}).to_parquet(out.labels)
        results.save(out.summary, self.summary)

    @classmethod
    def load(cls, folder: Path) -> "PseudoLabels":
        from augment.runfolder import PseudoFolder

        out = PseudoFolder(folder)
        df = pd.read_parquet(out.labels)
        return cls(df["pool_index"].to_numpy(np.int64), df["label"].to_numpy(np.int64),
                   df["confidence"].to_numpy(np.float32), df["pool_id"].astype(str).tolist(),
                   results.load(out.summary, PseudoSummary, PseudoSummary()))

    @classmethod
    def empty(cls, reason: str) -> "PseudoLabels":
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), [],
                   {"threshold": None, "count": 0, "reason": reason})


def choose_threshold(cfg: PseudoConfig, confidence: np.ndarray, correct: np.ndarray) -> tuple[float | None, list]:
    """The lowest threshold whose confident validation predictions meet min_precision; and the whole table."""
    table, chosen = [], None
    for t in sorted(cfg.thresholds):
        above = confidence > t
        n = int(above.sum())
        precision = float(correct[above].mean()) if n else None
        ok = n >= cfg.min_support and precision is not None and precision >= cfg.min_precision
        table.append({"threshold": t, "validation_support": n, "validation_precision": precision,
                      "validation_coverage": n / max(len(confidence), 1), "meets_rule": ok})
        if ok and chosen is None:
            chosen = t
    return chosen, table


def pseudo_label(cfg: PseudoConfig, train: ImageSet, validation: ImageSet, pool: ImageSet,
                 log=print) -> PseudoLabels:
    if not cfg.enabled:
        return PseudoLabels.empty("pseudo.enabled is false")
    if not len(pool):
        return PseudoLabels.empty("no unlabeled pool")
    if not len(validation):
        return PseudoLabels.empty("no validation split to choose a threshold on")
    K = len(train.class_names)
    # 1. The pseudo-labeler sees the labeled train split only.
    clf = train_classifier(cfg.classifier, train.images, train.labels, K, cfg.seed)
    # 2. The threshold is chosen on validation.
    p_val = clf.predict_proba(validation.images)
    threshold, table = choose_threshold(cfg, p_val.max(1), p_val.argmax(1) == validation.labels)
    # 3. Pool images above it get labels.
    p_pool = clf.predict_proba(pool.images)
    conf, pred = p_pool.max(1), p_pool.argmax(1)
    summary = {"threshold": threshold, "thresholds": table, "pool_size": len(pool),
               "validation_accuracy": float((p_val.argmax(1) == validation.labels).mean()),
               "classifier": cfg.classifier.kind, "min_precision": cfg.min_precision}
    if threshold is None:
        log(f"pseudo: no threshold reaches validation precision {cfg.min_precision}; no pseudo-labels")
        return PseudoLabels(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), [],
                            {**summary, "count": 0, "per_class": [0] * K,
                             "reason": f"no threshold reaches validation precision {cfg.min_precision}"})
    index = np.flatnonzero(conf > threshold)
    summary.update(count=int(len(index)), per_class=np.bincount(pred[index], minlength=K).tolist())
    log(f"pseudo: threshold {threshold} (chosen on validation) labels {len(index)} of {len(pool)} pool images")
    return PseudoLabels(index, pred[index].astype(np.int64), conf[index].astype(np.float32),
                        [pool.ids[i] for i in index], summary)


def select_and_label(cfg: PseudoConfig, sel: SelectionConfig, train: ImageSet, pool: ImageSet,
                     recipe: str = "auto", workers: int = 0, log=print,
                     progress=None) -> tuple[PseudoLabels, Selection]:
    """The cross-validated choices (augment.selection) and the pseudo-labels they pick: returns the labels and the
    decisions (the recipe's and, with a pool, the pool's: each a Decision.to_json() and what this adds).

    1. Out of fold, on every labeled image: the downstream classifier with and without classic augmentation (the
       recipe: chosen when `recipe` is `auto`, else as set, with both scores reported), and, per fold, a
       pseudo-labeler trained without the held-out images labels the pool.
    2. With the recipe: the downstream classifier on the fold's images plus each candidate number of pseudo-labeled
       pool images per class (`pseudo.per_class`; each class's most confident, by that fold's labeler), scored on
       the held-out images. The amount is the best of them (ties: the smaller); whether the recipe takes the pool
       at all is a choice like the recipe's.
    3. The final pseudo-labeler, trained on every labeled image, labels the pool; each class's most confident
       images up to the chosen amount are kept."""
    from augment.selection import Labeled, Workers, class_balanced, decide, out_of_fold, stratified_folds

    K = len(train.class_names)
    folds = stratified_folds(train.labels, sel.folds, sel.repeats, sel.seed)
    n_folds, F = len(folds) // sel.repeats, len(folds)
    use_pool = cfg.enabled and len(pool) > 0
    d = Labeled(train.images, train.labels, K, pool.images if use_pool else train.images[:0], folds, sel.model,
                cfg.classifier, sel.seed, cfg.seed)
    amounts = sorted(set(cfg.per_class)) if use_pool else []
    total = F * (2 + use_pool + len(amounts)) + use_pool
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress:
            progress(done[0], total)

    def oof(probas):
        return out_of_fold(folds, len(train), probas, train.labels)

    none = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    with Workers(d, workers, tick) as run:
        # 1. The recipe, and each fold's pseudo-labeler (independent: one batch).
        units = [("model", i, aug, *none) for aug in (False, True) for i in range(F)]
        out = run.map(units + ([("labeler", i) for i in range(F)] if use_pool else []))
        scores = {"real": oof(out[:F]), "real+classic": oof(out[F:2 * F])}
        choice = decide("recipe", scores, n_folds, sel.bootstrap, sel.seed, sel.confidence)
        if recipe != "auto":  # the team's recipe is set: reported beside the scores, not chosen
            chosen = "real+classic" if recipe == "classic" else "real"
            choice.chosen, choice.reason = chosen, f"set by evaluation.recipe={recipe}"
        decisions = {"recipe": {**choice.to_json(), "rule": "cross_validation" if recipe == "auto" else recipe}}
        log(f"select: recipe {choice.chosen} (out of fold: " +
            ", ".join(f"{a} {100 * v:.1f}% (true-class p {100 * choice.oof_score[a]:.1f})"
                      for a, v in choice.oof_accuracy.items()) + f"; {choice.reason})")
        if not use_pool:
            why = "pseudo.enabled is false" if not cfg.enabled else "no unlabeled pool"
            return PseudoLabels.empty(why), Selection.model_validate(decisions)
        labelers = out[2 * F:]
        labeler_oof = oof([held for _, held in labelers]).correct.mean(0)
        # 2. How many pool images per class, with the recipe.
        units = []
        for m in amounts:
            for i, (proba, _) in enumerate(labelers):
                rows = class_balanced(proba, m)
                units.append(("model", i, choice.chosen == "real+classic", rows, proba[rows].argmax(1)))
        out = run.map(units)
    with_pool = {m: oof(out[j * F:(j + 1) * F]) for j, m in enumerate(amounts)}
    best_m = max(amounts, key=lambda m: (float(np.mean(with_pool[m].p_true)), -m))
    amount = decide("pseudo", {choice.chosen: scores[choice.chosen], f"{choice.chosen}+pseudo": with_pool[best_m]},
                    n_folds, sel.bootstrap, sel.seed, sel.confidence)
    decisions["pseudo"] = {**amount.to_json(), "rule": "cross_validation", "per_class": best_m,
                           "per_class_oof_accuracy": {str(m): float(np.mean(with_pool[m].correct)) for m in amounts},
                           "per_class_oof_score": {str(m): float(np.mean(with_pool[m].p_true)) for m in amounts}}
    log(f"select: pseudo-labeled pool, {best_m} per class (out of fold: " +
        ", ".join(f"{m}/class {100 * np.mean(with_pool[m].correct):.1f}% (p {100 * np.mean(with_pool[m].p_true):.1f})"
                  for m in amounts) +
        f"); {'in the recipe' if amount.chosen != choice.chosen else 'left out of the recipe'} ({amount.reason})")
    # 3. The final labeler on every labeled image.
    clf = train_classifier(cfg.classifier, train.images, train.labels, K, cfg.seed)
    tick()
    proba = clf.predict_proba(pool.images)
    index = class_balanced(proba, best_m)
    pred, conf = proba.argmax(1), proba.max(1)
    summary = {"rule": "cross_validation", "per_class_amount": best_m, "count": int(len(index)),
               "pool_size": len(pool), "per_class": np.bincount(pred[index], minlength=K).tolist(),
               "classifier": cfg.classifier.kind, "threshold": None,
               "min_confidence": float(conf[index].min()) if len(index) else None,
               "labeled_images": len(train), "folds": n_folds, "repeats": sel.repeats,
               "labeler_oof_accuracy": float(labeler_oof.mean()),
               "labeler_oof_per_class": [float(labeler_oof[train.labels == k].mean()) for k in range(K)]}
    log(f"pseudo: {best_m} per class (chosen out of fold) labels {len(index)} of {len(pool)} pool images")
    return (PseudoLabels(index, pred[index].astype(np.int64), conf[index].astype(np.float32),
                         [pool.ids[i] for i in index], summary), Selection.model_validate(decisions))
