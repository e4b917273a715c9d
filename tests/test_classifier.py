import numpy as np
import pytest
import torch

from augment.classifier import classic_augment, train_classifier
from augment.config import ClassifierConfig, DataConfig
from augment.data import load_images, split


@pytest.fixture(scope="module")
def digits():
    cfg = DataConfig(shots_per_class=10)
    return split(load_images(cfg), cfg)


@pytest.mark.parametrize("kind", ["logistic", "svm"])
def test_sklearn_downstream_models_mix_synthetic_and_augment(digits, kind):
    tr, va = digits.train, digits.validation
    syn = (va.images[:30], va.labels[:30])  # stand-in "synthetic" rows
    clf = train_classifier(ClassifierConfig(kind=kind), tr.images, tr.labels, 10, 0, augment=True, synthetic=syn)
    p = clf.predict_proba(va.images[30:])
    assert p.shape == (len(va) - 30, 10) and np.allclose(p.sum(1), 1)
    assert (p.argmax(1) == va.labels[30:]).mean() > 0.7
    only_syn = train_classifier(ClassifierConfig(kind=kind), tr.images[:0], tr.labels[:0], 10, 0,
                                synthetic=(va.images[:20], va.labels[:20]), synthetic_prob=1.0)
    assert only_syn.predict_proba(va.images).shape == (len(va), 10)


def test_cnn_is_seeded(digits):
    tr = digits.train
    cfg = ClassifierConfig(width=8, steps=20)
    a = train_classifier(cfg, tr.images, tr.labels, 10, 3).predict_proba(tr.images[:5])
    b = train_classifier(cfg, tr.images, tr.labels, 10, 3).predict_proba(tr.images[:5])
    assert np.array_equal(a, b)


def test_classic_augment_keeps_shape_and_black_background():
    x = -torch.ones(4, 1, 8, 8)
    out = classic_augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.allclose(out, x, atol=1e-5)
