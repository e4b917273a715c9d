"""Matplotlib figures for the report, returned as PNG bytes (embedded in HTML, written next to report.md)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    from augment.report.schema import ArmResult

COLORS = {"real": "#7f7f7f", "real+classic": "#1f77b4", "real+pseudo": "#8c564b", "real+classic+pseudo": "#8c564b",
          "real+synthetic": "#98df8a", "real+classic+synthetic": "#2ca02c", "real+pseudo+synthetic": "#17becf",
          "real+classic+pseudo+synthetic": "#17becf", "real+synthetic_unfiltered": "#ff7f0e",
          "real+classic+synthetic_unfiltered": "#ff7f0e", "real+classic+pseudo+synthetic_unfiltered": "#ff7f0e",
          "synthetic": "#9467bd"}


def _literal(fn):
    """Class and arm names are shown as written: `$x$` is not mathtext (a class named `$\\foo$` crashed it)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context({"text.parse_math": False}):
            return fn(*args, **kwargs)

    return wrapper


DPI = 110


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


@_literal
def arms_plot(arms: dict[str, ArmResult], metric: str = "accuracy", split: str = "test") -> bytes:
    """Mean with 95% CI per arm, and every seed as a dot."""
    names = [a for a, v in arms.items() if getattr(v, metric) is not None]
    fig, ax = plt.subplots(figsize=(7, 0.55 * len(names) + 1.2))
    for i, a in enumerate(names):
        s, seeds = getattr(arms[a], metric), getattr(arms[a], f"per_seed_{metric}")
        c = COLORS.get(a, "#444444")
        # one seed has no interval (null in metrics.json): draw the mean alone
        lo = s.ci_low if s.ci_low is not None and np.isfinite(s.ci_low) else s.mean
        hi = s.ci_high if s.ci_high is not None and np.isfinite(s.ci_high) else s.mean
        ax.barh(i, s.mean, color=c, alpha=0.35)
        ax.errorbar(s.mean, i, xerr=[[s.mean - lo], [hi - s.mean]], fmt="o", color=c, capsize=4)
        ax.scatter(seeds, [i] * s.n, color=c, s=12, zorder=3, marker="|")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    vals = [v for a in names for v in getattr(arms[a], f"per_seed_{metric}")]
    ax.set_xlim(max(0.0, min(vals) - 0.05), min(1.0, max(vals) + 0.03))
    ax.set_xlabel(f"{split} {metric.replace('_', '-')} (bar: mean, whisker: 95% CI, ticks: seeds)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


@_literal
def per_class_plot(per_class: dict[str, list[float]], class_names: list[str], split: str = "test") -> bytes:
    """Per-class accuracy (mean over seeds) of each arm given, side by side."""
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(class_names) + 2), 3.2))
    w = 0.8 / max(1, len(per_class))
    x = np.arange(len(class_names))
    for i, (a, acc) in enumerate(per_class.items()):
        ax.bar(x + (i - (len(per_class) - 1) / 2) * w, acc, w, label=a, color=COLORS.get(a, "#444444"))
    ax.set_xticks(x, class_names, rotation=45 if max(len(c) for c in class_names) > 3 else 0)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"{split} accuracy (mean over seeds)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


@_literal
def confusion_plot(cms: dict[str, list], class_names: list[str]) -> bytes:
    fig, axes = plt.subplots(1, len(cms), figsize=(3.6 * len(cms), 3.4))
    axes = np.atleast_1d(axes)
    for ax, (name, cm) in zip(axes, cms.items()):
        cm = np.asarray(cm, float)
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(class_names)), class_names, fontsize=7)
        ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
    return _png(fig)


@_literal
def histogram_plot(groups: dict[str, np.ndarray], xlabel: str, threshold: float | None = None,
                   bins: int = 30) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 2.8))
    finite = [np.asarray(v)[np.isfinite(v)] for v in groups.values() if len(v)]
    lo = min((v.min() for v in finite if len(v)), default=0.0)
    hi = max((v.max() for v in finite if len(v)), default=1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-3, bins + 1)
    for name, v in groups.items():
        if len(v):
            ax.hist(v, bins=edges, alpha=0.55, label=f"{name} (n={len(v)})", density=True)
    if threshold is not None:
        ax.axvline(threshold, color="red", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _png(fig)


@_literal
def image_grid(rows: list[tuple[str, np.ndarray, list[str] | None]], cell: int = 64) -> bytes:
    """Rows of images (uint8 NHWC), each with a row label and optional per-image captions. Each image is drawn
    `cell` points wide (about 1.8 `cell` pixels): small images are upscaled with nearest-neighbour, so an 8x8
    digit shows its pixels instead of a blur; larger ones are downscaled with antialiasing.

    The grid is one mosaic image in one Axes (white gaps between cells): one Axes per cell cost 5 s for the
    report's four grids, nearly all of the report's time."""
    cols = max((len(r[1]) for r in rows), default=1) or 1
    has_caps = any(r[2] for r in rows)
    side = max((max(r[1].shape[1], r[1].shape[2]) for r in rows if len(r[1])), default=8)
    gap = max(1, side // 16)
    cap_h = side // 4 if has_caps else 0  # room above each row's images for their captions
    row_h = cap_h + side + gap
    width, height = cols * (side + gap) - gap, max(1, len(rows) * row_h - gap)
    mosaic = np.full((height, width, 3), 255, np.uint8)
    for r, (_, imgs, _) in enumerate(rows):
        for c, img in enumerate(imgs):
            if img.shape[:2] != (side, side):  # nearest-neighbour to the grid's cell size
                ys = np.arange(side) * img.shape[0] // side
                xs = np.arange(side) * img.shape[1] // side
                img = img[ys][:, xs]
            y, x = r * row_h + cap_h, c * (side + gap)
            mosaic[y:y + side, x:x + side] = img if img.shape[-1] == 3 else img[..., :1]
    inch = cell / 60 / side  # inches per mosaic pixel: each image `cell` points wide, as before
    label_w = cell / 60
    fig = plt.figure(figsize=(label_w + width * inch, height * inch))
    ax = fig.add_axes((label_w / (label_w + width * inch), 0, width * inch / (label_w + width * inch), 1))
    ax.axis("off")
    ax.imshow(mosaic, extent=(0, width, height, 0),
              interpolation="nearest" if side <= cell / 60 * DPI else "antialiased")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    for r, (label, imgs, caps) in enumerate(rows):
        ax.text(-side * 0.1, r * row_h + cap_h + side / 2, label, ha="right", va="center",
                fontsize=max(7, cell // 7))
        for c, cap in enumerate((caps or [])[:len(imgs)]):
            ax.text(c * (side + gap) + side / 2, r * row_h + cap_h - gap / 2, cap, ha="center", va="bottom",
                    fontsize=max(5, cell // 10))
    return _png(fig)
