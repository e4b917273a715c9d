"""The registries (augment.registry) and the conformance suite of each: every registered part, present and future,
must pass its registry's tests here (as every diffusers scheduler passes SchedulerCommonTest)."""

import inspect
import typing

import numpy as np
import pandas as pd
import pytest
import torch

from augment import config as C
from augment.registry import (BACKEND_DETECTORS, BACKENDS, CLASSIFIERS, DATA_SOURCES, FALLBACK_BACKEND,
                              FEEDBACK_CRITERIA, FILTERS, SAMPLERS, Registry)
from conftest import scores_summary, write_imagefolder

REGISTRIES = {"backends": BACKENDS, "backend detectors": BACKEND_DETECTORS, "data sources": DATA_SOURCES,
              "classifiers": CLASSIFIERS, "samplers": SAMPLERS, "feedback criteria": FEEDBACK_CRITERIA,
              "filters": FILTERS}


# The registry itself ---------------------------------------------------------------------------------------------


def test_a_registry_checks_names_and_targets_and_explains_unknown_names():
    r = Registry("widget", {"a": "math:sqrt"})
    with pytest.raises(ValueError, match="widget 'a' is registered already"):
        r.add("a", "math:floor")
    for bad in ("Upper", "with space", "", "-dash-first"):
        with pytest.raises(ValueError, match="widget name"):
            r.add(bad, "math:floor")
    with pytest.raises(ValueError, match="not 'module:attribute'"):
        r.add("b", "math.floor")
    with pytest.raises(ValueError, match="unknown widget 'c'; known: a"):
        r.load("c")
    assert r.load("a")(9.0) == 3.0 and list(r) == ["a"] and "a" in r and len(r) == 1


@pytest.mark.parametrize("kind", list(REGISTRIES))
def test_every_registered_part_imports(kind):
    for name in REGISTRIES[kind]:
        assert callable(REGISTRIES[kind].load(name)), name


def _choices(model, field: str) -> set:
    annotation = model.model_fields[field].annotation
    while typing.get_origin(annotation) is list:
        (annotation,) = typing.get_args(annotation)
    return set(typing.get_args(annotation))


def test_the_configs_choices_are_the_registries_names():
    """Config validation offers exactly what is registered (plus `auto` where the config detects it)."""
    assert _choices(C.BaseModelConfig, "kind") == {"auto", *BACKENDS}
    assert _choices(C.DataConfig, "kind") == {"auto", *DATA_SOURCES}
    assert _choices(C.ClassifierConfig, "kind") == set(CLASSIFIERS)
    assert _choices(C.GenerationConfig, "scheduler") == set(SAMPLERS)
    assert _choices(C.GenerationConfig, "feedback_criterion") == set(FEEDBACK_CRITERIA)
    assert _choices(C.FilterConfig, "order") == set(FILTERS)


# Backends ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BACKENDS))
def test_every_backend_has_the_protocol(name):
    from augment.backends import Backend

    cls = BACKENDS.load(name)
    assert cls.kind == name
    for method in [m for m in dir(Backend) if not m.startswith("_") and callable(getattr(Backend, m))]:
        ours, theirs = inspect.signature(getattr(cls, method)), inspect.signature(getattr(Backend, method))
        assert list(ours.parameters) == list(theirs.parameters), (name, method)
    assert list(inspect.signature(cls).parameters) == ["cfg", "class_names", "image_size", "channels", "device"]


# What each backend's checkpoints look like: a model_index.json it must claim, or None for the fallback's.
CHECKPOINTS = {"stable_diffusion": {"_class_name": "StableDiffusionPipeline",
                                    "unet": ["diffusers", "UNet2DConditionModel"]},
               "sdxl": {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]},
               "flux": {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]},
               "sd3": {"_class_name": "StableDiffusion3Pipeline",
                       "transformer": ["diffusers", "SD3Transformer2DModel"]},
               "pixel": None}


def test_every_detector_belongs_to_a_backend_and_the_fallback_is_one():
    assert set(BACKEND_DETECTORS) <= set(BACKENDS) and FALLBACK_BACKEND in BACKENDS
    assert FALLBACK_BACKEND not in BACKEND_DETECTORS  # it takes what no detector claims
    assert set(CHECKPOINTS) == set(BACKENDS), "add the new backend's checkpoint shape to CHECKPOINTS"


@pytest.mark.parametrize("name", list(BACKEND_DETECTORS))
def test_every_detector_claims_its_own_checkpoints_only(name, tmp_path):
    """Torch-free; True for its backend's model_index.json, False for none (builtin, UNet-only) and for every other
    backend's; and `auto` picks it from a checkpoint folder."""
    import json
    import subprocess
    import sys

    from augment.backends import detect_kind

    detects = BACKEND_DETECTORS.load(name)
    assert detects(CHECKPOINTS[name], "some/checkpoint") is True
    for other, index in CHECKPOINTS.items():
        if other != name:
            assert detects(index, "some/checkpoint") is False, other
    assert detects({}, "some/checkpoint") is False
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(CHECKPOINTS[name]))
    assert detect_kind(C.BaseModelConfig(pretrained=str(folder))) == name
    module = BACKEND_DETECTORS.target(name).partition(":")[0]
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, f"{module} imports torch"


def test_auto_falls_back_when_no_detector_claims_the_checkpoint(tmp_path):
    from augment.backends import detect_kind
    from augment.errors import ModelError

    assert detect_kind(C.BaseModelConfig()) == FALLBACK_BACKEND  # the builtin base
    unet = tmp_path / "unet-only"
    unet.mkdir()
    (unet / "config.json").write_text("{}")
    assert detect_kind(C.BaseModelConfig(pretrained=str(unet))) == FALLBACK_BACKEND
    (unet / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="model_index.json: not a diffusers model_index.json"):
        detect_kind(C.BaseModelConfig(pretrained=str(unet)))


# Data sources --------------------------------------------------------------------------------------------------


def _source(kind: str, root) -> str:
    """A small dataset of 3 classes x 4 images in the form `kind` reads."""
    if kind == "sklearn-digits":
        return "sklearn-digits"
    folder = write_imagefolder(root / "images", per_class=4)
    if kind == "imagefolder":
        return str(folder)
    files = sorted(p.relative_to(folder) for p in folder.rglob("*.png"))
    if kind == "manifest":
        pd.DataFrame({"path": [str(p) for p in files], "label": [p.parent.name for p in files]}).to_csv(
            folder / "labels.csv", index=False)
        return str(folder / "labels.csv")
    if kind == "hf":
        import datasets
        from PIL import Image

        names = sorted({p.parent.name for p in files})
        ds = datasets.Dataset.from_dict(
            {"image": [Image.open(folder / p) for p in files], "label": [names.index(p.parent.name) for p in files]},
            features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}))
        ds.save_to_disk(str(root / "hf"))
        return str(root / "hf")
    raise AssertionError(f"no conformance data for data source {kind!r}: add it to _source")


@pytest.mark.parametrize("kind", list(DATA_SOURCES))
def test_every_data_source_loads_labeled_uint8_images_with_unique_ids(kind, tmp_path):
    from augment.data import detect_kind, load_images

    source = _source(kind, tmp_path)
    cfg = C.DataConfig(source=source, image_size=8, channels=1)
    assert detect_kind(cfg) == kind  # `auto` finds it
    data = load_images(cfg.model_copy(update={"kind": kind}))
    assert data.images.dtype == np.uint8 and data.images.shape[1:] == (8, 8, 1)
    assert len(data.labels) == len(data.images) == len(data.ids) == len(set(data.ids))
    assert len(data.class_names) >= 2 and set(np.unique(data.labels)) == set(range(len(data.class_names)))


# Classifiers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CLASSIFIERS))
def test_every_classifier_trains_reproducibly_and_predicts_probabilities(kind, tmp_path):
    from augment.classifier import train_classifier
    from augment.encoders import write_tiny_backbone

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 6)
    images = (rng.integers(0, 60, (18, 8, 8, 1)) + 60 * labels[:, None, None, None]).astype(np.uint8)
    synthetic = (images[::2].copy(), labels[::2].copy())
    backbone = {"backbone": str(write_tiny_backbone(tmp_path / "backbone"))} if kind == "encoder" else {}
    cfg = C.ClassifierConfig(kind=kind, steps=20, width=8, **backbone)
    cfg._cache_dir = str(tmp_path)  # what RunConfig hands down: its base.cache_dir
    a = train_classifier(cfg, images, labels, 4, seed=3, synthetic=synthetic)  # K = 4: one class has no images
    b = train_classifier(cfg, images, labels, 4, seed=3, synthetic=synthetic)
    p = a.predict_proba(images)
    assert p.shape == (18, 4) and np.allclose(p.sum(1), 1, atol=1e-5) and (p >= 0).all()
    assert np.allclose(p, b.predict_proba(images), atol=1e-6)
    assert a.features(images).shape[0] == 18
    assert (p.argmax(1) == labels).mean() > 0.5  # three brightness bands: any working classifier separates them


# Samplers ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=4).eval()
    return unet, DDPMScheduler(num_train_timesteps=100)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_samples_each_seed_alike_alone_or_in_a_batch(name, tiny_unet):
    from augment.diffusion import classifier_free, make_sampler, sample

    unet, schedule = tiny_unet
    sampler = make_sampler(schedule, name)
    assert sampler.config.num_train_timesteps == 100  # on the model's own noise schedule
    denoise = lambda x, t, y: unet(x, t, class_labels=y).sample  # noqa: E731

    def draw(labels, seeds, strength=1.0, init=None):
        return sample(denoise, schedule, torch.tensor(labels), seeds, 3, (1, 8, 8), scheduler=name,
                      num_inference_steps=4, guide=classifier_free(2.0), strength=strength, init=init)

    batch = draw([0, 1, 2], [5, 6, 7])
    assert batch.shape == (3, 1, 8, 8) and torch.isfinite(batch).all()
    assert torch.allclose(draw([1], [6])[0], batch[1], atol=1e-4)
    assert torch.equal(draw([0, 1, 2], [5, 6, 7]), batch)
    img2img = draw([0, 1, 2], [5, 6, 7], strength=0.5, init=torch.zeros(3, 1, 8, 8))
    assert img2img.shape == batch.shape and torch.isfinite(img2img).all()


# Feedback criteria ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FEEDBACK_CRITERIA))
def test_every_feedback_criterion_is_per_sample_and_guidance_climbs_it(name):
    from diffusers import DDPMScheduler

    from augment.classifier import SmallCNN
    from augment.diffusion import classifier_free, feedback_guided

    value_of = FEEDBACK_CRITERIA.load(name)
    torch.manual_seed(0)
    clf = SmallCNN(1, 3, 8).eval()
    for p in clf.parameters():
        p.requires_grad_(False)
    clf.head.weight *= 30  # confident, as a trained classifier is: a random one is at maximal entropy already
    alphas = DDPMScheduler(num_train_timesteps=100).alphas_cumprod
    x, eps0 = torch.randn(6, 1, 8, 8), 0.5 * torch.randn(6, 1, 8, 8)
    labels, a = torch.tensor([0, 1, 2, 0, 1, 2]), alphas[40]

    def value(eps):
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return value_of(torch.log_softmax(clf(x0.clamp(-1, 1)), 1), labels)

    with torch.no_grad():
        before = value(eps0)
    assert before.shape == (6,) and torch.isfinite(before).all()
    plain = classifier_free(1.0)
    assert feedback_guided(plain, clf, 0.0, name, alphas) is plain
    eps = feedback_guided(plain, clf, 0.05, name, alphas)(lambda x_t, t, y: eps0, x, torch.tensor(40), labels, 3)
    with torch.no_grad():
        assert (value(eps) > before).all()


# Filters -------------------------------------------------------------------------------------------------------


def _scored(n=40, seed=0):
    from augment.filters import Scored

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    labels[1] = labels[0]  # rows 0 and 1: a duplicate pair of one class
    p = rng.random(n)
    pred = np.where(rng.random(n) < 0.8, labels, (labels + 1) % 3)
    table = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "label": labels, "p_intended": p,
                          "predicted": pred, "confidence": np.maximum(p, rng.random(n)),
                          "alia_threshold": np.full(n, 0.7), "nn_similarity": rng.random(n)})
    features = rng.normal(size=(n, 5)).astype(np.float32)
    features[1] = features[0]
    return Scored(table, features, scores_summary([0.7, 0.7, 0.7]))


@pytest.mark.parametrize("name", list(FILTERS))
def test_every_filter_rejects_only_alive_rows_and_says_why(name):
    s = _scored()
    cfg = C.FilterConfig(min_confidence=0.3, max_similarity=0.8, duplicate_similarity=0.99, max_per_class=5)
    fn = FILTERS.load(name)
    everything = np.ones(len(s.table), bool)
    reject, reason = fn(s, everything, cfg)
    assert reject.dtype == bool and reject.shape == everything.shape and len(reason) == len(reject)
    assert reject.any(), f"{name} rejected nothing from a table made to trip every filter"
    assert all((r != "") == bool(x) for r, x in zip(reason, reject))  # a reason exactly where it rejects
    alive = np.arange(len(s.table)) % 2 == 0
    reject2, _ = fn(s, alive, cfg)
    assert not (reject2 & ~alive).any()  # never a row an earlier filter removed
    again, why_again = fn(s, everything, cfg)
    assert np.array_equal(again, reject) and list(why_again) == list(reason)  # deterministic
