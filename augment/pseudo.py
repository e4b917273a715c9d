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
from augment.config import PseudoConfig
from augment.data import ImageSet


@dataclass
class PseudoLabels:
    index: np.ndarray  # rows of the pool that got a label
    labels: np.ndarray
    confidence: np.ndarray
    ids: list[str]
    summary: dict

    def __len__(self) -> int:
        return len(self.index)

    def images(self, pool: ImageSet) -> np.ndarray:
        return pool.images[self.index]

    def save(self, folder: Path) -> None:
        from augment.run import write_json

        folder.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"pool_index": self.index, "pool_id": self.ids, "label": self.labels,
                      "confidence": self.confidence}).to_parquet(folder / "labels.parquet")
        write_json(folder / "summary.json", self.summary)

    @classmethod
    def load(cls, folder: Path) -> "PseudoLabels":
        from augment.run import read_json

        df = pd.read_parquet(folder / "labels.parquet")
        return cls(df["pool_index"].to_numpy(np.int64), df["label"].to_numpy(np.int64),
                   df["confidence"].to_numpy(np.float32), df["pool_id"].astype(str).tolist(),
                   read_json(folder / "summary.json", {}))

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
