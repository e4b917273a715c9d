"""Choices made on out-of-fold scores of every labeled image (cross-validation), not on a one-per-class split.

At ten shots a held-out validation split is one image per class: a recipe chosen on it is chosen by noise. Here
every labeled image is held out once per repeat (stratified k-fold), a classifier trained on the other folds scores
it, and each option of a choice gets one out-of-fold correctness per image and repeat. A choice compares its best
option with the simplest one, image by image (a paired difference, bootstrapped over images): only when that
interval lies above 0 does the richer option win; otherwise the data cannot decide and the simplest option is
taken, and the report says so, with the number of images the choice rests on. The interval's level
(selection.confidence, 80% by default: 90% one-sided) is below the report's 95%: a choice needs a lean, a claim
about the product needs proof. At 100 images a 95% interval holds 0 even for a +4-point difference (digits:
real 91%, real+classic 95% out of fold, [-1, +9]).

Test never enters: the folds are drawn from the labeled train split only, and nothing here is given test images.

Two choices run before fine-tuning (the pseudo stage), on labeled data only:
1. the recipe: real, or real with classic augmentation;
2. the pseudo-labeled pool: how many pool images per class (class-balanced, most confident first: every class gets
   its share, as FlexMatch's per-class thresholds intend, rather than the easy classes taking all of it), with each
   fold's own pseudo-labeler (trained without the held-out images) labeling the pool for that fold; and whether
   the recipe takes them at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from augment.config import ClassifierConfig


@dataclass(frozen=True)
class Fold:
    repeat: int
    index: int
    train: np.ndarray  # rows of the labeled set the fold's classifier trains on
    held: np.ndarray  # rows it scores


def stratified_folds(labels: np.ndarray, k: int, repeats: int, seed: int) -> list[Fold]:
    """`repeats` seeded stratified k-fold partitions of the labeled rows. k shrinks to the smallest class count (a
    class needs one image in each fold); every class needs at least 2 images."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    k = int(min(k, counts.min()))
    if k < 2:
        raise ValueError("cross-validation needs at least 2 labeled images in every class")
    folds = []
    for r in range(repeats):
        rng = np.random.default_rng([seed, r])
        fold_of = np.empty(len(labels), np.int64)
        offset = 0
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            fold_of[idx] = (np.arange(len(idx)) + offset) % k  # the offset spreads the remainders over the folds
            offset += len(idx)
        for f in range(k):
            folds.append(Fold(r, f, np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)))
    return folds


@dataclass
class OOF:
    """Out-of-fold scores of every labeled image, (repeats, n) each: the probability the fold's classifier gave the
    true class (what choices compare: near 95% accuracy, 0/1 correctness of 100 images barely moves, while the
    true-class probability still separates a confident right answer from a lucky one), and correctness."""

    p_true: np.ndarray
    correct: np.ndarray


def out_of_fold(folds: Sequence[Fold], n: int, probas: Sequence[np.ndarray], labels: np.ndarray) -> OOF:
    """Every labeled image's scores, from each fold's class probabilities on its held-out rows."""
    repeats = max(f.repeat for f in folds) + 1
    p_true, correct = np.full((repeats, n), np.nan), np.full((repeats, n), np.nan)
    for f, proba in zip(folds, probas):
        proba, y = np.asarray(proba), labels[f.held]
        p_true[f.repeat, f.held] = proba[np.arange(len(y)), y]
        correct[f.repeat, f.held] = (proba.argmax(1) == y).astype(float)
    assert not np.isnan(p_true).any(), "every image is held out once per repeat"
    return OOF(p_true, correct)


@dataclass
class Decision:
    """One choice: its options (simplest first), their out-of-fold scores, and what was taken and why."""

    name: str
    options: list[str]
    oof_accuracy: dict[str, float]
    oof_score: dict[str, float]  # mean true-class probability: what decides
    best: str
    chosen: str
    decided: bool  # the best option's advantage over the simplest has an interval above 0
    difference: dict | None  # best - simplest, true-class probability: mean, ci_low, ci_high; None: best is simplest
    images: int
    folds: int
    repeats: int
    reason: str

    def to_json(self) -> dict:
        return asdict(self)


def paired_interval(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int, confidence: float = 0.95) -> dict:
    """Mean of a - b over images (each image's score averaged over repeats) and a bootstrap interval over images at
    `confidence`."""
    d = np.asarray(a, float).mean(0) - np.asarray(b, float).mean(0)
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1)
    lo, hi = np.quantile(boots, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"mean": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi), "confidence": confidence}


def decide(name: str, scores: dict[str, OOF], n_folds: int, n_boot: int = 2000, seed: int = 0,
           confidence: float = 0.8) -> Decision:
    """The best option by out-of-fold true-class probability if its paired advantage over the simplest (the first
    key) has an interval (at `confidence`) above 0, else the simplest. Ties go to the simpler option."""
    options = list(scores)
    acc = {o: float(np.mean(scores[o].correct)) for o in options}
    score = {o: float(np.mean(scores[o].p_true)) for o in options}
    best = options[int(np.argmax([score[o] for o in options]))]  # argmax takes the first, i.e. simplest, of ties
    simplest = options[0]
    repeats, n = np.shape(scores[simplest].p_true)
    if best == simplest:
        return Decision(name, options, acc, score, best, simplest, False, None, n, n_folds, repeats,
                        f"{simplest} scores best out of fold")
    diff = paired_interval(scores[best].p_true, scores[simplest].p_true, n_boot, seed, confidence)
    decided = diff["ci_low"] > 0
    reason = (f"{best} beats {simplest} out of fold, interval above 0" if decided else
              f"{best} scores higher out of fold but the interval holds 0: the data cannot decide, so the simpler "
              f"{simplest}")
    return Decision(name, options, acc, score, best, best if decided else simplest, decided, diff, n, n_folds,
                    repeats, reason)


def class_balanced(proba: np.ndarray, per_class: int) -> np.ndarray:
    """Pool rows to pseudo-label: for each class, its `per_class` most confident predictions (fewer if fewer pool
    images are predicted as it). Returns sorted row indices."""
    pred, conf = proba.argmax(1), proba.max(1)
    rows = []
    for c in range(proba.shape[1]):
        idx = np.flatnonzero(pred == c)
        rows.append(idx[np.argsort(-conf[idx], kind="stable")[:per_class]])
    return np.sort(np.concatenate(rows)) if rows else np.zeros(0, np.int64)


# Running the fold trainings ------------------------------------------------------------------------------------


@dataclass
class Labeled:
    """What the fold trainings read (sent once to each worker process)."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    pool: np.ndarray
    folds: list[Fold]
    model: ClassifierConfig  # the downstream classifier
    labeler: ClassifierConfig  # the pseudo-labeler
    model_seed: int
    labeler_seed: int


def _fit_predict(d: Labeled, unit: tuple):
    """One unit. ("labeler", fold): the fold's pseudo-labeler -> its class probabilities on the pool and on the
    held-out rows. ("model", fold, augment, pool_rows, pool_labels): the downstream classifier on the fold's rows
    plus those pool rows with those labels -> its class probabilities on the held-out rows."""
    from augment.classifier import train_classifier

    kind, i = unit[0], unit[1]
    f = d.folds[i]
    x, y = d.images[f.train], d.labels[f.train]
    if kind == "labeler":
        clf = train_classifier(d.labeler, x, y, d.num_classes, d.labeler_seed)
        return clf.predict_proba(d.pool).astype(np.float32), clf.predict_proba(d.images[f.held])
    _, _, augment, rows, labels = unit
    if len(rows):
        x, y = np.concatenate([x, d.pool[rows]]), np.concatenate([y, labels])
    clf = train_classifier(d.model, x, y, d.num_classes, d.model_seed, augment=augment)
    return clf.predict_proba(d.images[f.held])


_SHARED: dict = {}


def _init(d: Labeled) -> None:
    _SHARED["d"] = d


def _work(unit: tuple):
    return _fit_predict(_SHARED["d"], unit)


class Workers:
    """Runs units on `workers` processes with one torch thread each (1: in this process); results in order, the
    same for any number of workers. The processes start once, on first use, and serve every batch."""

    def __init__(self, d: Labeled, workers: int, progress: Callable[[], None] | None = None):
        from augment.parallel import worker_count

        self.d, self.workers, self.progress, self.pool = d, worker_count(workers), progress, None

    def map(self, units: list[tuple]) -> list:
        if self.workers <= 1:
            from augment.parallel import here

            return here(_fit_predict, [(self.d, u) for u in units], self._tick)
        from augment.parallel import ordered_map, spawn_pool

        if self.pool is None:
            self.pool = spawn_pool(self.workers, _init, (self.d,))
        return ordered_map(self.pool, _work, [(u,) for u in units], self._tick)

    def _tick(self) -> None:
        if self.progress:
            self.progress()

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:  # on an interrupt, queued trainings are dropped instead of run
            self.pool.shutdown(cancel_futures=True)
