"""The image sets everything downstream works on: `ImageSet` (uint8 arrays (N, H, W, C) normalized to the configured
size and channels, integer labels, class names, where each image came from) and `Splits` (train, validation,
test, pool), saved and loaded as one npz file."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


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
