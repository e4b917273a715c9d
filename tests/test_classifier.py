import numpy as np
import pytest
import torch

from augment.classifier import classic_augment, train_classifier
from augment.config import ClassifierConfig, DataConfig
from augment.data import load_images, split


@pytest.fixture(scope="module")
def digits():
    cfg = DataConfig(shots_per_class=10, val_fraction=0.1)
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


def test_classifier_image_size_resizes_training_and_prediction_inputs():
    from augment.classifier import resize

    rng = np.random.default_rng(0)
    big = rng.integers(0, 255, (12, 16, 16, 3), dtype=np.uint8)
    small = resize(big, 8)
    assert small.shape == (12, 8, 8, 3) and small.dtype == np.uint8
    assert abs(int(small[0, 0, 0, 0]) - big[0, :2, :2, 0].mean()) <= 0.5  # area average
    assert resize(big, None) is big
    labels = np.arange(12) % 3
    clf = train_classifier(ClassifierConfig(width=4, steps=3, batch_size=4, image_size=8), big, labels, 3, seed=0)
    assert clf.image_size == 8 and clf.model.body[0].in_channels == 3
    assert clf.predict_proba(big).shape == (12, 3) and clf.features(big).shape[0] == 12
    lin = train_classifier(ClassifierConfig(kind="logistic", image_size=4, augment=False), big, labels, 3, seed=0)
    assert lin.predict_proba(big).shape == (12, 3) and lin.features(big).shape == (12, 4 * 4 * 3)


def test_bf16_is_native_only_with_avx512_bf16_or_amx(monkeypatch):
    """oneDNN says bf16 is supported on any AVX-512 CPU (it emulates it): that must not turn on bf16 autocast."""
    from augment.diffusion import tensors

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    for flags, native in (({"avx2", "avx512f", "avx512bw"}, False), ({"avx2"}, False),
                          ({"avx512f", "avx512_bf16"}, True), ({"avx512f", "amx_bf16", "amx_tile"}, True)):
        monkeypatch.setattr(tensors, "_cpu", lambda f=flags: ("test CPU", frozenset(f)))
        assert tensors.bf16_native() is native, flags
        assert tensors.resolve_precision(torch.device("cpu"), "auto") == ("bf16" if native else "no")
        assert ("no native bf16" in tensors.cpu_kind()) is not native
