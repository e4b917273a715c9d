"""Splitting an image set: stratified and seeded test / validation / labeled train / unlabeled pool, or a folder's
own train/ and test/ (and validation/, pool/); copies kept together or reported across splits; the data's
fingerprint. The test split never reaches fine-tuning, filtering or model selection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from augment.config import DataConfig
from augment.data.sets import ImageSet, Splits
from augment.data.sources import detect_kind, inside, load_images, load_imagefolder
from augment.errors import DataError
from augment.imagefiles import HIDDEN, entry_name, hidden, image_files, open_image, walk


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
            raise DataError(f"the same image has different labels: {_label_clash(data, members)}; fix or remove "
                            "these files")
        target = min((where[i] for i in members), key=order.index)
        for i in members:
            if where[i] != target:
                parts[where[i]].remove(i)
                parts[target].append(i)
                where[i] = target


def _label_clash(data: ImageSet, members: list[int], per_class: int = 3) -> str:
    """The copies of one image under several labels, a few of every class: the first six copies could all be of
    one class, and the message then named only that class's files."""
    by_class: dict[int, list[int]] = {}
    for i in members:
        by_class.setdefault(int(data.labels[i]), []).append(i)
    shown = [i for copies in by_class.values() for i in copies[:per_class]]
    more = f" and {len(members) - len(shown)} more copies" if len(members) > len(shown) else ""
    return ", ".join(f"{data.ids[i]} ({data.class_names[int(data.labels[i])]})" for i in shown) + more


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
                inside(p, root, "image")
        if files:
            pools.append(ImageSet(np.stack([open_image(p, cfg.image_size, cfg.channels, cfg.resize) for p in files]),
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
