"""How long loading and splitting a large image folder takes: N tiny PNGs in 10 classes, with the junk a copied
folder holds (a Mac archive's `._name` files, `.DS_Store`, `Thumbs.db`) that is skipped and counted.

    python benchmarks/loading.py --files 20000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from augment.config import DataConfig
from augment.data import make_splits


def write_folder(root: Path, n: int, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for k in range(classes):
        (root / str(k)).mkdir(parents=True)
        (root / str(k) / ".DS_Store").write_bytes(b"x")
        (root / str(k) / "Thumbs.db").write_bytes(b"x")
        for i in range(n // classes):
            Image.fromarray(rng.integers(0, 255, (8, 8), np.uint8)).save(root / str(k) / f"{i}.png")
            if i % 10 == 0:
                (root / str(k) / f"._{i}.png").write_bytes(b"\0\5\26\7")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=20_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        t0 = time.time()
        write_folder(root, args.files)
        t1 = time.time()
        splits = make_splits(DataConfig(source=str(root), shots_per_class=10))
        t2 = time.time()
    s = splits.summary()
    print(f"{args.files} images written in {t1 - t0:.1f} s; loaded and split in {t2 - t1:.1f} s "
          f"({1e6 * (t2 - t1) / args.files:.0f} µs per image); skipped {s['skipped']['reasons']}")


if __name__ == "__main__":
    main()
