"""Reading image files: which entries of a folder are images, and any image PIL opens as 8-bit L or RGB.

One place decides what is skipped and why (`image_files`), and how a mode, transparency or an EXIF rotation
becomes pixels (`normalize`); `augment.data` builds image sets from them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from augment.errors import DataError

def to_pil(img: np.ndarray) -> Image.Image:
    """A uint8 (H, W, C) array as a PIL image: grayscale for one channel, RGB for three."""
    return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
HIDDEN = "hidden or __MACOSX"


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale scaled to 0..255 by their bit depth (PIL's convert("L") clips them)."""
    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        return img
    arr = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255) else 255.0
    if img.mode == "F":
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
    return Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")


def _flatten(img: Image.Image) -> Image.Image:
    """Any mode PIL opens as L or RGB. Transparency (an alpha band, or a palette's transparent index) is composited
    over white, as a viewer shows it: the colour under a transparent pixel is arbitrary. Other colour spaces (CMYK,
    LAB, HSV, YCbCr) go through RGB, since PIL converts some of them to RGB only."""
    img = _to_8bit(img)
    if "transparency" in img.info or {"A", "a"} & set(img.getbands()):
        white = Image.new("RGBA", img.size, "white")
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    if img.mode in ("L", "RGB"):
        return img
    return img.convert("L" if img.mode == "1" else "RGB")


def normalize(img: Image.Image, size: int, channels: int, resize: str = "stretch") -> np.ndarray:
    """uint8 (size, size, channels), upright as photographed (EXIF orientation applied); `resize` (data.resize):
    `stretch` the whole image to the square, or `center_crop` its middle square after scaling the short side."""
    img = _flatten(ImageOps.exif_transpose(img)).convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        if resize == "center_crop" and img.width != img.height:
            img = ImageOps.fit(img, (size, size), Image.BICUBIC, centering=(0.5, 0.5))
        else:
            img = img.resize((size, size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if channels == 1 else arr


def open_image(path: Path, size: int, channels: int, resize: str = "stretch") -> np.ndarray:
    """`normalize` of one file; whatever is wrong with the file is one DataError naming it."""
    try:
        with Image.open(path) as img:
            return normalize(img, size, channels, resize)
    except UnidentifiedImageError:
        why = "the file is empty" if path.stat().st_size == 0 else \
            "not an image PIL can read (a corrupt file, or another format under an image extension)"
    except Exception as err:  # PIL raises many types for malformed files and modes it cannot convert
        why = getattr(err, "strerror", None) or str(err) or type(err).__name__
        if path.is_symlink() and not path.exists():
            why = f"a broken symlink (to {os.readlink(path)})"
    raise DataError(f"cannot read image {path}: {why}")


def hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name == "__MACOSX"


def entry_name(path: Path, root: Path) -> str:
    """How the data summary names a skipped file or folder."""
    return str(path.relative_to(root)) + ("/" if path.is_dir() else "")


def _skip_reason(path: Path) -> str | None:
    """Why a file of an image folder is not one of its images (None: it is one). As common image-folder loaders
    do, these are skipped (and counted in the data summary), as are hidden folders and a Mac archive's __MACOSX/:
    hidden files (.DS_Store, the ._name AppleDouble files of a Mac archive), files without an image extension
    (README.txt, Thumbs.db, desktop.ini), and what is not a regular file (reading a FIFO would wait forever)."""
    if hidden(path):
        return HIDDEN
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return "not an image file"
    try:
        return None if stat.S_ISREG(path.stat().st_mode) else "not a regular file"
    except OSError:  # a broken link: reading it names the problem
        return None


def walk(folder: Path, root: Path):
    """os.walk that follows symlinked folders, each real folder once (never `root` again): a linked tree is read,
    a symlink loop ends. An unreadable folder is an error, not a silently missing part of the data."""
    def fail(err: OSError):
        raise DataError(f"cannot read folder {err.filename}: {err.strerror}")

    r = root.stat()
    seen = {(r.st_dev, r.st_ino)}
    for top, dirs, names in os.walk(folder, followlinks=True, onerror=fail):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen and Path(top) != folder:
            dirs[:] = []
            yield Path(top), None, []  # a folder already read
            continue
        seen.add((st.st_dev, st.st_ino))
        yield Path(top), dirs, names


def image_files(folder: Path, root: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files under `folder`, sorted, and the entries skipped (`_skip_reason`), relative to `root`."""
    files, skipped = [], []
    for top, dirs, names in walk(folder, root):
        if dirs is None:
            skipped.append((entry_name(top, root), "symlink to a folder already read"))
            continue
        for d in [d for d in dirs if hidden(top / d)]:
            skipped.append((entry_name(top / d, root), HIDDEN))
            dirs.remove(d)
        for path in (top / n for n in names):
            why = _skip_reason(path)
            if why:
                skipped.append((entry_name(path, root), why))
            else:
                files.append(path)
    return sorted(files), skipped
