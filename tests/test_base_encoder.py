"""The run's own base as an encoder (`kind: encoder, backbone: base`, augment/base_encoder.py): the candidate features
chosen out of fold, configs/rgb32.yaml at tiny size with the base judging in every classifier section, its
features computed once, a changed base a new key, and what is refused."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

SECTIONS = ("pseudo.classifier", "selection.model", "filter.quality_classifier", "evaluation.model")


def test_the_choice_finds_the_candidate_that_separates_the_classes_and_is_the_same_for_the_same_rows():
    from augment import base_encoder

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 12)
    spans = [(0, 8), (8, 16), (16, 24)]
    feats = rng.normal(size=(36, 24))
    means = rng.normal(size=(3, 8)) * 1.5
    for informative in range(3):
        x = feats.copy()
        a, b = spans[informative]
        x[:, a:b] += means[labels]
        base_encoder._CHOSEN.clear()
        assert base_encoder.choose(x, labels, spans, 3) == informative
    # unbalanced classes: still the informative candidate (the intercept is fitted, not folded into the labels)
    keep = np.r_[np.arange(12), np.arange(12, 36, 3)]
    base_encoder._CHOSEN.clear()
    assert base_encoder.choose(x[keep], labels[keep], spans, 3) == 2


@pytest.mark.parametrize("subfolder", [True, False])
def test_the_features_are_the_layouts_candidates_each_image_its_own_noise(tmp_path, subfolder):
    """A base's features: as wide as its layout says (a UNet in unet/ as the builtin base is saved, or a bare
    UNet2DModel folder), the same for the same image wherever it sits in a batch, finite."""
    import torch

    from augment import base_encoder
    from augment.backends.pixel_unet import build_scheduler, build_unet
    from augment.config import BaseModelConfig, ClassifierConfig

    bcfg = BaseModelConfig(block_out_channels=[8, 16], attention_levels=[False, True], norm_num_groups=4)
    torch.manual_seed(0)
    folder = tmp_path / "base"
    build_unet(bcfg, 16, 3, num_class_embeds=1).save_pretrained(folder / "unet" if subfolder else folder)
    build_scheduler(bcfg).save_pretrained(folder / "scheduler")
    clf = ClassifierConfig(kind="encoder", backbone="base")
    clf._base, clf._device = {"path": str(folder), "description": "tiny", "fingerprint": "f"}, "cpu"
    base_encoder._LOADED.clear()
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    hashes = [f"{i:020x}" for i in range(5)]
    feats = base_encoder.compute(clf, images, hashes, torch.device("cpu"), batch_size=2)
    spans = base_encoder.layout(clf)
    assert len(spans) == len(base_encoder.FRACTIONS) * 3  # the middle block and two decoder blocks
    assert feats.shape == (5, spans[-1][1]) and np.isfinite(feats).all()
    again = base_encoder.compute(clf, images[[3, 1]], [hashes[3], hashes[1]], torch.device("cpu"))
    assert np.allclose(again, feats[[3, 1]], atol=1e-5)
    # the columns are where the layout says: the middle block's output at the first noise level, the last decoder
    # block's at the last, caught by hooks of their own
    unet, _ = base_encoder._unet(clf._base, 3, 16, torch.device("cpu"))
    seen = {"mid": [], "last": []}
    hooks = [unet.mid_block.register_forward_hook(lambda m, i, o: seen["mid"].append(o)),
             unet.up_blocks[-1].register_forward_hook(lambda m, i, o: seen["last"].append(o))]
    base_encoder.compute(clf, images[:1], hashes[:1], torch.device("cpu"))
    for h in hooks:
        h.remove()
    pooled = [torch.nn.functional.adaptive_avg_pool2d(o, base_encoder.GRID).flatten(1).numpy()
              for o in (seen["mid"][0], seen["last"][-1])]
    assert np.allclose(feats[:1, slice(*spans[0])], pooled[0], atol=1e-5)
    assert np.allclose(feats[:1, slice(*spans[-1])], pooled[1], atol=1e-5)


def _colour_digits(root, classes=3, per_class=30, seed=0):
    """32 px RGB class folders from scikit-learn's digits (upscaled, painted in random colours)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(d.images[d.target == k][:per_class]):
            ink = np.kron(img / 16.0, np.ones((4, 4)))[..., None]
            fg, bg = rng.random(3), rng.random(3) * 0.3
            Image.fromarray((255 * (ink * fg + (1 - ink) * bg)).round().astype(np.uint8)).save(root / f"c{k}" / f"{i}.png")
    return root


TINY = ["base.block_out_channels=[8, 16]", "base.attention_levels=[false, true]", "base.norm_num_groups=4",
        "base.pretrain_steps=20", "base.pretrain_batch_size=16", "lora.rank=2", "lora.lora_alpha=2",
        "lora.max_train_steps=10", "lora.train_batch_size=8", "generation.num_per_class=6",
        "generation.num_inference_steps=2", "pseudo.per_class=[5, 10]", "selection.folds=2",
        "selection.bootstrap=200", "filter.alia_folds=2", "evaluation.seeds=2", "data.shots_per_class=10",
        "data.max_pool_size=60",
        "filter.memorization_space=features"]


def test_the_rgb32_config_runs_at_tiny_size_with_the_base_judging_everywhere(tmp_path, prefect_harness):
    """The README's 32 px RGB example (configs/rgb32.yaml) at tiny size: every classifier section reads the base's
    features, computed once per image; a second run into another folder computes none; another base changes the
    keys of the stages that judge with it, and only theirs."""
    from flows.cli import main

    source = _colour_digits(tmp_path / "images")

    def run(name, *extra):
        args = ["run", str(ROOT / "configs" / "rgb32.yaml"), "--set", f"data.source={source}",
                "--set", f"publish.output_dir={tmp_path / name}", "--set", f"base.cache_dir={tmp_path / 'cache'}"]
        for s in [*TINY, *(f"{s}.steps=30" for s in SECTIONS), *extra]:
            args += ["--set", s]
        assert main(args) == 0
        return json.loads((tmp_path / name / "metrics.json").read_text())

    def shards():
        return sorted(p.relative_to(tmp_path) for p in (tmp_path / "cache" / "features").rglob("*.npz"))

    metrics = run("first")
    assert metrics["run"]["classifiers"] == {s: {"kind": "encoder", "backbone": "base", "head": "linear"}
                                             for s in SECTIONS}
    report = (tmp_path / "first" / "report.md").read_text()
    assert "linear head on the base model's own denoising features" in report
    assert "| selection.model | encoder on the run's own base (linear head) |" in report
    first = shards()
    keys = {p.parts[2] for p in first}
    assert len(keys) == 1 and next(iter(keys)).startswith("base-")
    assert {p.parts[3] for p in first} >= {"image-cpu-no", "jitter-1-cpu-no"}
    arms = metrics["evaluation"]["arms"]
    assert all(0 <= arms[a]["accuracy"]["mean"] <= 1 for a in ("real", "real+classic", "real+synthetic"))
    second = run("second")
    assert shards() == first  # every feature came from the cache
    assert second["evaluation"]["arms"].keys() == arms.keys()
    # another base: the stages that judge with its features have other keys (the pseudo stage reads the splits
    # alone: only the base its classifiers read is upstream of it); a job whose classifiers are CNNs keeps its keys
    from augment.configfile import load_config
    from augment.runfolder import RunFolder, read_json, write_json
    from augment.stages.core import StageRun

    sets = [f"data.source={source}", f"base.cache_dir={tmp_path / 'cache'}", f"publish.output_dir={tmp_path / 'first'}",
            *TINY]
    cfg = load_config(ROOT / "configs" / "rgb32.yaml", [*sets, *(f"{s}.steps=30" for s in SECTIONS)])
    cnn = load_config(ROOT / "configs" / "rgb32.yaml", [*sets, *(f"{s}={{steps: 30}}" for s in SECTIONS)])
    assert StageRun(cfg, "pseudo").key == read_json(RunFolder(tmp_path / "first").stage("pseudo").stage)["key"]
    before = StageRun(cfg, "pseudo").key, StageRun(cnn, "pseudo").key, StageRun(cnn, "filter").key
    info = read_json(RunFolder(tmp_path / "first").info)
    info["stages"]["base"]["key"] = "another-base"
    write_json(RunFolder(tmp_path / "first").info, info)
    assert StageRun(cfg, "pseudo").key != before[0]
    assert (StageRun(cnn, "pseudo").key, StageRun(cnn, "filter").key) == before[1:]


def test_what_the_base_as_an_encoder_refuses(tmp_path, monkeypatch):
    from augment import backends
    from augment.config import ConfigError
    from augment.configfile import parse_config
    from augment.configfile import load_config
    from augment.errors import ModelError
    from augment.pipeline import preflight

    with pytest.raises(ConfigError, match="backbone base takes head linear"):
        parse_config({"evaluation": {"model": {"kind": "encoder", "backbone": "base", "head": "lora"}}})
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"publish.output_dir={tmp_path / 'run'}",
                                                       f"base.cache_dir={tmp_path / 'cache'}",
                                                       "filter.quality_classifier.kind=encoder",
                                                       "filter.quality_classifier.backbone=base",
                                                       "filter.quality_classifier.image_size=16"])
    with pytest.raises(ConfigError, match=r"filter.quality_classifier.image_size=16: backbone base reads images at "
                                          r"the base's size, data.image_size=8"):
        preflight(cfg)
    with pytest.raises(ConfigError, match="backbone base computes its features in fp32"):
        parse_config({"pseudo": {"classifier": {"kind": "encoder", "backbone": "base", "mixed_precision": "bf16"}}})
    cfg = cfg.model_copy(update={"filter": cfg.filter.model_copy(update={
        "quality_classifier": cfg.filter.quality_classifier.model_copy(update={"image_size": None})})})
    monkeypatch.setattr(backends, "check_base", lambda base: "sdxl")
    with pytest.raises(ConfigError, match=r"filter.quality_classifier.backbone=base reads the builtin base "
                                          r"\(base.pretrained: builtin.*; the sdxl backend's base is not one"):
        preflight(cfg)
    monkeypatch.setattr(backends, "check_base", lambda base: "pixel")
    unet = cfg.model_copy(update={"base": cfg.base.model_copy(update={"pretrained": str(tmp_path)})})
    with pytest.raises(ConfigError, match=f"base.pretrained={tmp_path} is not one"):
        preflight(unet)
    # a classifier that reads the base before any stage handed it one says so
    from augment.classifier import train_classifier

    clf = cfg.filter.quality_classifier
    with pytest.raises(ModelError, match="the run's base model is not known here"):
        train_classifier(clf, np.zeros((4, 8, 8, 1), np.uint8), np.array([0, 1, 0, 1]), 2, seed=0)
