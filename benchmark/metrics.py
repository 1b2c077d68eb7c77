"""Streaming metrics, updated per batch in memory that does not grow with the number of pixels.

- Image level: one score per image is kept (bounded by the number of images, not pixels); AUROC is exact
  (Mann-Whitney with tied ranks averaged, as ``sklearn.metrics.roc_auc_score``), accuracy at thresholds.
- Pixel level: two fixed-bin histograms over [0, 1] (``bins`` bins, positive and negative pixels) give the
  pixel AUROC with ties inside a bin counted as one half. Only pairs of a positive and a negative pixel that
  fall in the same bin can be ordered differently from the exact AUROC, so the error is at most
  ``0.5 * sum_b pos_b * neg_b / (P * N)``; ``PixelMetrics.auroc_error_bound`` returns that bound, computed
  from the same histograms, and the tests check ``|ours - sklearn| <= bound`` on random and adversarial maps.
- Dice and accuracy at fixed thresholds are exact: each pixel is bucketed by how many thresholds it
  reaches (``score >= t``), so one pass counts TP/FP/FN for every threshold of the sweep. Dice is the
  dataset-level Dice, ``2 TP / (2 TP + FP + FN)`` over all test pixels.

A metric whose classes are missing (no anomalous image, no anomalous pixel) is NaN with a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class MetricInfo:
    """A metric's name as logged (the ``metric`` column of the published results) and its direction."""

    name: str
    higher_is_better: bool = True


METRICS = {
    m.name: m
    for m in (
        MetricInfo("image_auroc"),
        MetricInfo("image_accuracy"),
        MetricInfo("pixel_auroc"),
        MetricInfo("dice"),
        MetricInfo("dice_oracle"),
    )
}


def _nan(msg: str) -> float:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return float("nan")


def auroc_exact(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC as the Mann-Whitney statistic with average ranks for ties; NaN if a class is missing."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return _nan("AUROC is undefined with one class only; reporting NaN")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg_rank = first + (counts + 1) / 2.0
    ranks = np.empty_like(scores)
    ranks[order] = np.repeat(avg_rank, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


class ImageMetrics:
    """Image-level AUROC and accuracy at thresholds, from per-image scores and labels."""

    def __init__(self) -> None:
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def update(self, scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> None:
        self._scores.append(np.asarray(torch.as_tensor(scores).detach().cpu(), dtype=np.float64).reshape(-1))
        self._labels.append(np.asarray(torch.as_tensor(labels).cpu()).astype(np.int64).reshape(-1))

    @property
    def scores(self) -> np.ndarray:
        return np.concatenate(self._scores) if self._scores else np.zeros(0)

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate(self._labels) if self._labels else np.zeros(0, dtype=np.int64)

    def auroc(self) -> float:
        return auroc_exact(self.scores, self.labels)

    def accuracy(self, threshold: float) -> float:
        """Fraction of images with ``(score >= threshold) == label``."""
        if len(self.labels) == 0:
            return _nan("accuracy of an empty test set; reporting NaN")
        return float(((self.scores >= threshold) == self.labels.astype(bool)).mean())


class PixelMetrics:
    """Pixel AUROC from fixed-bin histograms and exact Dice at a fixed set of thresholds."""

    def __init__(self, thresholds: tuple[float, ...] | list[float], bins: int = 1 << 16) -> None:
        self.thresholds = tuple(sorted(set(float(t) for t in thresholds)))
        self.bins = bins
        self.hist_pos = torch.zeros(bins, dtype=torch.int64)
        self.hist_neg = torch.zeros(bins, dtype=torch.int64)
        n = len(self.thresholds) + 1
        self.level_pos = torch.zeros(n, dtype=torch.int64)
        self.level_neg = torch.zeros(n, dtype=torch.int64)
        self._thr = torch.tensor(self.thresholds, dtype=torch.float32)

    def update(self, maps: torch.Tensor, masks: torch.Tensor) -> None:
        """Add a batch of anomaly maps ``[B,H,W]`` in [0,1] and binary masks of the same shape."""
        if maps.shape != masks.shape:
            raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} differ in shape")
        scores = maps.detach().to("cpu", torch.float32).reshape(-1)
        truth = masks.detach().to("cpu").reshape(-1).bool()
        bin_idx = (scores * self.bins).long().clamp_(0, self.bins - 1)
        level = torch.bucketize(scores, self._thr, right=True)
        n = len(self.thresholds) + 1
        pos_bins, neg_bins = bin_idx[truth], bin_idx[~truth]
        self.hist_pos += torch.bincount(pos_bins, minlength=self.bins)
        self.hist_neg += torch.bincount(neg_bins, minlength=self.bins)
        self.level_pos += torch.bincount(level[truth], minlength=n)
        self.level_neg += torch.bincount(level[~truth], minlength=n)

    @property
    def n_pos(self) -> int:
        return int(self.hist_pos.sum())

    @property
    def n_neg(self) -> int:
        return int(self.hist_neg.sum())

    def auroc(self) -> float:
        p, n = self.n_pos, self.n_neg
        if p == 0 or n == 0:
            return _nan("pixel AUROC is undefined without both normal and anomalous pixels; reporting NaN")
        pos = self.hist_pos.double()
        neg = self.hist_neg.double()
        pos_above = pos.flip(0).cumsum(0).flip(0) - pos  # positives in strictly higher bins
        return float((neg * (pos_above + 0.5 * pos)).sum() / (p * n))

    def auroc_error_bound(self) -> float:
        """Largest possible |histogram AUROC - exact AUROC| for the pixels seen so far."""
        p, n = self.n_pos, self.n_neg
        if p == 0 or n == 0:
            return float("nan")
        return float(0.5 * (self.hist_pos.double() * self.hist_neg.double()).sum() / (p * n))

    def dice(self, threshold: float) -> float:
        """Dataset-level Dice of ``map >= threshold`` against the masks; ``threshold`` must be tracked."""
        j = self.thresholds.index(float(threshold))
        tp = int(self.level_pos[j + 1 :].sum())
        fp = int(self.level_neg[j + 1 :].sum())
        fn = self.n_pos - tp
        if self.n_pos == 0:
            return _nan("Dice is undefined without anomalous pixels; reporting NaN")
        return 2.0 * tp / (2.0 * tp + fp + fn)

    def pixel_accuracy(self, threshold: float) -> float:
        j = self.thresholds.index(float(threshold))
        tp = int(self.level_pos[j + 1 :].sum())
        tn = int(self.level_neg[: j + 1].sum())
        total = self.n_pos + self.n_neg
        return (tp + tn) / total if total else float("nan")
