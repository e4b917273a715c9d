"""Loading, validating and splitting a small labeled image set.

Everything downstream works on `ImageSet`: uint8 arrays (N, H, W, C) normalized to the configured size and
channels, integer labels and class names. Splits are stratified and seeded; the test split never reaches
fine-tuning, filtering or model selection.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

import numpy as np
from PIL import Image

from augment.config import DataConfig
from augment.configfile import read_utf8
from augment.errors import DataError
from augment.imagefiles import HIDDEN, IMAGE_SUFFIXES, entry_name, hidden, image_files, normalize, open_image, walk

@dataclass
class ImageSet:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,); -1 for unlabeled
    class_names: list[str]
    ids: list[str] = field(default_factory=list)  # where each image came from
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (entry, why) in the source that is not an image

    def __post_init__(self) -> None:
        assert self.images.dtype == np.uint8 and self.images.ndim == 4, self.images.shape
        assert len(self.images) == len(self.labels)
        if not self.ids:
            self.ids = [f"#{i}" for i in range(len(self.images))]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "ImageSet":
        index = np.asarray(index, dtype=np.int64)
        return ImageSet(self.images[index], self.labels[index], self.class_names, [self.ids[i] for i in index])

    def class_counts(self) -> list[int]:
        return np.bincount(self.labels[self.labels >= 0], minlength=len(self.class_names)).tolist()


@dataclass
class Splits:
    train: ImageSet
    validation: ImageSet
    test: ImageSet
    pool: ImageSet  # unlabeled: labels are -1
    # images identical to one in a more protected split: {"split", "id", "copy_of"}; see cross_split_duplicates
    duplicates: list[dict] = field(default_factory=list)
    duplicates_action: str = "report"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # see ImageSet.skipped

    @property
    def class_names(self) -> list[str]:
        return self.train.class_names

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for name in ("train", "validation", "test", "pool"):
            s: ImageSet = getattr(self, name)
            arrays[f"{name}_images"], arrays[f"{name}_labels"] = s.images, s.labels
            arrays[f"{name}_ids"] = np.array(s.ids, dtype=object).astype(str)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, class_names=np.array(self.class_names), **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "Splits":
        with np.load(path, allow_pickle=False) as z:
            names = [str(n) for n in z["class_names"]]
            parts = {
                n: ImageSet(z[f"{n}_images"], z[f"{n}_labels"], names, [str(i) for i in z[f"{n}_ids"]])
                for n in ("train", "validation", "test", "pool")
            }
        return cls(**parts)

    def summary(self) -> dict:
        return {
            "class_names": self.class_names,
            "image_shape": list(self.train.images.shape[1:]),
            **{f"{n}_size": len(getattr(self, n)) for n in ("train", "validation", "test", "pool")},
            **{f"{n}_class_counts": getattr(self, n).class_counts() for n in ("train", "validation", "test")},
            "duplicates_across_splits": {"count": len(self.duplicates), "action": self.duplicates_action,
                                         "examples": self.duplicates[:20]},
            "skipped": {"count": len(self.skipped), "reasons": dict(Counter(why for _, why in self.skipped)),
                        "examples": [f"{entry} ({why})" for entry, why in self.skipped[:20]]},
        }


# 1. Reading sources -------------------------------------------------------------------------------------------


def _finish(images: list[np.ndarray], labels: list, ids: list[str], origin: str, names=None) -> ImageSet:
    if not images:
        raise DataError(f"{origin}: no images found")
    if names is None:
        names = sorted({str(label) for label in labels}, key=_natural_key)
        index = {n: i for i, n in enumerate(names)}
        labels = [index[str(label)] for label in labels]
    return ImageSet(np.stack(images), np.asarray(labels, dtype=np.int64), list(names), ids)


def _natural_key(s: str):
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)


def load_sklearn_digits(cfg: DataConfig) -> ImageSet:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 images with intensities 0..16; scale to 0..255 before normalizing size/channels.
    raw = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    images = [normalize(Image.fromarray(a, mode="L"), cfg.image_size, cfg.channels) for a in raw]
    ids = [f"sklearn-digits:{i}" for i in range(len(raw))]
    return _finish(images, digits.target.tolist(), ids, "sklearn-digits", names=[str(i) for i in range(10)])


def _inside(path: Path, root: Path, what: str) -> None:
    """Refuse a file that resolves outside the data root (a symlink or `../` path would otherwise publish any
    readable image on the machine)."""
    real, top = path.resolve(), root.resolve()
    if real != top and top not in real.parents:
        raise DataError(f"{what} {path} resolves to {real}, outside {root}; set data.allow_outside_paths: true "
                        "if that is intended")


def load_imagefolder(cfg: DataConfig) -> ImageSet:
    root = Path(cfg.source)
    if not root.is_dir():
        raise DataError(f"image folder {root} is not a folder (data.kind: imagefolder needs <root>/<class>/<image>)")
    class_dirs, skipped = [], []
    for entry in root.iterdir():
        if entry.is_dir() and not hidden(entry):
            class_dirs.append(entry)
        else:
            skipped.append((entry_name(entry, root), HIDDEN if hidden(entry) else "outside a class folder"))
    class_dirs.sort(key=lambda d: _natural_key(d.name))
    if not class_dirs:
        raise DataError(f"image folder {root} has no class subfolders (expected {root}/<class>/<image>)")
    images, labels, ids = [], [], []
    for label, d in enumerate(class_dirs):
        files, skip = image_files(d, root)
        skipped += skip
        if not cfg.allow_outside_paths:
            for p in files:
                _inside(p, root, "image")
        if not files:
            raise DataError(f"class folder {d} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for p in files:
            images.append(open_image(p, cfg.image_size, cfg.channels))
            labels.append(label)
            ids.append(str(p.relative_to(root)))
    data = _finish(images, labels, ids, str(root), names=[d.name for d in class_dirs])
    data.skipped = sorted(skipped)
    return data


def load_manifest(cfg: DataConfig) -> ImageSet:
    import io

    import pandas as pd

    path = Path(cfg.source)
    parquet = path.suffix.lower() == ".parquet"
    text = "" if parquet else read_utf8(path, DataError)
    if not parquet and not text.strip():
        raise DataError(f"manifest {path} is empty (expected a header line path,{cfg.label_column} and a row per image)")
    sep = next((c for c in (",", "\t", ";") if c in text.split("\n", 1)[0]), ",")  # as Excel saves it, or TSV
    try:  # every CSV cell as text: a class named NA or None is a class, not a missing label
        df = pd.read_parquet(path) if parquet else \
            pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except Exception as err:  # pandas raises many types for malformed files
        raise DataError(f"cannot read manifest {path}: {err}") from None
    df.columns = [str(c).strip() for c in df.columns]
    for col in ("path", cfg.label_column):
        if col not in df.columns:
            raise DataError(f"manifest {path} has no column {col!r} (columns: {list(df.columns)})")
    missing = df[cfg.label_column].isna().to_numpy()  # class names: `" cat "` is `cat`, `3` is `"3"`
    labels = ["" if m else str(v).strip() for v, m in zip(df[cfg.label_column], missing)]
    images, ids, names, skipped, seen = [], [], [], [], set()
    for row, (rel, label) in enumerate(zip(df["path"], labels), start=2):
        if not isinstance(rel, str) or not rel:
            raise DataError(f"manifest {path}, row {row}: empty path")
        if not label:
            raise DataError(f"manifest {path}, row {row}: missing label")
        if "://" in rel:
            raise DataError(f"manifest {path}, row {row}: {rel} is a URL; augment reads local files (download the "
                            "images and list their paths)")
        if (rel, label) in seen:
            skipped.append((f"row {row}", "duplicate manifest row"))
            continue
        seen.add((rel, label))
        p = Path(rel) if Path(rel).is_absolute() else path.parent / rel
        if not p.exists() and "\\" in rel:  # written on Windows
            p = path.parent / PureWindowsPath(rel).as_posix()
        if not cfg.allow_outside_paths:
            _inside(p, path.parent, f"manifest {path}, row {row}: image")
        if not p.is_file():
            raise DataError(f"manifest {path}, row {row}: image file not found: {p}")
        images.append(open_image(p, cfg.image_size, cfg.channels))
        ids.append(rel)
        names.append(label)
    data = _finish(images, names, ids, str(path))
    data.skipped = skipped
    return data


def load_hf(cfg: DataConfig) -> ImageSet:
    import datasets

    source = cfg.source
    try:
        if Path(source).exists():
            ds = datasets.load_from_disk(source)
        else:
            ds = datasets.load_dataset(source, split=cfg.hf_split)
    except Exception as err:
        where = "" if Path(source).exists() else "no such local file or folder, and "
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]  # one line, however long the error
        raise DataError(f"data.source {source!r}: {where}cannot load it as a datasets dataset: {first}") from None
    if isinstance(ds, datasets.DatasetDict):
        if cfg.hf_split not in ds:
            raise DataError(f"{source}: no split {cfg.hf_split!r} (splits: {list(ds)})")
        ds = ds[cfg.hf_split]
    for col in (cfg.image_column, cfg.label_column):
        if col not in ds.column_names:
            raise DataError(f"{source}: no column {col!r} (columns: {ds.column_names}); set data.image_column / "
                            "data.label_column")
    feature = ds.features[cfg.label_column]
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    images = []
    for i, img in enumerate(ds[cfg.image_column]):
        try:
            images.append(normalize(img, cfg.image_size, cfg.channels))
        except Exception as err:  # a missing image (None), a path string, a mode PIL cannot convert
            raise DataError(f"{source}, row {i}: column {cfg.image_column!r} is not a usable image ({err})") from None
    ids = [f"{source}:{cfg.hf_split}:{i}" for i in range(len(ds))]
    return _finish(images, ds[cfg.label_column], ids, source, names=names)


def detect_kind(cfg: DataConfig) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    if cfg.source == "sklearn-digits":
        return "sklearn-digits"
    p = Path(cfg.source)
    if p.is_file():
        if p.suffix.lower() in {".csv", ".parquet"}:
            return "manifest"
        unpack = "; unpack the archive and give its folder" if p.suffix.lower() in {".zip", ".tar", ".gz", ".tgz",
                                                                                   ".7z"} else ""
        raise DataError(f"data.source {cfg.source} is a file, but neither a manifest (.csv or .parquet with "
                        f"path,label columns) nor an image folder <root>/<class>/<image>{unpack}")
    if p.is_dir():
        if (p / "dataset_dict.json").exists() or (p / "dataset_info.json").exists():
            return "hf"
        return "imagefolder"
    if p.suffix or cfg.source.startswith((".", "/")):
        raise DataError(f"data.source {cfg.source!r} does not exist")
    return "hf"  # a hub id


def load_images(cfg: DataConfig) -> ImageSet:
    from augment.registry import DATA_SOURCES

    data = DATA_SOURCES.load(detect_kind(cfg))(cfg)  # each source reads cfg.source
    counts = data.class_counts()
    if len(counts) < 2:
        raise DataError(f"{cfg.source}: need at least 2 classes, found {len(counts)}")
    return data


# 2. Splitting -------------------------------------------------------------------------------------------------


def split(data: ImageSet, cfg: DataConfig) -> Splits:
    """Stratified, seeded test / validation / labeled-train / unlabeled-pool split."""
    rng = np.random.default_rng(cfg.seed)
    counts = data.class_counts()
    parts: dict[str, list[int]] = {"train": [], "validation": [], "test": [], "pool": []}
    for k, n in enumerate(counts):
        idx = rng.permutation(np.flatnonzero(data.labels == k))
        n_test = int(round(n * cfg.test_fraction))
        n_val = int(round(n * cfg.val_fraction))
        rest = n - n_test - n_val
        n_train = rest if cfg.shots_per_class is None else min(cfg.shots_per_class, rest)
        if n_test < 1 or n_train < 1 or (cfg.val_fraction > 0 and n_val < 1):
            raise DataError(
                f"class {data.class_names[k]!r} has only {n} images: too few for a test share of "
                f"{cfg.test_fraction}, a validation share of {cfg.val_fraction} and at least one training image"
            )
        parts["test"] += idx[:n_test].tolist()
        parts["validation"] += idx[n_test:n_test + n_val].tolist()
        parts["train"] += idx[n_test + n_val:n_test + n_val + n_train].tolist()
        parts["pool"] += idx[n_test + n_val + n_train:].tolist()
    _keep_duplicates_together(data, parts)
    if not cfg.use_unlabeled_pool:
        parts["pool"] = []
    pool = rng.permutation(np.asarray(parts["pool"], dtype=np.int64))
    if cfg.max_pool_size is not None:
        pool = pool[: cfg.max_pool_size]
    out = {n: data.subset(np.sort(np.asarray(v, dtype=np.int64))) for n, v in parts.items() if n != "pool"}
    pooled = data.subset(np.sort(pool))
    pooled.labels = np.full(len(pooled), -1, dtype=np.int64)  # unlabeled: labels dropped
    return Splits(pool=pooled, duplicates_action=cfg.cross_split_duplicates, skipped=data.skipped, **out)


PROTECTION = ("test", "validation", "train", "pool")  # a copy belongs to the first split that holds one


def _digest(image: np.ndarray) -> bytes:
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).digest()


def cross_split_duplicates(splits: Splits, action: str) -> Splits:
    """Find images identical (after loading and resizing) to one in a more protected split: a train or pool image
    that is also in test is scored on what the models learned from. `action="drop"` removes them from the less
    protected split (a class must keep a labeled train image); `"report"` only records them."""
    seen: dict[bytes, tuple[str, str]] = {}  # digest -> (split, id) of its most protected copy
    found: list[dict] = []
    keep: dict[str, np.ndarray] = {}
    for name in PROTECTION:
        s: ImageSet = getattr(splits, name)
        mask = np.ones(len(s), bool)
        digests = [_digest(img) for img in s.images]
        for i, d in enumerate(digests):
            if d in seen and seen[d][0] != name:
                found.append({"split": name, "id": s.ids[i], "copy_of": f"{seen[d][0]}: {seen[d][1]}"})
                mask[i] = False
        for i, d in enumerate(digests):
            seen.setdefault(d, (name, s.ids[i]))
        keep[name] = mask
    splits.duplicates, splits.duplicates_action = found, action
    if action == "drop" and found:
        for name in PROTECTION:
            s = getattr(splits, name)
            setattr(splits, name, s.subset(np.flatnonzero(keep[name])))
        lost = [c for c, n in zip(splits.class_names, splits.train.class_counts()) if n == 0]
        if lost:
            raise DataError(f"data.cross_split_duplicates=drop leaves class {lost[0]!r} without a labeled train image: "
                            "every train image of it is also in test or validation")
    return splits


def _keep_duplicates_together(data: ImageSet, parts: dict[str, list[int]]) -> None:
    """Identical images (after loading and resizing) must not straddle splits: a test image whose copy is in train
    would be scored on what the models learned from. Every copy moves to the most protected split any copy drew
    (test, then validation, then train, then pool); a dataset without duplicates is split exactly as before. The
    same image under two labels is an error."""
    groups: dict[bytes, list[int]] = {}
    for i in range(len(data)):
        groups.setdefault(_digest(data.images[i]), []).append(i)
    where = {i: name for name, idx in parts.items() for i in idx}
    order = list(PROTECTION)
    for members in groups.values():
        if len(members) < 2:
            continue
        labels = {int(data.labels[i]) for i in members}
        if len(labels) > 1:
            names = ", ".join(f"{data.ids[i]} ({data.class_names[int(data.labels[i])]})" for i in members[:6])
            raise DataError(f"the same image has different labels: {names}; fix or remove these files")
        target = min((where[i] for i in members), key=order.index)
        for i in members:
            if where[i] != target:
                parts[where[i]].remove(i)
                parts[target].append(i)
                where[i] = target


SPLIT_FOLDERS = ("train", "validation", "test", "pool")


def has_predefined_splits(cfg: DataConfig) -> bool:
    root = Path(cfg.source)
    return detect_kind(cfg) == "imagefolder" and (root / "train").is_dir() and (root / "test").is_dir()


_KEPT: list = []  # (key, Splits) loaded by `make_splits(keep=True)`, for the next call: see make_splits


def _source_stamp(cfg: DataConfig) -> str | None:
    """What a local source looks like on disk (every file's path, size and mtime): cheap to list, and it changes
    when any image is added, removed or rewritten. None for a hub dataset (nothing local to compare)."""
    if cfg.source == "sklearn-digits":
        return ""
    root = Path(cfg.source)
    if not root.exists():
        return None
    files = [root] if root.is_file() else sorted(top / n for top, _, names in walk(root, root) for n in names)
    stats = [p.stat() if p.exists() else p.lstat() for p in files]  # lstat: a broken link (reading it fails later)
    return json.dumps([(str(p), st.st_size, st.st_mtime_ns) for p, st in zip(files, stats)])


def make_splits(cfg: DataConfig, keep: bool = False) -> Splits:
    """Load and split. An image folder with train/ and test/ subfolders (optionally validation/ and pool/) keeps
    its own test split; validation is then drawn from train unless given, and the unused part of train joins the
    unlabeled pool.

    `keep=True` (the check before a run starts: a data error is then one line and nothing is written) holds the
    result for the next call with the same data config and unchanged files (the run's data stage), so the images
    are read once; that call releases it."""
    stamp = _source_stamp(cfg)
    key = (cfg.model_dump_json(), stamp)
    if _KEPT and _KEPT[0][0] == key and stamp is not None:
        splits = _KEPT[0][1]
    else:
        splits = _make_splits(cfg)
    _KEPT[:] = [(key, splits)] if keep else []
    return splits


def _make_splits(cfg: DataConfig) -> Splits:
    if not has_predefined_splits(cfg):
        return split(load_images(cfg), cfg)
    root = Path(cfg.source)

    def load(name: str) -> ImageSet:
        s = load_imagefolder(cfg.model_copy(update={"source": str(root / name)}))
        s.ids = [f"{name}/{i}" for i in s.ids]
        skipped.extend((f"{name}/{entry}", why) for entry, why in s.skipped)
        if name != "train" and s.class_names != train.class_names:
            raise DataError(f"{root / name} has classes {s.class_names}, but {root / 'train'} has "
                            f"{train.class_names}: the class folders must match")
        return s

    skipped = [(entry_name(e, root), HIDDEN if hidden(e) else "outside train/, validation/, test/ and pool/")
               for e in sorted(root.iterdir()) if e.name not in SPLIT_FOLDERS or not e.is_dir()]
    train = load("train")
    test = load("test")
    given_val = (root / "validation").is_dir()
    rng = np.random.default_rng(cfg.seed)
    parts: dict[str, list[int]] = {"train": [], "validation": [], "pool": []}
    for k, n in enumerate(train.class_counts()):
        idx = rng.permutation(np.flatnonzero(train.labels == k))
        n_val = 0 if given_val else int(round(n * cfg.val_fraction))
        n_train = n - n_val if cfg.shots_per_class is None else min(cfg.shots_per_class, n - n_val)
        if n_train < 1:
            raise DataError(f"class {train.class_names[k]!r} in {root / 'train'} has only {n} images")
        parts["validation"] += idx[:n_val].tolist()
        parts["train"] += idx[n_val:n_val + n_train].tolist()
        parts["pool"] += idx[n_val + n_train:].tolist()
    _keep_duplicates_together(train, parts)  # copies inside your train folder stay in one part of it
    sub = {n: train.subset(np.sort(np.asarray(v, dtype=np.int64))) for n, v in parts.items()}
    pools = [sub["pool"]] if cfg.use_unlabeled_pool else []
    if cfg.use_unlabeled_pool and (root / "pool").is_dir():
        files, skip = image_files(root / "pool", root)
        skipped += skip
        if not cfg.allow_outside_paths:
            for p in files:
                _inside(p, root, "image")
        if files:
            pools.append(ImageSet(np.stack([open_image(p, cfg.image_size, cfg.channels) for p in files]),
                                  np.full(len(files), -1, np.int64), train.class_names,
                                  [f"pool/{p.relative_to(root / 'pool')}" for p in files]))
    pool = ImageSet(np.concatenate([p.images for p in pools]) if pools else train.images[:0],
                    np.full(sum(len(p) for p in pools), -1, np.int64), train.class_names,
                    [i for p in pools for i in p.ids])
    if cfg.max_pool_size is not None and len(pool) > cfg.max_pool_size:
        pool = pool.subset(np.sort(rng.permutation(len(pool))[: cfg.max_pool_size]))
    pool.labels = np.full(len(pool), -1, np.int64)
    validation = load("validation") if given_val else sub["validation"]
    # only here can copies straddle splits: a random split keeps them together (_keep_duplicates_together)
    return cross_split_duplicates(Splits(train=sub["train"], validation=validation, test=test, pool=pool,
                                         skipped=skipped), cfg.cross_split_duplicates)


def data_fingerprint(splits: Splits) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in ("train", "validation", "pool"):  # what training sees; test deliberately excluded
        s: ImageSet = getattr(splits, name)
        h.update(name.encode())
        h.update(s.images.tobytes())
        h.update(s.labels.tobytes())
    h.update(json.dumps(splits.class_names).encode())
    return h.hexdigest()[:16]
