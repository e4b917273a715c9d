"""Loading, validating and splitting a small labeled image set: sets.py (ImageSet, Splits), sources.py (reading
each kind of source), splits.py (the split, cross-split copies, the fingerprint). Everything is importable from
augment.data."""

from augment.config import DataConfig
from augment.data.sets import ImageSet, Splits
from augment.data.sources import (detect_kind, load_hf, load_imagefolder, load_images, load_manifest,
                                  load_sklearn_digits)
from augment.data.splits import data_fingerprint, make_splits, split
from augment.errors import DataError

__all__ = ["DataConfig", "DataError", "ImageSet", "Splits", "data_fingerprint", "detect_kind", "load_hf",
           "load_imagefolder", "load_images", "load_manifest", "load_sklearn_digits", "make_splits", "split"]
