"""Reading a labeled image source: scikit-learn's digits, an image folder, a CSV/parquet manifest, or a `datasets`
dataset (registry: DATA_SOURCES), each into one ImageSet; bad entries are one clear error or a skipped entry."""

from __future__ import annotations

import math
import unicodedata
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


NO_LABEL = "no label"  # the data summary's reason for a row of a `datasets` source that has no label


def _label(value, where: str, column: str):
    """One cell of a label column as a class: a name (trimmed text, True/False) or an integer id; None when the cell
    holds no label (None, NaN, blank text). A float must be a whole number: 1.0 is class 1, but 2.5 is a
    measurement (a regression target), and each distinct value would have become a class."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        if not float(value).is_integer():
            raise DataError(f"{where}: label {value} in column {column!r} is not a whole number; labels are class "
                            "names or integer class ids")
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise DataError(f"{where}: column {column!r} holds {type(value).__name__} values ({shown}), not class labels "
                    "(a class name or an integer class id per row)")


def _same_but_case(names: list[str], root: Path) -> None:
    """Refuse class folders whose names differ only in case (or Unicode form): on macOS and Windows they are one
    folder, so the same data would have a different number of classes there."""
    seen: dict[str, str] = {}
    for name in names:
        key = unicodedata.normalize("NFC", name).casefold()
        if key in seen:
            raise DataError(f"image folder {root}: class folders {seen[key]!r} and {name!r} differ only in case; on "
                            "macOS and Windows they are one folder: merge them or rename one")
        seen[key] = name


def load_sklearn_digits(cfg: DataConfig) -> ImageSet:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 images with intensities 0..16; scale to 0..255 before normalizing size/channels.
    raw = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    images = [normalize(Image.fromarray(a, mode="L"), cfg.image_size, cfg.channels, cfg.resize) for a in raw]
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
    _same_but_case([d.name for d in class_dirs], root)
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
            images.append(open_image(p, cfg.image_size, cfg.channels, cfg.resize))
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
    images, ids, names, skipped, seen = [], [], [], [], set()
    for row, (rel, value) in enumerate(zip(df["path"], df[cfg.label_column]), start=2):
        rel = _manifest_path(rel, f"manifest {path}, row {row}")
        label = _label(value, f"manifest {path}, row {row}", cfg.label_column)  # `" cat "` is `cat`, `3` is `"3"`
        if label is None:
            raise DataError(f"manifest {path}, row {row}: missing label")
        label = str(label)
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
        if p.is_dir():
            raise DataError(f"manifest {path}, row {row}: {p} is a folder, not an image file")
        if not p.is_file():
            raise DataError(f"manifest {path}, row {row}: image file not found: {p}")
        images.append(open_image(p, cfg.image_size, cfg.channels, cfg.resize))
        ids.append(rel)
        names.append(label)
    data = _finish(images, names, ids, str(path))
    data.skipped = skipped
    return data


def _manifest_path(value, where: str) -> str:
    """One cell of a manifest's path column as text. A parquet file may hold paths as bytes (a binary column):
    they are UTF-8 text, not an "empty path"."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{where}: the path column holds bytes that are not UTF-8 text ({value[:40]!r}); "
                            "write the paths as text") from None
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        raise DataError(f"{where}: empty path")
    if not isinstance(value, str):
        raise DataError(f"{where}: path {value!r} is a {type(value).__name__}, not a file path; the path column "
                        "must hold text")
    return value


def _hf_labels(ds, cfg: DataConfig) -> tuple[list, list[str] | None]:
    """Every row's class of a `datasets` source (an index into the ClassLabel's names, or a name or integer id),
    None for a row with no label: None, NaN, blank text, or -1 (datasets' "no label", e.g. an unlabeled test split)
    in a ClassLabel or integer column. Such a row is never a class (None became a class named "None")."""
    import datasets

    column, source = cfg.label_column, cfg.source
    feature = ds.features[column]
    if isinstance(feature, datasets.ClassLabel):
        labels = [None if v is None or v == -1 else int(v) for v in ds[column]]
        bad = next(((i, v) for i, v in enumerate(labels) if v is not None and not 0 <= v < feature.num_classes), None)
        if bad:
            raise DataError(f"{source}, row {bad[0]}: label {bad[1]} in column {column!r} is not one of its "
                            f"{feature.num_classes} ClassLabel names")
        return labels, list(feature.names)
    labels = [_label(v, f"{source}, row {i}", column) for i, v in enumerate(ds[column])]
    return [None if y == -1 else y for y in labels], None


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
    labels, names = _hf_labels(ds, cfg)
    keep = [i for i, y in enumerate(labels) if y is not None]
    if len(ds) and not keep:
        raise DataError(f"{source}: column {cfg.label_column!r} has no labels: all {len(ds)} rows of split "
                        f"{cfg.hf_split!r} are missing one (None or -1)")
    images = []  # the images of labeled rows only: an unlabeled row's image is never read
    labeled = ds.select(keep, keep_in_memory=True) if len(keep) < len(ds) else ds  # nothing written beside the data
    for i, img in zip(keep, labeled[cfg.image_column]):
        try:
            images.append(normalize(img, cfg.image_size, cfg.channels, cfg.resize))
        except Exception as err:  # a missing image (None), a path string, a mode PIL cannot convert
            raise DataError(f"{source}, row {i}: column {cfg.image_column!r} is not a usable image ({err})") from None
    ids = [f"{source}:{cfg.hf_split}:{i}" for i in keep]
    data = _finish(images, [labels[i] for i in keep], ids, source, names=names)
    data.skipped = [(f"row {i}", NO_LABEL) for i, y in enumerate(labels) if y is None]
    empty = [n for n, c in zip(data.class_names, data.class_counts()) if c == 0]
    if empty:
        raise DataError(f"{source}: class {empty[0]!r} of column {cfg.label_column!r} has no labeled rows in split "
                        f"{cfg.hf_split!r}; give it images, or cast the column to a ClassLabel without it")
    return data


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
