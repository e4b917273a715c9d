"""Reading a labeled image source: scikit-learn's digits, an image folder, a CSV/parquet manifest, or a `datasets`
dataset (registry: DATA_SOURCES), each into one ImageSet; bad entries are one clear error or a skipped entry."""

from __future__ import annotations

from pathlib import Path, PureWindowsPath

import numpy as np
from PIL import Image

from augment.config import DataConfig
from augment.configfile import read_utf8
from augment.data.sets import ImageSet
from augment.errors import DataError
from augment.imagefiles import IMAGE_SUFFIXES, HIDDEN, entry_name, hidden, image_files, normalize, open_image


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


def inside(path: Path, root: Path, what: str) -> None:
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
                inside(p, root, "image")
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
            inside(p, path.parent, f"manifest {path}, row {row}: image")
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
