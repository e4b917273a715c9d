import numpy as np
import pandas as pd
import pytest

from augment.config import ClassifierConfig, DataConfig, FilterConfig
from augment.data import load_images, split
from augment.filters import Scored, decide, nearest, score_candidates
from augment.registry import FILTERS
from conftest import scores_summary
from augment.generate import Candidates


def _meta(labels):
    return pd.DataFrame({"sample_id": [f"s{i}" for i in range(len(labels))], "label": labels})


def _scored(labels, p_intended, predicted=None, confidence=None, thresholds=None, nn=None, features=None):
    n = len(labels)
    t = pd.DataFrame({"label": labels, "p_intended": p_intended,
                      "predicted": labels if predicted is None else predicted,
                      "confidence": p_intended if confidence is None else confidence,
                      "alia_threshold": [0.99] * n if thresholds is None else thresholds,
                      "nn_similarity": [0.0] * n if nn is None else nn})
    feats = np.eye(n, 4 + n)[:, :] if features is None else features
    return Scored(t, feats, scores_summary([0.5, 0.5, 0.5]))


def test_registry_has_every_configurable_filter():
    assert set(FILTERS) == {"class_consistency", "alia", "memorization", "near_duplicates", "quota"}


def test_class_consistency_and_chance_level():
    s = _scored([0, 1, 2], [0.9, 0.4, 0.3])
    kept, reason = decide(s, FilterConfig(order=["class_consistency"], min_confidence=0.5))
    assert kept.tolist() == [True, False, False] and reason[1] == "low_confidence"
    kept, _ = decide(s, FilterConfig(order=["class_consistency"], min_confidence="1/K"))
    assert kept.tolist() == [True, True, False]  # 1/K = 0.333


def test_alia_two_sided():
    # sample 0: confident and right -> too easy; 1: confident and wrong -> mislabeled; 2: under threshold -> kept
    s = _scored([0, 1, 2], [0.95, 0.02, 0.6], predicted=[0, 2, 2], confidence=[0.95, 0.9, 0.6],
                thresholds=[0.8, 0.8, 0.8])
    kept, reason = decide(s, FilterConfig(order=["alia"], alia_reject=["too_easy", "mislabeled"]))
    assert reason.tolist() == ["too_easy", "mislabeled", ""]
    kept, reason = decide(s, FilterConfig(order=["alia"], alia_reject=["mislabeled"]))
    assert kept.tolist() == [True, False, True]


def test_duplicates_collapse_to_the_best_scored_one():
    f = np.array([[1, 0, 0], [1, 0, 0], [0.999, 0.01, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    s = _scored([0, 0, 0, 0, 1], [0.7, 0.9, 0.8, 0.6, 0.9], features=f)
    kept, reason = decide(s, FilterConfig(order=["near_duplicates"], duplicate_similarity=0.99))
    assert kept.tolist() == [False, True, False, True, True]
    assert reason[0] == reason[2] == "duplicate"


def test_quota_keeps_the_best_and_balances():
    s = _scored([0, 0, 0, 1, 1, 2, 2, 2], [0.5, 0.9, 0.7, 0.8, 0.6, 0.9, 0.95, 0.4])
    kept, _ = decide(s, FilterConfig(order=["quota"], balance_classes=True))
    assert kept.tolist() == [False, True, True, True, True, True, True, False]
    kept, reason = decide(s, FilterConfig(order=["quota"], balance_classes=False, max_per_class=1))
    assert kept.tolist() == [False, True, False, True, False, False, True, False]
    assert set(reason[~kept]) == {"over_quota"}


def test_order_matters_and_first_reason_is_recorded():
    s = _scored([0, 0], [0.2, 0.9], nn=[0.999, 0.5])
    kept, reason = decide(s, FilterConfig(order=["class_consistency", "memorization"], max_similarity=0.99))
    assert reason.tolist() == ["low_confidence", ""]
    kept, reason = decide(s, FilterConfig(order=["memorization", "class_consistency"], max_similarity=0.99))
    assert reason.tolist() == ["memorized", ""]


def test_nearest_excludes_self():
    x = np.array([[1, 0], [0.9, 0.1], [0, 1]], np.float32)
    sim, idx = nearest(x, x, exclude_self=True)
    assert idx.tolist() == [1, 0, 1]


@pytest.fixture(scope="module")
def digits():
    cfg = DataConfig(shots_per_class=10, val_fraction=0.1)
    return split(load_images(cfg), cfg)


def test_real_judge_rejects_a_copy_and_a_confidently_wrong_sample(digits):
    train = digits.train
    a = int(np.flatnonzero(train.labels == 3)[0])
    b = int(np.flatnonzero(train.labels == 0)[0])
    images = np.stack([train.images[a], train.images[b], digits.validation.images[0]])
    labels = [3, 6, digits.validation.labels[0]]  # copy of a train image; a clear 0 labeled 6; a fresh image
    cands = Candidates(images, _meta(labels))
    cfg = FilterConfig(quality_classifier=ClassifierConfig(width=16, steps=300), alia_folds=3,
                       order=["class_consistency", "alia", "memorization"], min_confidence=0.0,
                       alia_reject=["mislabeled"], max_similarity=0.99)
    scored, judge = score_candidates(cfg, cands, train, digits.validation, log=lambda m: None)
    assert scored.table["nn_similarity_pixels"][0] == pytest.approx(1.0, abs=1e-5)
    assert scored.summary.quality_classifier.validation_accuracy > 0.5
    kept, reason = decide(scored, cfg)
    assert reason[0] == "memorized"
    assert reason[1] == "mislabeled"
    assert scored.table["predicted"][1] == 0
