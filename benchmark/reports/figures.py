"""Figures: a cell's test samples, its threshold sweep and its ROC curves.

Each plot is drawn by a function on a matplotlib ``Axes`` (``draw_*``), so that cross-method figures reuse
them; the ``*_figure`` functions compose one cell's figures from them, and ``to_png`` renders one.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass(frozen=True)
class SampleView:
    """One test image as drawn: image ``[H,W,3]`` in [0,1], mask and map ``[H,W]``."""

    name: str
    image: np.ndarray
    mask: np.ndarray
    amap: np.ndarray
    score: float
    label: int
    uncertainty: np.ndarray | None = None  # the method's uncertainty map, where it gives one
    note: str = ""  # why it is shown ("highest score": benchmark.job.FigurePicks)


@dataclass(frozen=True)
class Curve:
    """A ROC curve: false and true positive rates from (0, 0) to (1, 1), and its AUROC."""

    fpr: np.ndarray
    tpr: np.ndarray
    auroc: float


def _outline(ax, mask: np.ndarray, color: str = "lime") -> None:
    if mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors=color, linewidths=1.0)


def draw_overlay(ax, sample: SampleView, vmin: float, vmax: float, alpha: float = 0.5):
    """The anomaly map over the image, the ground truth outlined; returns the map's image for a colour bar."""
    ax.imshow(sample.image)
    shown = ax.imshow(sample.amap, cmap="jet", alpha=alpha, vmin=vmin, vmax=vmax)
    _outline(ax, sample.mask)
    ax.axis("off")
    return shown


def _boundary(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels: inside, with a 4-neighbour outside (the image's border counts as inside)."""
    padded = np.pad(mask, 1, mode="edge")
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _colour(values: np.ndarray, cmap: str, vmin: float, vmax: float) -> np.ndarray:
    from matplotlib import colormaps

    return colormaps[cmap](np.clip((values - vmin) / (vmax - vmin), 0, 1))[..., :3]


def sample_panels(sample: SampleView, threshold: float, lo: float, hi: float, uncertainty: bool) -> list[np.ndarray]:
    """A sample's panels as RGB arrays: the image, the map over it (jet, alpha 0.5, on the ``lo``-``hi`` scale),
    the predicted mask ``map >= threshold`` in red over it (alpha 0.6), each with the ground truth's boundary in
    green, and the uncertainty map (0 to log 2 nats) where asked."""
    image = np.clip(sample.image[..., :3], 0, 1).astype(float)
    overlay = 0.5 * image + 0.5 * _colour(sample.amap, "jet", lo, hi)
    predicted = image.copy()
    hit = sample.amap >= threshold
    predicted[hit] = 0.4 * image[hit] + 0.6 * np.array([1.0, 0.0, 0.0])
    panels = [image.copy(), overlay, predicted]
    edge = _boundary(sample.mask.astype(bool))
    for panel in panels:
        panel[edge] = (0.0, 1.0, 0.0)
    if uncertainty:
        values = sample.uncertainty if sample.uncertainty is not None else np.zeros(sample.amap.shape)
        panels.append(_colour(values, "nipy_spectral", 0.0, float(np.log(2))))
    return panels


def samples_figure(samples: Sequence[SampleView], title: str, threshold: float):
    """One row per sample (labelled normal/anomalous, why it was picked, and its image score): the image with the
    ground truth outlined (green), the map over it with a shared colour bar, the predicted mask at ``threshold``
    and, for methods that give one, the uncertainty map with its own colour bar.

    The panels are composed into one image drawn on one axes (a dozen axes cost more than the drawing: this
    figure is rendered for every cell)."""
    plt = pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    rows = max(len(samples), 1)
    # one colour scale for every map of the figure, so that rows compare
    lo = min((float(s.amap.min()) for s in samples), default=0.0)
    hi = max((float(s.amap.max()) for s in samples), default=1.0)
    hi = hi if hi > lo else lo + 1e-6
    uncertainty = any(s.uncertainty is not None for s in samples)
    columns = 4 if uncertainty else 3
    titles = ["", "anomaly map", f"map >= {threshold:g} (red), truth (green)", "uncertainty (entropy)"]
    height_in = 2.5 * rows + 0.5
    fig = plt.figure(figsize=(2.8 * columns + (0.9 if uncertainty else 0), height_in))
    right = 0.76 if uncertainty else 0.8
    ax = fig.add_axes((0.08, 0.02, right, 1 - 0.6 / height_in - 0.02))
    ax.axis("off")
    if samples:
        size = samples[0].amap.shape
        gap = max(1, size[1] // 16)
        height, width = size[0] + 3 * gap, size[1] + gap  # room under each row's titles
        mosaic = np.ones((rows * height, columns * width - gap, 3))
        for row, sample in enumerate(samples):
            top = row * height + 3 * gap
            for col, panel in enumerate(sample_panels(sample, threshold, lo, hi, uncertainty)):
                mosaic[top : top + size[0], col * width : col * width + size[1]] = panel
                name = sample.name if col == 0 else titles[col]
                ax.text(col * width + size[1] / 2, top - gap / 2, name, ha="center", va="bottom", fontsize=7)
            kind = ("anomalous" if sample.label else "normal") + (f", {sample.note}" if sample.note else "")
            ax.text(-gap, top + size[0] / 2, f"{kind}\nscore {sample.score:.3f}", rotation=90, ha="right",
                    va="center", fontsize=8)  # fmt: skip
        ax.imshow(mosaic, interpolation="nearest", aspect="equal")
        bars = [("jet", lo, hi, "anomaly map (shared scale)")]
        if uncertainty:
            bars.append(("nipy_spectral", 0.0, float(np.log(2)), "uncertainty (entropy, nats)"))
        for i, (cmap, vmin, vmax, label) in enumerate(bars):
            where = fig.add_axes((0.08 + right + 0.015 + i * 0.075, 0.25, 0.015, 0.5))
            fig.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap), cax=where, label=label)
    fig.suptitle(title, fontsize=8)
    return fig


def draw_sweep(
    ax,
    rows: Sequence[dict[str, float]],
    label: str = "",
    marked: float | None = None,
    what: tuple[str, ...] = ("dice", "image_accuracy"),
) -> None:
    """Dice (where the sweep has it) and image accuracy against the threshold (``what`` picks); ``marked``
    draws the main threshold; ``label`` names the method when several are overlaid."""
    thresholds = [r["threshold"] for r in rows]
    prefix = f"{label}: " if label else ""
    if "dice" in what and all("dice" in r for r in rows):
        ax.plot(thresholds, [r["dice"] for r in rows], marker="o", label=f"{prefix}Dice")
    if "image_accuracy" in what and all("image_accuracy" in r for r in rows):
        ax.plot(thresholds, [r["image_accuracy"] for r in rows], marker="s", linestyle="--", label=f"{prefix}accuracy")
    if marked is not None:
        ax.axvline(marked, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("threshold")
    drawn = [name for key, name in (("dice", "Dice"), ("image_accuracy", "image accuracy")) if key in what
             and rows and all(key in r for r in rows)]  # fmt: skip
    ax.set_ylabel(" / ".join(drawn))
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def draw_roc(ax, curve: Curve, label: str) -> None:
    ax.plot(curve.fpr, curve.tpr, label=f"{label} (AUROC {curve.auroc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower right")


def sweep_figure(rows: Sequence[dict[str, float]], title: str, marked: float | None = None):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    draw_sweep(ax, rows, marked=marked)
    # a cell id and a backbone are wider than the plot: wrapped on the figure's width, not the axes'
    fig.suptitle(textwrap.fill(title, 62), fontsize=7)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.13, top=0.82)  # fixed: rendered for every cell
    return fig


def roc_figure(curves: dict[str, Curve], title: str):
    """Image-level and (where there are masks) pixel-level ROC curves, side by side."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3.6), squeeze=False)
    for ax, (name, curve) in zip(axes[0], curves.items(), strict=True):
        draw_roc(ax, curve, name)
        ax.set_aspect("equal")
    fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.13, top=0.88, wspace=0.3)  # fixed: rendered for every cell
    return fig


def efficiency_figure(points: Sequence[tuple[str, float, float]], title: str):
    """Accuracy against time: one labelled point per (method variant, setting) row, ``(label, ms per image,
    average AUROC in %)``; time on a log axis (methods differ by orders of magnitude)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, ms, auroc in points:
        ax.scatter(ms, auroc, s=18)
        ax.annotate(label, (ms, auroc), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.margins(x=0.3, y=0.1)  # room for the labels right of the points
    ax.set_xlabel("ms per test image, with loading (log scale)")
    ax.set_ylabel("average of image and pixel AUROC (%)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def to_png(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=80, format="png", pil_kwargs={"compress_level": 1})
    pyplot().close(fig)
    return buffer.getvalue()
