import numpy as np
import pandas as pd
import pytest

from augment.config import DataConfig
from augment.data import DataError, ImageSet, Splits, load_images, split
from conftest import write_imagefolder


def test_digits_split_is_stratified_disjoint_and_seeded():
    cfg = DataConfig(shots_per_class=5, test_fraction=0.2, val_fraction=0.1, seed=3)
    data = load_images(cfg)
    assert data.images.shape[1:] == (8, 8, 1) and len(data.class_names) == 10
    s1, s2 = split(data, cfg), split(data, cfg)
    assert s1.train.class_counts() == [5] * 10
    assert s1.train.ids == s2.train.ids and s1.test.ids == s2.test.ids
    ids = [set(getattr(s1, n).ids) for n in ("train", "validation", "test", "pool")]
    assert sum(len(i) for i in ids) == len(data) and len(set().union(*ids)) == len(data)
    assert (s1.pool.labels == -1).all()  # the pool is unlabeled
    assert min(s1.test.class_counts()) >= 30
    s3 = split(data, cfg.model_copy(update={"seed": 4}))
    assert s3.train.ids != s1.train.ids


def test_imagefolder_resizes_and_converts(tmp_path):
    root = write_imagefolder(tmp_path / "imgs", size=12)
    data = load_images(DataConfig(source=str(root), image_size=8, channels=3))
    assert data.class_names == ["cat", "dog", "fox"]
    assert data.images.shape == (24, 8, 8, 3) and data.images.dtype == np.uint8
    grey = load_images(DataConfig(source=str(root), image_size=8, channels=1))
    assert grey.images.shape == (24, 8, 8, 1)


def test_manifest_csv_and_parquet(tmp_path):
    write_imagefolder(tmp_path / "imgs")
    rows = [{"path": f"imgs/{c}/{i}.png", "label": c} for c in ("cat", "dog", "fox") for i in range(8)]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "m.parquet")
    for name in ("m.csv", "m.parquet"):
        data = load_images(DataConfig(source=str(tmp_path / name), image_size=8))
        assert data.class_names == ["cat", "dog", "fox"] and len(data) == 24


def test_datasets_saved_to_disk(tmp_path):
    import datasets

    from PIL import Image
    imgs = [Image.fromarray(np.full((6, 6), 40 * i, np.uint8)) for i in range(6)]
    ds = datasets.Dataset.from_dict({"img": imgs, "y": [0, 1, 2, 0, 1, 2]}).cast_column(
        "y", datasets.ClassLabel(names=["a", "b", "c"]))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
    data = load_images(DataConfig(source=str(tmp_path / "hf"), image_column="img", label_column="y", image_size=8))
    assert data.class_names == ["a", "b", "c"] and data.labels.tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(DataError, match="no column 'image'"):
        load_images(DataConfig(source=str(tmp_path / "hf"), label_column="y"))


def test_datasets_rows_without_a_label_are_skipped_counted_and_never_read(tmp_path):
    """None or -1 is datasets' "no label" (an unlabeled split): such a row is no class, its image is not read (it
    may have none), and the data summary counts it."""
    import datasets

    from PIL import Image
    imgs = [Image.fromarray(np.full((6, 6), 30 * i, np.uint8)) for i in range(8)] + [None]
    ds = datasets.Dataset.from_dict({"image": imgs, "label": [0, 1, 0, 1, 0, 1, -1, None, None]}).cast_column(
        "label", datasets.ClassLabel(names=["a", "b"]))
    ds.save_to_disk(str(tmp_path / "hf"))
    cfg = DataConfig(source=str(tmp_path / "hf"), image_size=8, shots_per_class=None, test_fraction=0.35)
    data = load_images(cfg)
    assert data.class_names == ["a", "b"] and data.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert data.ids[-1].endswith(":5") and data.skipped == [("row 6", "no label"), ("row 7", "no label"),
                                                           ("row 8", "no label")]
    skipped = split(data, cfg).summary()["skipped"]
    assert skipped["reasons"] == {"no label": 3} and skipped["examples"][0] == "row 6 (no label)"
    assert not [p for p in (tmp_path / "hf").iterdir() if p.name.startswith("cache-")]  # nothing written there


def test_the_same_image_under_two_labels_names_files_of_both(tmp_path):
    """Six copies in one class came first, and the message named only that class's files."""
    import shutil

    root = write_imagefolder(tmp_path / "imgs", per_class=12)
    for i in range(8):
        shutil.copyfile(root / "cat" / "0.png", root / "cat" / f"copy{i}.png")
    shutil.copyfile(root / "cat" / "0.png", root / "dog" / "stolen.png")
    cfg = DataConfig(source=str(root), channels=3, image_size=10)
    with pytest.raises(DataError, match=r"cat/0\.png \(cat\), cat/copy0\.png \(cat\), cat/copy1\.png \(cat\), "
                                        r"dog/stolen\.png \(dog\) and 6 more copies"):
        split(load_images(cfg), cfg)


def test_bad_inputs_name_the_problem(tmp_path):
    root = write_imagefolder(tmp_path / "imgs")
    (root / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        load_images(DataConfig(source=str(root)))
    pd.DataFrame({"path": ["nope.png"], "label": ["a"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(DataError, match=r"row 2: image file not found"):
        load_images(DataConfig(source=str(tmp_path / "m.csv")))
    pd.DataFrame({"file": ["x.png"]}).to_csv(tmp_path / "m2.csv", index=False)
    with pytest.raises(DataError, match="no column 'path'"):
        load_images(DataConfig(source=str(tmp_path / "m2.csv")))
    with pytest.raises(DataError, match="does not exist"):
        load_images(DataConfig(source=str(tmp_path / "missing_dir/")))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        load_images(DataConfig(source=str(tmp_path / "empty")))


def test_too_small_class_is_reported():
    imgs = np.zeros((4, 8, 8, 1), np.uint8)
    data = ImageSet(imgs, np.array([0, 0, 0, 1]), ["a", "b"])
    with pytest.raises(DataError, match="class 'b' has only 1 images"):
        split(data, DataConfig(test_fraction=0.3, val_fraction=0.0))


def test_splits_roundtrip(tmp_path):
    cfg = DataConfig(shots_per_class=3)
    s = split(load_images(cfg), cfg)
    s.save(tmp_path / "s.npz")
    t = Splits.load(tmp_path / "s.npz")
    assert t.class_names == s.class_names and t.test.ids == s.test.ids
    assert np.array_equal(t.train.images, s.train.images)


def test_imagefolder_with_its_own_splits(tmp_path):
    from augment.data import make_splits

    write_imagefolder(tmp_path / "d" / "train", per_class=8)
    write_imagefolder(tmp_path / "d" / "test", per_class=3, seed=1)
    write_imagefolder(tmp_path / "d" / "pool" / "unsorted", classes=("x",), per_class=5, seed=2)
    s = make_splits(DataConfig(source=str(tmp_path / "d"), shots_per_class=2, val_fraction=0.25, image_size=8,
                               channels=3))
    assert s.class_names == ["cat", "dog", "fox"]
    assert len(s.test) == 9 and all(i.startswith("test/") for i in s.test.ids)  # the given test split, untouched
    assert s.train.class_counts() == [2, 2, 2] and s.validation.class_counts() == [2, 2, 2]
    assert len(s.pool) == 3 * 4 + 5 and (s.pool.labels == -1).all()
    write_imagefolder(tmp_path / "e" / "train", per_class=4)
    write_imagefolder(tmp_path / "e" / "test", classes=("cat", "dog"), per_class=2)
    with pytest.raises(DataError, match="class folders must match"):
        make_splits(DataConfig(source=str(tmp_path / "e")))


def test_data_stays_where_it_was_declared(tmp_path):
    """Manifest rows with ../ or absolute paths, and symlinks leaving an image folder, are refused by default."""
    write_imagefolder(tmp_path / "data" / "imgs")
    write_imagefolder(tmp_path / "elsewhere", per_class=1)
    rows = [{"path": f"imgs/{c}/{i}.png", "label": c} for c in ("cat", "dog", "fox") for i in range(8)]
    rows[3]["path"] = "../elsewhere/cat/0.png"
    pd.DataFrame(rows).to_csv(tmp_path / "data" / "m.csv", index=False)
    with pytest.raises(DataError, match=r"row 5: image .* outside"):
        load_images(DataConfig(source=str(tmp_path / "data" / "m.csv")))
    rows[3]["path"] = str((tmp_path / "elsewhere" / "cat" / "0.png").resolve())
    pd.DataFrame(rows).to_csv(tmp_path / "data" / "m.csv", index=False)
    with pytest.raises(DataError, match="outside"):
        load_images(DataConfig(source=str(tmp_path / "data" / "m.csv")))
    assert len(load_images(DataConfig(source=str(tmp_path / "data" / "m.csv"), allow_outside_paths=True))) == 24
    (tmp_path / "data" / "imgs" / "cat" / "link.png").symlink_to(tmp_path / "elsewhere" / "dog" / "0.png")
    with pytest.raises(DataError, match="link.png resolves to .* outside"):
        load_images(DataConfig(source=str(tmp_path / "data" / "imgs")))


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    for c, value in (("dark", 1000), ("bright", 60000)):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.fromarray(np.full((8, 8), value, np.uint16)).save(tmp_path / c / f"{i}.png")
    data = load_images(DataConfig(source=str(tmp_path)))
    assert Image.open(tmp_path / "dark" / "0.png").mode.startswith("I")
    by_class = {data.class_names[k]: int(data.images[data.labels == k].mean()) for k in range(2)}
    assert by_class == {"dark": round(1000 * 255 / 65535), "bright": round(60000 * 255 / 65535)}


def test_duplicate_images_never_straddle_splits_and_conflicting_labels_are_refused(tmp_path):
    import shutil

    from augment.config import DataConfig
    from augment.data import DataError, load_images, split
    from conftest import write_imagefolder

    root = write_imagefolder(tmp_path / "imgs", per_class=12)
    for i in range(1, 6):  # five extra copies of cat/0.png under other names
        shutil.copyfile(root / "cat" / "0.png", root / "cat" / f"copy{i}.png")
    cfg = DataConfig(source=str(root), channels=3, image_size=10, shots_per_class=None, test_fraction=0.3,
                     val_fraction=0.1)
    s = split(load_images(cfg), cfg)
    copies = {"cat/0.png"} | {f"cat/copy{i}.png" for i in range(1, 6)}
    homes = {name for name, part in (("train", s.train), ("validation", s.validation), ("test", s.test),
                                     ("pool", s.pool)) if copies & {i.split(":", 1)[-1] for i in part.ids}}
    assert len(homes) == 1, homes
    shutil.copyfile(root / "cat" / "1.png", root / "dog" / "stolen.png")
    with pytest.raises(DataError, match="same image has different labels"):
        split(load_images(cfg), cfg)


def test_copies_across_your_own_train_and_test_folders_are_reported_or_dropped(tmp_path):
    import shutil

    from augment.data import make_splits

    root = tmp_path / "sp"
    write_imagefolder(root / "train", per_class=12, seed=1)
    write_imagefolder(root / "test", per_class=4, seed=2)
    shutil.copyfile(root / "test" / "dog" / "2.png", root / "train" / "dog" / "leak.png")  # a test image in train
    cfg = DataConfig(source=str(root), channels=3, image_size=10, shots_per_class=None, val_fraction=0.1)
    s = make_splits(cfg)
    assert [(d["id"], d["copy_of"]) for d in s.duplicates] == [("train/dog/leak.png", "test: test/dog/2.png")]
    assert s.summary()["duplicates_across_splits"]["count"] == 1
    in_train = [i for part in (s.train, s.validation, s.pool) for i in part.ids]
    assert "train/dog/leak.png" in in_train  # report only: left where it was
    dropped = make_splits(cfg.model_copy(update={"cross_split_duplicates": "drop"}))
    assert "train/dog/leak.png" not in [i for p in (dropped.train, dropped.validation, dropped.pool) for i in p.ids]
    assert len(dropped.test) == len(s.test) == 12


def test_the_report_warns_of_copies_between_your_train_and_test_folders(tiny_cfg, tmp_path):
    import shutil

    from augment import pipeline

    root = tmp_path / "sp"
    write_imagefolder(root / "train", per_class=14, seed=1)
    write_imagefolder(root / "test", per_class=4, seed=2)
    shutil.copyfile(root / "test" / "fox" / "1.png", root / "train" / "fox" / "leak.png")
    cfg = tiny_cfg.model_copy(update={"data": tiny_cfg.data.model_copy(update={"source": str(root), "channels": 3})})
    metrics = pipeline.run(cfg, log=lambda *a: None)
    assert metrics.data.duplicates_across_splits.count == 1
    md = (tmp_path / "run" / "report.md").read_text()
    assert "1 image(s) in a less protected split are identical to one in test" in md and "train/fox/leak.png" in md


def test_center_crop_keeps_the_middle_square_and_stretch_squashes_the_whole(tmp_path):
    """data.resize: a 40x20 photo, red at its left and right quarters and blue between, becomes blue alone under
    center_crop (the middle 20x20) and keeps red at its edges under stretch (the default)."""
    from PIL import Image

    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :10] = wide[:, 30:] = (255, 0, 0)
    wide[:, 10:30] = (0, 0, 255)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(wide).save(tmp_path / c / f"{i}.png")
    crop = load_images(DataConfig(source=str(tmp_path), image_size=10, channels=3, resize="center_crop"))
    stretch = load_images(DataConfig(source=str(tmp_path), image_size=10, channels=3))
    assert crop.images.shape == stretch.images.shape == (6, 10, 10, 3)
    assert crop.images[..., 0].max() < 30 and crop.images[..., 2].min() > 225  # blue only
    assert stretch.images[:, :, 0, 0].min() > 225 and stretch.images[:, :, -1, 0].min() > 225  # red edges kept
