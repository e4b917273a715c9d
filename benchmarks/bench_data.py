"""Benchmark datasets that ship inside PyPI packages (no download at run time), written as image folders.

- `digits`: scikit-learn's 8x8 handwritten digits (the product's built-in default; `data.source: sklearn-digits`).
- `lfw`: scikit-image's `lfw_subset` (skimage/data/lfw_subset.npy, in the wheel): 100 face and 100 non-face
  25x25 grayscale photo crops from Labeled Faces in the Wild; real photographs, two classes. Needs
  `pip install scikit-image` (the `bench` extra), not the product.

    python benchmarks/bench_data.py lfw outputs/datasets/lfw     # writes <dir>/face/*.png, <dir>/non-face/*.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def write_lfw(root: str | Path) -> Path:
    """Write lfw_subset as an image folder (idempotent); returns the folder."""
    root = Path(root)
    if (root / "face").is_dir() and (root / "non-face").is_dir():
        return root
    try:
        from skimage import data
    except ImportError:
        raise SystemExit("the lfw benchmark dataset needs scikit-image: pip install -e '.[bench]'") from None
    images = data.lfw_subset()  # (200, 25, 25) floats in [0, 1]; the first 100 are faces
    tmp = root.with_name(root.name + ".tmp")
    for i, img in enumerate(images):
        label = "face" if i < 100 else "non-face"
        (tmp / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img * 255.0, 0, 255).round().astype(np.uint8), mode="L").save(tmp / label / f"{i:03d}.png")
    tmp.rename(root)
    return root


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "lfw":
        raise SystemExit(__doc__)
    print(write_lfw(sys.argv[2]))
