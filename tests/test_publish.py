import numpy as np
import pandas as pd
import pytest

from augment.config import DataConfig
from augment.data import load_images, split
from augment.publish import publish
from conftest import NO_CANDIDATES_PROVENANCE, no_candidates


def test_publish_roundtrip_and_atomic_replace(tmp_path):
    import datasets

    cfg = DataConfig(shots_per_class=2, test_fraction=0.1, val_fraction=0.05)
    splits = split(load_images(cfg), cfg)
    table = pd.DataFrame({"sample_id": ["syn-0-0", "syn-1-0"], "label": [0, 1], "seed": [11, 12],
                          "strength": [1.0, 0.5], "source_id": ["", splits.train.ids[2]],
                          "guidance_scale": [2.0, 2.0], "num_inference_steps": [5, 5], "scheduler": ["ddim"] * 2,
                          "p_intended": [0.9, 0.8], "nn_similarity": [0.3, 0.4]})
    images = splits.train.images[:2]
    prov = {"base_model": "b", "adapter_hash": "a", "config_hash": "c"}
    out = tmp_path / "ds"
    publish(splits, images, table, out, "t", prov, max_shard_rows=100)
    info = publish(splits, images, table, out, "t", prov, max_shard_rows=100)  # replaces in place
    assert info.splits["train"].to_json() == {"rows": 22, "synthetic": 2, "pseudo_labeled": 0}
    assert not (tmp_path / "ds.tmp").exists() and not (tmp_path / "ds.old").exists()
    assert len(list((out / "data").glob("test-*.parquet"))) > 1  # sharded
    a = datasets.load_from_disk(str(out))
    b = datasets.load_dataset(str(out))
    for d in (a, b):
        syn = d["train"].filter(lambda r: r["is_synthetic"])
        assert syn["seed"] == [11, 12] and syn["source_id"] == ["", splits.train.ids[2]]
        assert np.array_equal(np.asarray(syn[0]["image"]), images[0][..., 0])
        assert d["test"].features["label"].int2str(0) == "0"
    card = (out / "README.md").read_text()
    assert card.startswith("---") and "data/train-" in card and "| train | 22 | 2 | 0 | 20 |" in card


def test_pseudo_labeled_pool_rows_are_published_marked(tmp_path):
    import datasets

    from augment.data import ImageSet

    cfg = DataConfig(shots_per_class=2, test_fraction=0.1, val_fraction=0.05)
    splits = split(load_images(cfg), cfg)
    pool = splits.pool
    pseudo = ImageSet(pool.images[:3], np.array([4, 5, 6]), splits.class_names, pool.ids[:3])
    empty, prov = no_candidates(), NO_CANDIDATES_PROVENANCE
    info = publish(splits, splits.train.images[:0], empty, tmp_path / "ds", "t", prov,
                   pseudo=(pseudo, np.array([0.99, 0.97, 0.995], np.float32)))
    assert info.splits["train"].to_json() == {"rows": 23, "synthetic": 0, "pseudo_labeled": 3}
    train = datasets.load_from_disk(str(tmp_path / "ds"))["train"]
    rows = train.filter(lambda r: r["is_pseudo_labeled"])
    assert rows["label"] == [4, 5, 6] and rows["source_id"] == pool.ids[:3] and not any(rows["is_synthetic"])
    assert np.allclose(rows["pseudo_confidence"], [0.99, 0.97, 0.995])
    assert rows["sample_id"][0] == f"pseudo:{pool.ids[0]}"
    assert "| train | 23 | 0 | 3 | 20 |" in (tmp_path / "ds" / "README.md").read_text()


def test_load_dataset_never_returns_a_stale_cached_copy(tmp_path):
    """Two publishes with different rows to folders of the same name must not share datasets' cache."""
    import datasets

    cfg = DataConfig(shots_per_class=2, test_fraction=0.1, val_fraction=0.05)
    splits = split(load_images(cfg), cfg)
    empty, prov = no_candidates(), NO_CANDIDATES_PROVENANCE
    publish(splits, splits.train.images[:0], empty, tmp_path / "a" / "dataset", "t", prov)
    smaller = split(load_images(cfg), cfg.model_copy(update={"shots_per_class": 1}))
    publish(smaller, smaller.train.images[:0], empty, tmp_path / "b" / "dataset", "t", prov)
    assert len(datasets.load_dataset(str(tmp_path / "a" / "dataset"))["train"]) == 20
    assert len(datasets.load_dataset(str(tmp_path / "b" / "dataset"))["train"]) == 10


def test_a_torch_dataloader_reads_the_whole_train_split_and_seeds_stay_exact(tmp_path):
    """The README's recipe: DataLoader over with_format("torch"), real and synthetic rows mixed in one batch."""
    import datasets
    import torch

    cfg = DataConfig(shots_per_class=2, test_fraction=0.1, val_fraction=0.05)
    splits = split(load_images(cfg), cfg)
    seeds = [2968811710, 2**62 + 12345]  # beyond float32 (and float64) precision
    table = pd.DataFrame({"sample_id": ["syn-0-0", "syn-1-0"], "label": [0, 1], "seed": seeds,
                          "strength": [1.0, 0.5], "source_id": ["", splits.train.ids[2]],
                          "guidance_scale": [2.0, 2.0], "num_inference_steps": [5, 5], "scheduler": ["ddim"] * 2,
                          "p_intended": [0.9, 0.8], "nn_similarity": [0.3, 0.4]})
    publish(splits, splits.train.images[:2], table, tmp_path / "ds", "t",
            {"base_model": "b", "adapter_hash": "a", "config_hash": "c"})
    train = datasets.load_from_disk(str(tmp_path / "ds"))["train"]
    loader = torch.utils.data.DataLoader(train.with_format("torch"), batch_size=len(train))
    (batch,) = list(loader)
    assert batch["image"].dtype == torch.uint8 and batch["label"].shape == (22,)
    assert batch["seed"].dtype == torch.int64 and batch["seed"][-2:].tolist() == seeds
    assert (batch["seed"][:20] == -1).all() and torch.isnan(batch["strength"][:20]).all()


@pytest.mark.parametrize("val_fraction", [0.0, 0.05], ids=["default-shape-no-validation", "every-split"])
def test_every_published_split_loads_with_both_loaders_a_dataloader_and_pandas(tmp_path, val_fraction):
    """The default job holds out no validation images (val_fraction: 0): an empty split is left out, and every
    split that is published loads with load_from_disk, load_dataset, a torch DataLoader and to_pandas."""
    import datasets
    import torch

    from augment.data import ImageSet

    cfg = DataConfig(shots_per_class=2, test_fraction=0.1, val_fraction=val_fraction)
    splits = split(load_images(cfg), cfg)
    table = pd.DataFrame({"sample_id": ["syn-0-0"], "label": [0], "seed": [7], "strength": [1.0],
                          "source_id": [""], "guidance_scale": [2.0], "num_inference_steps": [5],
                          "scheduler": ["ddim"], "p_intended": [0.9], "nn_similarity": [0.3]})
    pool = splits.pool
    pseudo = (ImageSet(pool.images[:2], np.array([1, 2]), splits.class_names, pool.ids[:2]),
              np.array([0.9, 0.8], np.float32))
    out = tmp_path / "dataset"
    info = publish(splits, splits.train.images[:1], table, out, "t", NO_CANDIDATES_PROVENANCE, pseudo=pseudo)
    expected = {"train": 23, "test": len(splits.test), **({"validation": len(splits.validation)}
                                                          if val_fraction else {})}
    assert {s: v.rows for s, v in info.splits.items()} == expected
    card = (out / "README.md").read_text()
    assert ("data/validation-" in card) == bool(val_fraction)
    assert ("(here: `validation`)" in card) == (not val_fraction)
    for loaded in (datasets.load_from_disk(str(out)), datasets.load_dataset(str(out))):
        assert {s: len(d) for s, d in loaded.items()} == expected
        for name, d in loaded.items():
            frame = d.to_pandas()
            assert len(frame) == expected[name] and frame["label"].between(0, 9).all()
            (batch,) = list(torch.utils.data.DataLoader(d.with_format("torch"), batch_size=len(d)))
            assert batch["image"].shape[0] == expected[name] and batch["label"].dtype == torch.int64
