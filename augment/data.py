"""Loading, validating and splitting a small labeled image set.

Everything downstream works on `ImageSet`: uint8 arrays (N, H, W, C) normalized to the configured size and
channels, integer labels and class names. Splits are stratified and seeded; the test split never reaches
fine-tuning, filtering or model selection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from augment.config import DataConfig

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DataError(ValueError):
    """Input data the user must fix; the message names the file, column or value."""


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,); -1 for unlabeled
    class_names: list[str]
    ids: list[str] = field(default_factory=list)  # where each image came from

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
        }


# 1. Reading sources -------------------------------------------------------------------------------------------


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale scaled to 0..255 by their bit depth (PIL's convert("L") clips them)."""
    if img.mode not in ("I;16", "I;16B", "I;16L", "I", "F"):
        return img
    arr = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255) else 255.0
    if img.mode == "F":
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
    return Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")


def _normalize(img: Image.Image, size: int, channels: int) -> np.ndarray:
    img = _to_8bit(img).convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if channels == 1 else arr


def _open(path: Path, size: int, channels: int) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return _normalize(img, size, channels)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None


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
    images = [_normalize(Image.fromarray(a, mode="L"), cfg.image_size, cfg.channels) for a in raw]
    ids = [f"sklearn-digits:{i}" for i in range(len(raw))]
    return _finish(images, digits.target.tolist(), ids, "sklearn-digits", names=[str(i) for i in range(10)])


def _inside(path: Path, root: Path, what: str) -> None:
    """Refuse a file that resolves outside the data root (a symlink or `../` path would otherwise publish any
    readable image on the machine)."""
    real, top = path.resolve(), root.resolve()
    if real != top and top not in real.parents:
        raise DataError(f"{what} {path} resolves to {real}, outside {root}; set data.allow_outside_paths: true "
                        "if that is intended")


def load_imagefolder(root: Path, cfg: DataConfig) -> ImageSet:
    class_dirs = sorted([d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")],
                        key=lambda d: _natural_key(d.name))
    if not class_dirs:
        raise DataError(f"image folder {root} has no class subfolders (expected {root}/<class>/<image>)")
    images, labels, ids = [], [], []
    for label, d in enumerate(class_dirs):
        files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not cfg.allow_outside_paths:
            for p in files:
                _inside(p, root, "image")
        if not files:
            raise DataError(f"class folder {d} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for p in files:
            images.append(_open(p, cfg.image_size, cfg.channels))
            labels.append(label)
            ids.append(str(p.relative_to(root)))
    return _finish(images, labels, ids, str(root), names=[d.name for d in class_dirs])


def load_manifest(path: Path, cfg: DataConfig) -> ImageSet:
    import pandas as pd

    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as err:  # pandas raises many types for malformed files
        raise DataError(f"cannot read manifest {path}: {err}") from None
    for col in ("path", cfg.label_column):
        if col not in df.columns:
            raise DataError(f"manifest {path} has no column {col!r} (columns: {list(df.columns)})")
    images, ids = [], []
    for row, rel in enumerate(df["path"]):
        if not isinstance(rel, str) or not rel:
            raise DataError(f"manifest {path}, row {row + 2}: empty path")
        p = Path(rel) if Path(rel).is_absolute() else path.parent / rel
        if not cfg.allow_outside_paths:
            _inside(p, path.parent, f"manifest {path}, row {row + 2}: image")
        if not p.is_file():
            raise DataError(f"manifest {path}, row {row + 2}: image file not found: {p}")
        images.append(_open(p, cfg.image_size, cfg.channels))
        ids.append(rel)
    if df[cfg.label_column].isna().any():
        row = int(np.flatnonzero(df[cfg.label_column].isna().to_numpy())[0])
        raise DataError(f"manifest {path}, row {row + 2}: missing label")
    return _finish(images, df[cfg.label_column].tolist(), ids, str(path))


def load_hf(source: str, cfg: DataConfig) -> ImageSet:
    import datasets

    try:
        if Path(source).exists():
            ds = datasets.load_from_disk(source)
        else:
            ds = datasets.load_dataset(source, split=cfg.hf_split)
    except Exception as err:
        raise DataError(f"cannot load datasets source {source!r}: {err}") from None
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
    images = [_normalize(img, cfg.image_size, cfg.channels) for img in ds[cfg.image_column]]
    ids = [f"{source}:{cfg.hf_split}:{i}" for i in range(len(ds))]
    return _finish(images, ds[cfg.label_column], ids, source, names=names)


def detect_kind(cfg: DataConfig) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    if cfg.source == "sklearn-digits":
        return "sklearn-digits"
    p = Path(cfg.source)
    if p.is_file() and p.suffix.lower() in {".csv", ".parquet"}:
        return "manifest"
    if p.is_dir():
        if (p / "dataset_dict.json").exists() or (p / "dataset_info.json").exists():
            return "hf"
        return "imagefolder"
    if p.suffix or cfg.source.startswith((".", "/")):
        raise DataError(f"data.source {cfg.source!r} does not exist")
    return "hf"  # a hub id


def load_images(cfg: DataConfig) -> ImageSet:
    kind = detect_kind(cfg)
    if kind == "sklearn-digits":
        data = load_sklearn_digits(cfg)
    elif kind == "imagefolder":
        data = load_imagefolder(Path(cfg.source), cfg)
    elif kind == "manifest":
        data = load_manifest(Path(cfg.source), cfg)
    else:
        data = load_hf(cfg.source, cfg)
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
    return Splits(pool=pooled, duplicates_action=cfg.cross_split_duplicates, **out)


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
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return json.dumps([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


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
        s = load_imagefolder(root / name, cfg)
        s.ids = [f"{name}/{i}" for i in s.ids]
        if name != "train" and s.class_names != train.class_names:
            raise DataError(f"{root / name} has classes {s.class_names}, but {root / 'train'} has "
                            f"{train.class_names}: the class folders must match")
        return s

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
        files = sorted(p for p in (root / "pool").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not cfg.allow_outside_paths:
            for p in files:
                _inside(p, root, "image")
        if files:
            pools.append(ImageSet(np.stack([_open(p, cfg.image_size, cfg.channels) for p in files]),
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
    return cross_split_duplicates(Splits(train=sub["train"], validation=validation, test=test, pool=pool),
                                  cfg.cross_split_duplicates)


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
