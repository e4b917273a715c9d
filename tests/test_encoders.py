"""Pretrained image encoders as classifiers (augment/encoders.py): tiny random CLIP vision and DINOv2 models in the
transformers layout, written here, as the backbone of every classifier section of configs/tiny.yaml; their features
computed once per image and cached; a second run computes none."""

import json

import numpy as np
import pytest

from conftest import ROOT

SECTIONS = ("pseudo.classifier", "selection.model", "filter.quality_classifier", "evaluation.model")


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    from augment.encoders import write_tiny_backbone

    root = tmp_path_factory.mktemp("backbones")
    return {kind: write_tiny_backbone(root / kind, kind) for kind in ("clip", "dinov2")}


def _shards(cache):
    return sorted(p.relative_to(cache) for p in (cache / "features").rglob("*.npz"))


def _clf(backbone, cache, **kw):
    from augment.config import RunConfig

    cfg = RunConfig.model_validate({"base": {"cache_dir": str(cache)}, "device": "cpu", "evaluation": {"model": {
        "kind": "encoder", "backbone": str(backbone), "steps": 40, "batch_size": 16, **kw}}})
    return cfg.evaluation.model


def _digits(n=60, seed=0):
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.random.default_rng(seed).permutation(len(d.target))[:n]
    images = (d.images[idx] / 16 * 255).astype(np.uint8)[..., None]
    return images, d.target[idx] % 3


@pytest.mark.parametrize("kind", ["clip", "dinov2"])
def test_a_linear_probe_reads_cached_features_and_computes_each_image_once(kind, backbones, tmp_path, monkeypatch):
    from augment import encoders
    from augment.classifier import train_classifier

    images, labels = _digits()
    cfg = _clf(backbones[kind], tmp_path / "cache")
    clf = train_classifier(cfg, images, labels, 3, seed=0, augment=True)
    p = clf.predict_proba(images)
    assert p.shape == (60, 3) and np.allclose(p.sum(1), 1, atol=1e-5)
    first = _shards(tmp_path / "cache")
    assert len(first) == 1 + cfg.augment_views  # the images and each jittered view, one shard each
    # 1. Computed once: another training (another seed, a subset, the same images) loads no backbone.
    def computed(*args):
        raise RuntimeError("features computed twice")

    monkeypatch.setattr(encoders, "load_backbone", computed)
    encoders._LOADED.clear()
    again = train_classifier(cfg, images[:40], labels[:40], 3, seed=1, augment=True)
    assert _shards(tmp_path / "cache") == first
    assert again.features(images[:5]).shape == (5, 32)
    # 2. The same seed gives the same probe; another image is computed.
    assert np.allclose(train_classifier(cfg, images, labels, 3, seed=0, augment=True).predict_proba(images), p)
    with pytest.raises(RuntimeError, match="features computed twice"):
        clf.predict_proba(np.full((1, 8, 8, 1), 7, np.uint8))


def test_a_backbone_change_is_a_new_cache_key_and_a_bad_backbone_is_one_line(backbones, tmp_path):
    from augment.encoders import backbone_key, write_tiny_backbone
    from augment.errors import ModelError

    other = write_tiny_backbone(tmp_path / "other", "clip", seed=1)
    assert backbone_key(other) != backbone_key(backbones["clip"])
    from augment.classifier import train_classifier

    images, labels = _digits(12)
    with pytest.raises(ModelError, match="not a local folder, and the Hub could not provide it"):
        train_classifier(_clf("nobody/no-such-encoder", tmp_path), images, labels, 3, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="cannot load it as a transformers vision model"):
        train_classifier(_clf(tmp_path / "empty", tmp_path), images, labels, 3, seed=0)


def test_a_lora_head_tunes_the_backbone_and_mixes_synthetic_rows(backbones, tmp_path):
    from augment.classifier import train_classifier

    images, labels = _digits()
    cfg = _clf(backbones["dinov2"], tmp_path / "cache", head="lora", steps=8, lora_rank=2)
    clf = train_classifier(cfg, images[:40], labels[:40], 3, seed=0, augment=True,
                           synthetic=(images[40:], labels[40:]), synthetic_prob=0.5)
    assert clf.predict_proba(images).shape == (60, 3)
    assert not (tmp_path / "cache" / "features").exists()  # tuned features change: nothing cached
    tuned = {n for n, _ in clf.model["backbone"].named_parameters() if "lora_" in n}
    assert tuned


def test_the_config_asks_for_a_backbone_and_hands_down_the_run_device(tmp_path):
    from augment.config import ConfigError, RunConfig
    from augment.configfile import parse_config

    with pytest.raises(ConfigError, match="kind encoder needs `backbone`"):
        parse_config({"filter": {"quality_classifier": {"kind": "encoder"}}})
    with pytest.raises(ConfigError, match="`backbone` is for kind encoder"):
        parse_config({"filter": {"quality_classifier": {"backbone": "x"}}})
    cfg = RunConfig.model_validate({"device": "cuda:1", "base": {"cache_dir": str(tmp_path)}})
    models = [getattr(getattr(cfg, s.split(".")[0]), s.split(".")[1]) for s in SECTIONS]
    assert {m.device for m in models} == {"cuda:1"} and {m.cache_dir for m in models} == {str(tmp_path)}
    # What a worker process receives (a pickle) and a config saved and read back keep them
    import pickle

    from augment.configfile import saved_config

    assert pickle.loads(pickle.dumps(cfg.evaluation.model)).cache_dir == str(tmp_path)
    again = parse_config(saved_config(cfg.model_dump(mode="json")))
    assert again.filter.quality_classifier.device == "cuda:1" and again.pseudo.classifier.cache_dir == str(tmp_path)
    # A copy that changes the device hands it down; the section it shared with the original is left as it was
    copy = cfg.model_copy(update={"device": "cpu"})
    assert copy.evaluation.model.device == "cpu" and cfg.evaluation.model.device == "cuda:1"
    other = RunConfig(evaluation=cfg.evaluation, device="cpu")
    assert other.evaluation.model.device == "cpu" and cfg.evaluation.model.device == "cuda:1"
    # Encoder keys belong to encoders, and each head to its own
    with pytest.raises(ConfigError, match="`head` is for kind encoder, not cnn"):
        parse_config({"evaluation": {"model": {"head": "lora"}}})
    with pytest.raises(ConfigError, match="`augment_views` is for head linear, not lora"):
        parse_config({"evaluation": {"model": {"kind": "encoder", "backbone": "b", "head": "lora",
                                                "augment_views": 2}}})
    with pytest.raises(ConfigError, match="not a device: auto, cpu, cuda, cuda:N"):
        parse_config({"device": "gpu"})


@pytest.mark.parametrize("kind, workers", [("clip", 1), ("dinov2", 2)])
def test_an_encoder_judges_labels_and_measures_in_every_section_of_the_tiny_run(kind, workers, backbones, tmp_path,
                                                                            prefect_harness):
    """The README's command on configs/tiny.yaml with the encoder in all four classifier sections (its trainings
    in this process, or on two worker processes); a second run into another folder, with the same cache, computes
    no feature."""
    from flows.cli import main

    sets = [f"{s}={{kind: encoder, backbone: {backbones[kind]}, steps: 30, batch_size: 16}}" for s in SECTIONS]
    sets += ["filter.memorization_space=features", f"runner.local_workers={workers}"]

    def run(name):
        args = ["run", str(ROOT / "configs" / "tiny.yaml"), "--set", f"publish.output_dir={tmp_path / name}",
                "--set", f"base.cache_dir={tmp_path / 'cache'}"]
        for s in sets:
            args += ["--set", s]
        assert main(args) == 0
        return json.loads((tmp_path / name / "metrics.json").read_text())

    metrics = run("first")
    shards = _shards(tmp_path / "cache")
    assert shards
    assert metrics["run"]["classifiers"] == {s: {"kind": "encoder", "backbone": str(backbones[kind]),
                                                  "head": "linear"} for s in SECTIONS}
    assert "encoder with a linear head" in (tmp_path / "first" / "report.md").read_text()
    second = run("second")
    assert _shards(tmp_path / "cache") == shards  # every feature came from the cache
    assert second["evaluation"]["arms"].keys() == metrics["evaluation"]["arms"].keys()


def test_a_full_clip_checkpoint_serves_through_its_vision_tower(tmp_path):
    """A CLIPModel folder (text and vision, as openai/clip-vit-base-patch16 ships) loads as its vision tower: the
    features are CLIPModel.vision_model's pooled output, weights and all."""
    import torch
    import transformers

    from augment.encoders import load_backbone

    torch.manual_seed(0)
    shape = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    full = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(shape, vocab_size=99, max_position_embeddings=16, bos_token_id=0, eos_token_id=1),
        vision_config=dict(shape, image_size=16, patch_size=4), projection_dim=16)).eval()
    full.save_pretrained(tmp_path / "clip")
    processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    processor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(tmp_path / "clip")
    model, _, model_type = load_backbone(tmp_path / "clip", torch.device("cpu"))
    assert type(model).__name__ == "CLIPVisionModel" and model_type == "clip"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(pixel_values=x).pooler_output, full.vision_model(pixel_values=x).pooler_output,
                              atol=1e-6)
