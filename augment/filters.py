"""Filtering synthetic candidates: score once, then decide with a configurable chain of filters.

Scoring (`score_candidates`) trains the quality classifier on the real labeled train split only and records,
for every candidate, p(intended class), the predicted class and its confidence, the ALIA threshold of the
predicted class (from out-of-fold predictions on real images), and the similarity to the nearest real training
image in pixel and feature space. Deciding (`decide`) runs the filters in `cfg.order`, each a function of one
signature over the scored table; a candidate's `reason` is the first filter that rejected it. Because deciding is
cheap, the evaluation can ablate filter combinations without rescoring.

Filters:
- class_consistency (He et al., ICLR 2023): keep if p(intended) > tau (tau = 1/K available).
- alia (Dunlap et al. 2023): t_k = mean out-of-fold p_k over real images of class k; a candidate whose top
  probability exceeds t_pred is "too_easy" (pred = intended) or "mislabeled" (pred != intended).
- memorization: cosine similarity to the nearest real training image above `max_similarity`.
- near_duplicates: among surviving candidates of a class, greedily keep the best-scored of any group whose
  pairwise similarity exceeds `duplicate_similarity`.
- quota: at most `max_per_class` per class, or balanced classes; highest p(intended) first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from augment import results
from augment.classifier import TrainedClassifier, train_classifier
from augment.config import ClassifierConfig, FilterConfig
from augment.data import ImageSet
from augment.generate import Candidates
from augment.parallel import run_each, worker_state
from augment.registry import FILTERS
from augment.results import FilterScores, QualityClassifier
from augment.runfolder import FilterFolder


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), int(np.prod(x.shape[1:]))).astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)


def nearest(query: np.ndarray, ref: np.ndarray, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity of each query row to its nearest reference row, and that row's index."""
    q, r = _unit(query), _unit(ref)
    out_s, out_i = np.zeros(len(q), np.float32), np.zeros(len(q), np.int64)
    for i in range(0, len(q), 2048):
        sims = q[i:i + 2048] @ r.T
        if exclude_self:
            np.fill_diagonal(sims[:, i:i + 2048], -np.inf)
        out_i[i:i + 2048] = sims.argmax(1)
        out_s[i:i + 2048] = sims[np.arange(len(sims)), out_i[i:i + 2048]]
    return out_s, out_i


@dataclass
class Scored:
    """Everything the filters decide from."""

    table: pd.DataFrame  # one row per candidate
    features: np.ndarray  # memorization/duplicate space, one row per candidate
    summary: FilterScores


PIXEL_SPACE_MAX = 64  # memorization is judged at <= 64 px: a near-copy at 512 px is one at 64 px too


def _small(images: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Flattened float pixels in [0, 1], block-averaged to at most PIXEL_SPACE_MAX px a side (in chunks, so 512 px
    photos never make a float copy of the whole set)."""
    n, h, w, c = images.shape
    f = max(1, -(-max(h, w) // PIXEL_SPACE_MAX))
    hs, ws = h // f, w // f
    out = np.empty((n, hs * ws * c), np.float32)
    for i in range(0, n, chunk):
        x = images[i:i + chunk, :hs * f, :ws * f].astype(np.float32) / 255.0
        if f > 1:
            x = x.reshape(len(x), hs, f, ws, f, c).mean(axis=(2, 4))
        out[i:i + chunk] = x.reshape(len(x), -1)
    return out


def _pixel_space(images: np.ndarray, mean: np.ndarray) -> np.ndarray:
    # Centered by the train mean image: raw non-negative pixels make every pair of digits look alike.
    return _small(images) - mean


_TRAIN: dict = worker_state()  # per process: the labeled images every training of the judge and ALIA fold reads


def _share(cfg: ClassifierConfig, images: np.ndarray, labels: np.ndarray, K: int) -> None:
    _TRAIN.update(cfg=cfg, images=images, labels=labels, K=K)


def _fit(rows: np.ndarray | None, seed: int) -> TrainedClassifier:
    """One quality-classifier training on the shared images (`rows` of them; None = all)."""
    d = _TRAIN
    x, y = (d["images"], d["labels"]) if rows is None else (d["images"][rows], d["labels"][rows])
    return train_classifier(d["cfg"], x, y, d["K"], seed)


def alia_folds(cfg: FilterConfig, train: ImageSet) -> list[tuple[np.ndarray, np.ndarray]]:
    """The stratified folds of the out-of-fold ALIA estimate; none when some class has a single image."""
    folds = min(cfg.alia_folds, min(train.class_counts()))
    if folds < 2:
        return []
    return list(StratifiedKFold(folds, shuffle=True, random_state=cfg.seed).split(train.labels, train.labels))


def score_candidates(cfg: FilterConfig, cands: Candidates, train: ImageSet, validation: ImageSet,
                     log=print, workers: int = 1) -> tuple[Scored, TrainedClassifier]:
    K = len(train.class_names)
    # 1. The quality judge, trained on real labeled train data only (its validation accuracy is reported), and the
    #    classifiers of the ALIA folds: independent trainings, on `workers` processes.
    from augment.encoders import warm  # an encoder's features once, here, before the trainings

    warm(cfg.quality_classifier, [train.images, validation.images, cands.images],
         [train.images] if cfg.quality_classifier.augment else [])
    folds = alia_folds(cfg, train) if "alia" in cfg.order else []
    calls = [(None, cfg.seed)] + [(tr, cfg.seed + 1 + f) for f, (tr, _) in enumerate(folds)]
    judge, *fold_models = run_each(_fit, calls, workers, _share, (cfg.quality_classifier, train.images,
                                                                  train.labels, K))
    val_acc = float((judge.predict_proba(validation.images).argmax(1) == validation.labels).mean()) \
        if len(validation) else None
    log(f"filter: quality classifier validation accuracy {100 * val_acc:.1f}% on {len(validation)} images"
        if val_acc is not None else "filter: quality classifier trained on every labeled image (no validation split)")
    # 2. ALIA thresholds from out-of-fold predictions (p(class | image) from a classifier that did not see it).
    oof = np.full((len(train), K), np.nan, np.float32)
    for (_, te), clf in zip(folds, fold_models):
        oof[te] = clf.predict_proba(train.images[te])
    thresholds = np.array([oof[train.labels == k, k].mean() for k in range(K)], np.float32)
    # 3. Candidate scores.
    probs = judge.predict_proba(cands.images) if len(cands) else np.zeros((0, K))
    labels = cands.labels
    pred = probs.argmax(1) if len(cands) else np.zeros(0, np.int64)
    conf = probs.max(1) if len(cands) else np.zeros(0)
    mean = _small(train.images).mean(0)
    train_pix, cand_pix = _pixel_space(train.images, mean), _pixel_space(cands.images, mean)
    train_feat, cand_feat = judge.features(train.images), judge.features(cands.images)
    sim_pix, nn_pix = nearest(cand_pix, train_pix) if len(cands) else (np.zeros(0), np.zeros(0, int))
    sim_feat, nn_feat = nearest(cand_feat, train_feat) if len(cands) else (np.zeros(0), np.zeros(0, int))
    space = cfg.memorization_space
    table = cands.meta.copy()
    table["p_intended"] = probs[np.arange(len(labels)), labels] if len(cands) else []
    table["predicted"] = pred
    table["confidence"] = conf
    table["alia_threshold"] = thresholds[pred] if len(cands) else []
    table["nn_similarity_pixels"] = sim_pix
    table["nn_similarity_features"] = sim_feat
    nn = nn_pix if space == "pixels" else nn_feat
    table["nn_train_id"] = [train.ids[i] for i in nn]
    table["nn_similarity"] = sim_pix if space == "pixels" else sim_feat
    # 4. Reference: nearest-neighbour similarity between real training images (leave one out).
    tt_pix, _ = nearest(train_pix, train_pix, exclude_self=True)
    tt_feat, _ = nearest(train_feat, train_feat, exclude_self=True)
    summary = FilterScores(
        quality_classifier=QualityClassifier(kind=cfg.quality_classifier.kind, validation_accuracy=val_acc,
                                             validation_size=len(validation)),
        alia_thresholds=[None if np.isnan(t) else float(t) for t in thresholds],
        alia_oof_accuracy=None if np.isnan(oof).any() else float((oof.argmax(1) == train.labels).mean()),
        train_nn_similarity_pixels=tt_pix.tolist(),
        train_nn_similarity_features=tt_feat.tolist(),
        memorization_space=space,
    )
    return Scored(table, cand_pix if space == "pixels" else cand_feat, summary), judge


# Filters: one signature (augment.registry.FILTERS names them). Given the scored table, the still-alive mask and
# the config, return a reject mask (only over alive rows) and a reason per rejected row.
FilterFn = Callable[[Scored, np.ndarray, FilterConfig], tuple[np.ndarray, np.ndarray]]


def class_consistency(s: Scored, alive: np.ndarray, cfg: FilterConfig):
    K = len(s.summary.alia_thresholds)
    tau = 1.0 / K if cfg.min_confidence == "1/K" else float(cfg.min_confidence)
    reject = alive & (s.table["p_intended"].to_numpy() <= tau)
    return reject, np.where(reject, "low_confidence", "")


def alia(s: Scored, alive: np.ndarray, cfg: FilterConfig):
    t = s.table["alia_threshold"].to_numpy(np.float64)
    over = s.table["confidence"].to_numpy() > np.nan_to_num(t, nan=np.inf)
    same = s.table["predicted"].to_numpy() == s.table["label"].to_numpy()
    reason = np.where(over & same, "too_easy", np.where(over & ~same, "mislabeled", ""))
    reject = alive & np.isin(reason, list(cfg.alia_reject))
    return reject, np.where(reject, reason, "")


def memorization(s: Scored, alive: np.ndarray, cfg: FilterConfig):
    reject = alive & (s.table["nn_similarity"].to_numpy() > cfg.max_similarity)
    return reject, np.where(reject, "memorized", "")


def near_duplicates(s: Scored, alive: np.ndarray, cfg: FilterConfig):
    reject = np.zeros(len(alive), bool)
    score = s.table["p_intended"].to_numpy()
    labels = s.table["label"].to_numpy()
    for k in np.unique(labels[alive]):
        idx = np.flatnonzero(alive & (labels == k))
        idx = idx[np.argsort(-score[idx], kind="stable")]
        f = _unit(s.features[idx])
        kept: list[int] = []
        for j in range(len(idx)):
            if kept and float((f[kept] @ f[j]).max()) > cfg.duplicate_similarity:
                reject[idx[j]] = True
            else:
                kept.append(j)
    return reject, np.where(reject, "duplicate", "")


def quota(s: Scored, alive: np.ndarray, cfg: FilterConfig):
    labels = s.table["label"].to_numpy()
    score = s.table["p_intended"].to_numpy()
    K = len(s.summary.alia_thresholds)
    counts = np.bincount(labels[alive], minlength=K)
    limit = cfg.max_per_class if cfg.max_per_class is not None else int(counts.max(initial=0))
    if cfg.balance_classes and len(counts):
        limit = min(limit, int(counts.min()))
    reject = np.zeros(len(alive), bool)
    for k in range(K):
        idx = np.flatnonzero(alive & (labels == k))
        reject[idx[np.argsort(-score[idx], kind="stable")][limit:]] = True
    return reject, np.where(reject, "over_quota", "")


def decide(s: Scored, cfg: FilterConfig, order: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run the filters in order; returns (kept mask, first rejection reason or '')."""
    alive = np.ones(len(s.table), bool)
    reason = np.full(len(s.table), "", dtype=object)
    for name in cfg.order if order is None else order:
        rejected, why = FILTERS.load(name)(s, alive, cfg)
        reason[rejected] = why[rejected]
        alive &= ~rejected
    return alive, reason


def save_outcome(s: Scored, kept: np.ndarray, reason: np.ndarray, cands: Candidates, folder: Path) -> pd.DataFrame:
    """Write the scores, the summary, the features and the rejected images (PNG, by reason) for inspection."""
    from augment.imagefiles import to_pil

    out = FilterFolder(folder)
    out.path.mkdir(parents=True, exist_ok=True)
    table = s.table.assign(kept=kept, reason=reason.astype(str))
    table.to_parquet(out.scores)
    results.save(out.summary, s.summary)
    np.save(out.features, s.features)
    for i in np.flatnonzero(~kept):
        d = out.rejected(str(reason[i]))
        d.mkdir(parents=True, exist_ok=True)
        img = cands.images[i]
        to_pil(img).save(d / f"{table['sample_id'][i]}.png")
    return table


def load_scored(folder: Path) -> tuple[Scored, pd.DataFrame]:
    out = FilterFolder(folder)
    table = pd.read_parquet(out.scores)
    summary = results.load(out.summary, FilterScores)
    s = Scored(table.drop(columns=["kept", "reason"]), np.load(out.features), summary)
    return s, table
