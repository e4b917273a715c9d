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
One runs after the filter (the choose stage), on images set aside before the generator learned:
3. the synthetic data: whether the product takes the kept samples, and at which mixing probability. Folds over
   the labeled images cannot judge it: the generator learned from every labeled image, so its samples carry what
   the held-out images look like. On digits without a pool, fold classifiers with synthetic data gained +3.0
   points on their held-out images and -0.2 on test, even with every sample closer to a held-out image than its
   nearest real training image removed. So a stratified share of the labeled images (selection.synthetic_holdout) is
   kept from everything the generator learns from, and the choice is scored on those images only: classifiers
   trained on the other labeled images (and the recipe's pool), with and without the samples, several seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from augment.config import ClassifierConfig
from augment.parallel import worker_state
from augment.results import Choice


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
           confidence: float = 0.8, where: str = "out of fold") -> Decision:
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
                        f"{simplest} scores best {where}")
    diff = paired_interval(scores[best].p_true, scores[simplest].p_true, n_boot, seed, confidence)
    decided = diff["ci_low"] > 0
    reason = (f"{best} beats {simplest} {where}, interval above 0" if decided else
              f"{best} scores higher {where} but the interval holds 0: the data cannot decide, so the simpler "
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
    # kept samples (images, labels), by adaptation (lora.adaptations) when several are compared
    synthetic: tuple[np.ndarray, np.ndarray] | dict[str, tuple[np.ndarray, np.ndarray]] | None = None


def generator_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Rows of the labeled set that the generator never sees, for the synthetic choice to be scored on: per class,
    round(fraction x its count), leaving the generator at least one image of every class. Sorted."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 1])
    rows = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        rows.append(idx[:min(int(round(fraction * len(idx))), len(idx) - 1)])
    return np.sort(np.concatenate(rows)).astype(np.int64) if rows else np.zeros(0, np.int64)


def _fit_predict(d: Labeled, unit: tuple):
    """One unit. ("labeler", fold): the fold's pseudo-labeler -> its class probabilities on the pool and on the
    held-out rows. ("model", fold, augment, pool_rows, pool_labels[, synthetic_prob[, adaptation]]): the downstream
    classifier on the fold's rows plus those pool rows with those labels (and, with synthetic_prob, the synthetic
    samples, that adaptation's when they are by adaptation, mixed in at that probability), seeded by the model seed
    plus the fold's repeat -> its class probabilities on the held-out rows."""
    from augment.classifier import train_classifier

    kind, i = unit[0], unit[1]
    f = d.folds[i]
    x, y = d.images[f.train], d.labels[f.train]
    if kind == "labeler":
        clf = train_classifier(d.labeler, x, y, d.num_classes, d.labeler_seed)
        return clf.predict_proba(d.pool).astype(np.float32), clf.predict_proba(d.images[f.held])
    _, _, augment, rows, labels, *prob = unit
    if len(rows):
        x, y = np.concatenate([x, d.pool[rows]]), np.concatenate([y, labels])
    synthetic, p = (d.synthetic, prob[0]) if prob else (None, 0.5)
    if len(prob) > 1:  # (synthetic_prob, adaptation)
        synthetic = d.synthetic[prob[1]]
    clf = train_classifier(d.model, x, y, d.num_classes, d.model_seed + f.repeat, augment=augment,
                           synthetic=synthetic, synthetic_prob=p)
    return clf.predict_proba(d.images[f.held])


_SHARED: dict = worker_state()  # per process: the labeled images every fold training reads


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
        from augment.encoders import warm  # an encoder's features once, here, before the units

        synthetic = d.synthetic.values() if isinstance(d.synthetic, dict) else [d.synthetic] if d.synthetic else []
        warm(d.labeler, [d.images, d.pool], [d.images] if d.labeler.augment else [])
        warm(d.model, [d.images, d.pool, *(s[0] for s in synthetic)])

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


# The synthetic choice (the choose stage) ----------------------------------------------------------------------

MIN_HOLDOUT = 10  # fewer held-out images than this never decide for the synthetic data (lfw at K=10 holds out 4)


def option_name(recipe: str, prob: float, adaptation: str | None = None) -> str:
    from augment.arms import arm_plus

    return f"{arm_plus(recipe, 'synthetic')} at p={prob:g}" + (f" ({adaptation})" if adaptation else "")


def choose_synthetic(sel, probs: Sequence[float], recipe: str, images: np.ndarray, labels: np.ndarray,
                     num_classes: int, holdout: np.ndarray, pool: tuple[np.ndarray, np.ndarray] | None,
                     synthetic: tuple[np.ndarray, np.ndarray] | dict[str, tuple[np.ndarray, np.ndarray]],
                     workers: int = 0, log=print, progress: Callable[[int, int], None] | None = None) -> Choice:
    """Whether the product takes the kept synthetic samples, and at which mixing probability: on the `holdout`
    rows of the labeled set (which the generator never saw), classifiers trained on the other labeled rows with
    the recipe (`recipe`: classic augmentation or not; `pool`, its pseudo-labeled pool images and labels, or
    None), alone and plus the samples at each of `probs`, `sel.synthetic_seeds` seeds each (paired). `synthetic`:
    the kept samples, or by adaptation (lora.adaptations, a dict in the listed order) when several compete: then
    every adaptation at every probability is an option. Returns the Decision's fields plus `synthetic_prob` (the
    best probability: what the synthetic arms use, taken or not), with several adaptations `adaptation` (the best
    one's, likewise), and `in_product`."""
    from augment.arms import has_part

    by_adaptation = synthetic if isinstance(synthetic, dict) else None
    holdout = np.asarray(holdout, np.int64)
    seen = np.setdiff1d(np.arange(len(labels)), holdout)
    folds = [Fold(r, 0, seen, holdout) for r in range(sel.synthetic_seeds)]
    pool_images, pool_labels = pool if pool is not None else (images[:0], labels[:0])
    d = Labeled(images, labels, num_classes, pool_images, folds, sel.model, sel.model, sel.seed, sel.seed,
                synthetic)
    rows = np.arange(len(pool_images))
    classic = has_part(recipe, "classic")
    extras = [(float(p),) for p in probs] if by_adaptation is None else \
        [(float(p), a) for a in by_adaptation for p in probs]
    units = [("model", i, classic, rows, pool_labels, *extra) for extra in ((), *extras) for i in range(len(folds))]
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress:
            progress(done[0], len(units))

    with Workers(d, workers, tick) as run:
        out = run.map(units)
    y, R = labels[holdout], len(folds)

    def scores(probas) -> OOF:
        probas = np.asarray(probas)  # (seeds, holdout images, classes)
        return OOF(probas[:, np.arange(len(y)), y], (probas.argmax(2) == y).astype(float))

    options = {recipe: scores(out[:R])}
    names = {}
    for j, extra in enumerate(extras, start=1):
        name = option_name(recipe, *extra)
        names[name] = extra
        options[name] = scores(out[j * R:(j + 1) * R])
    choice = decide("synthetic", options, 1, sel.bootstrap, sel.seed, sel.confidence,
                    where="on the images the generator never saw")
    if choice.decided and len(holdout) < MIN_HOLDOUT:  # a bootstrap over a handful of images proves nothing
        choice.chosen, choice.decided = recipe, False
        choice.reason = (f"{choice.best} scores higher, but {len(holdout)} images are too few to decide (at least "
                         f"{MIN_HOLDOUT}): the simpler {recipe}")
    # the synthetic arms' probability (and adaptation): the best one's, whether the product takes the samples or not
    best = names[max(names, key=lambda o: choice.oof_score[o])]
    best_p = best[0]
    result = {**choice.to_json(), "rule": "cross_validation", "synthetic_prob": best_p,
              "in_product": choice.chosen != recipe, "samples": int(len(synthetic[1])) if by_adaptation is None
              else int(sum(len(v[1]) for v in by_adaptation.values())),
              "generator_images": int(len(seen)), "holdout": int(len(holdout))}
    if by_adaptation is not None:
        result["adaptation"] = best[1]
        result["samples_by_adaptation"] = {a: int(len(v[1])) for a, v in by_adaptation.items()}
    outcome = f"in the product at p={best_p:g}" if result["in_product"] else "left out of the product"
    if by_adaptation is not None:
        outcome += f", {best[1]} the best adaptation"
    log(f"choose: synthetic data {outcome} (on {len(holdout)} labeled images the generator never saw, {R} seeds: "
        + ", ".join(f"{o} {100 * choice.oof_accuracy[o]:.1f}% (p {100 * choice.oof_score[o]:.1f})"
                    for o in choice.options) + f"; {choice.reason})")
    return Choice.model_validate(result)
