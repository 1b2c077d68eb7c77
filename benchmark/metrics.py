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
- AUPR is *average precision*, scikit-learn's ``average_precision_score`` (a step sum over thresholds,
  ``sum_k (R_k - R_(k-1)) P_k``), not the trapezoid area under the precision-recall curve: exact for images;
  for pixels computed over the same bins, so it equals scikit-learn's value on maps quantised to them.
- Image F1-max: the best F1 over every threshold (each distinct score), exact.
- Pixel AUPRO (Bergmann et al., IJCV 2021): regions are the 8-connected components of each test mask;
  ``PRO(t)`` is the mean over all regions of the fraction of the region at or above ``t``, which is a sum over
  anomalous pixels weighted by ``1 / size of their region``, so one more weighted histogram holds it;
  ``FPR(t)`` comes from the normal pixels' histogram. The area under PRO(FPR) up to ``limit`` (0.3), the
  curve interpolated at the limit, is divided by the limit. Within a bin the exact curve is monotone
  between the bin's end points, so the binned area is off by at most ``sum 0.5 dFPR dPRO / limit`` (the last,
  cut segment counted whole): ``aupro_error_bound`` returns it.

A metric whose classes are missing (no anomalous image, no anomalous pixel) is NaN with a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


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
        MetricInfo("image_aupr"),
        MetricInfo("image_f1_max"),
        MetricInfo("pixel_aupr"),
        MetricInfo("pixel_aupro"),
        MetricInfo("dice_per_image"),
        MetricInfo("nsd"),
        MetricInfo("pixel_ece", higher_is_better=False),
        MetricInfo("uncertainty_mean", higher_is_better=False),
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


def _descending_counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives at each distinct score taken as threshold (``score >= t``), highest first."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order].astype(np.float64)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the last index of each run of equal scores
    tps = np.cumsum(y)[last]
    return tps, last + 1 - tps


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at each distinct score taken as threshold, from (0, 0)."""
    tps, fps = _descending_counts(np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool))
    return np.r_[0.0, fps / max(fps[-1], 1)], np.r_[0.0, tps / max(tps[-1], 1)]


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """scikit-learn's ``average_precision_score``: ``sum_k (R_k - R_(k-1)) P_k`` over distinct thresholds."""
    labels = np.asarray(labels).astype(bool)
    if not labels.any() or labels.all():
        return _nan("AUPR is undefined with one class only; reporting NaN")
    tps, fps = _descending_counts(np.asarray(scores, dtype=np.float64), labels)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * tps / (tps + fps)))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """The best F1 of ``score >= t`` over every threshold ``t`` (each distinct score)."""
    labels = np.asarray(labels).astype(bool)
    if not labels.any():
        return _nan("F1 is undefined without anomalous images; reporting NaN")
    tps, fps = _descending_counts(np.asarray(scores, dtype=np.float64), labels)
    return float(np.max(2 * tps / (tps + fps + labels.sum())))


class ImageMetrics:
    """Image-level AUROC and accuracy at thresholds, from per-image scores and labels."""

    def __init__(self) -> None:
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def update(self, scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> None:
        self._scores.append(np.asarray(torch.as_tensor(scores).detach().cpu().double()).reshape(-1))
        self._labels.append(np.asarray(torch.as_tensor(labels).cpu()).astype(np.int64).reshape(-1))

    @property
    def scores(self) -> np.ndarray:
        return np.concatenate(self._scores) if self._scores else np.zeros(0)

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate(self._labels) if self._labels else np.zeros(0, dtype=np.int64)

    def auroc(self) -> float:
        return auroc_exact(self.scores, self.labels)

    def aupr(self) -> float:
        return average_precision(self.scores, self.labels)

    def f1_max(self) -> float:
        return f1_max(self.scores, self.labels)

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        return roc_points(self.scores, self.labels)

    def accuracy(self, threshold: float) -> float:
        """Fraction of images with ``(score >= threshold) == label``."""
        if len(self.labels) == 0:
            return _nan("accuracy of an empty test set; reporting NaN")
        return float(((self.scores >= threshold) == self.labels.astype(bool)).mean())


def region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """For the anomalous pixels of ``masks`` ``[B,H,W]`` (row-major order, as ``masks.reshape(-1)``), the
    weight ``1 / size`` of the 8-connected region each belongs to, and the number of regions."""
    from scipy import ndimage

    weights, count = [], 0
    for mask in masks:
        labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        if n:
            sizes = np.bincount(labels.ravel())
            weights.append(1.0 / sizes[labels[mask]])
        count += n
    return (np.concatenate(weights) if weights else np.zeros(0)), count


class PixelMetrics:
    """Pixel AUROC, AUPR and AUPRO from fixed-bin histograms; exact Dice at a fixed set of thresholds."""

    def __init__(self, thresholds: tuple[float, ...] | list[float], bins: int = 1 << 16) -> None:
        self.thresholds = tuple(sorted(set(float(t) for t in thresholds)))
        self.bins = bins
        self.hist_pos = torch.zeros(bins, dtype=torch.int64)
        self.hist_neg = torch.zeros(bins, dtype=torch.int64)
        n = len(self.thresholds) + 1
        self.level_pos = torch.zeros(n, dtype=torch.int64)
        self.level_neg = torch.zeros(n, dtype=torch.int64)
        self._thr = torch.tensor(self.thresholds, dtype=torch.float32)
        self.hist_region = torch.zeros(bins, dtype=torch.float64)  # anomalous pixels weighted 1 / region size
        self.regions = 0

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
        weights, regions = region_weights(masks.detach().to("cpu").bool().numpy())
        self.hist_region += torch.bincount(pos_bins, weights=torch.from_numpy(weights), minlength=self.bins)
        self.regions += regions

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

    def roc(self, points: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """False and true positive rates with each bin taken as threshold, from (0, 0) to (1, 1), thinned to
        about ``points`` points for plotting."""
        fpr = torch.cat([torch.zeros(1, dtype=torch.float64), self.hist_neg.double().flip(0).cumsum(0)])
        tpr = torch.cat([torch.zeros(1, dtype=torch.float64), self.hist_pos.double().flip(0).cumsum(0)])
        fpr, tpr = (fpr / max(self.n_neg, 1)).numpy(), (tpr / max(self.n_pos, 1)).numpy()
        keep = np.unique(np.r_[0, np.linspace(0, len(fpr) - 1, points).astype(int), len(fpr) - 1])
        return fpr[keep], tpr[keep]

    def aupr(self) -> float:
        """Average precision over the bins (each non-empty bin one threshold)."""
        if self.n_pos == 0 or self.n_neg == 0:
            return _nan("pixel AUPR is undefined without both normal and anomalous pixels; reporting NaN")
        pos, neg = self.hist_pos.double().flip(0), self.hist_neg.double().flip(0)
        tps, fps = pos.cumsum(0), neg.cumsum(0)
        used = (pos + neg) > 0
        precision = tps[used] / (tps[used] + fps[used])
        return float((pos[used] / self.n_pos * precision).sum())

    def _pro_curve(self, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
        """FPR and PRO at each bin taken as threshold, highest first, from (0, 0), up to the first FPR > limit."""
        fpr = torch.cat([torch.zeros(1, dtype=torch.float64), self.hist_neg.double().flip(0).cumsum(0) / self.n_neg])
        pro = torch.cat([torch.zeros(1, dtype=torch.float64), self.hist_region.flip(0).cumsum(0) / self.regions])
        beyond = int(torch.searchsorted(fpr, torch.tensor([limit], dtype=torch.float64), right=True)[0])
        return fpr[: beyond + 1], pro[: beyond + 1]

    def aupro(self, limit: float = 0.3) -> float:
        """Area under PRO(FPR) for FPR in [0, limit], interpolated at the limit, divided by the limit."""
        if self.regions == 0 or self.n_neg == 0:
            return _nan("pixel AUPRO is undefined without anomalous regions and normal pixels; reporting NaN")
        fpr, pro = self._pro_curve(limit)
        if fpr[-1] > limit:  # cut the last segment at the limit
            share = (limit - fpr[-2]) / (fpr[-1] - fpr[-2])
            fpr, pro = (
                torch.cat([fpr[:-1], fpr.new_tensor([limit])]),
                torch.cat([pro[:-1], (pro[-2] + share * (pro[-1] - pro[-2])).view(1)]),
            )
        return float(torch.trapezoid(pro, fpr) / limit)

    def aupro_error_bound(self, limit: float = 0.3) -> float:
        """Largest possible |binned AUPRO - exact AUPRO| for the pixels seen so far."""
        if self.regions == 0 or self.n_neg == 0:
            return float("nan")
        fpr, pro = self._pro_curve(limit)
        bound = 0.5 * fpr.diff() * pro.diff()
        if fpr[-1] > limit:  # the cut segment: the exact curve may lie anywhere in its box
            bound[-1] = (limit - fpr[-2]) * (pro[-1] - pro[-2])
        return float(bound.sum() / limit)

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


class SegmentationMetrics:
    """Per-image segmentation scores at one threshold (MedCLIPSeg's ``utils/eval.py``): the Dice of each
    image, 1 when mask and prediction are both empty; the normalised surface Dice (NSD) at ``tolerance``
    pixels from DeepMind's ``surface-distance`` (the implementation MedCLIPSeg's eval copies), called as it
    calls it: each 2-D mask as a one-slice volume with 1 mm spacing; 1 when both are empty and 0 when only
    the mask is; each averaged over the test images. Holds two numbers an image.

    With ``native`` masks (each at its own size), the binary prediction is upsampled to each mask's size with
    nearest-neighbour (``cv2.INTER_NEAREST``'s rule: source pixel ``floor(i * in / out)``) and scored there, as
    MedCLIPSeg's ``utils/eval.py`` does; the NSD's tolerance is then in the mask's own pixels."""

    def __init__(self, threshold: float, tolerance: float = 2.0) -> None:
        self.threshold, self.tolerance = threshold, tolerance
        self.dice: list[float] = []
        self.nsd: list[float] = []

    def update(self, maps: torch.Tensor, masks: torch.Tensor, native: list[torch.Tensor] | None = None) -> None:
        from surface_distance import compute_surface_dice_at_tolerance, compute_surface_distances

        pred = maps.detach().cpu() >= self.threshold
        pairs = list(zip(pred, masks.detach().cpu().bool(), strict=True))
        if native is not None:
            pairs = [
                (F.interpolate(p[None, None].float(), size=tuple(t.shape), mode="nearest")[0, 0] > 0.5, t.bool())
                for p, t in zip(pred, native, strict=True)
            ]
        for p, t in pairs:
            total = int(p.sum()) + int(t.sum())
            self.dice.append(2 * int((p & t).sum()) / total if total else 1.0)
            p, t = p.numpy(), t.numpy()
            if not t.any():
                self.nsd.append(0.0 if p.any() else 1.0)
                continue
            if not p.any():
                self.nsd.append(0.0)
                continue
            with warnings.catch_warnings():  # it imports from scipy.ndimage's deprecated (pre-2.0) namespaces
                warnings.simplefilter("ignore", DeprecationWarning)
                distances = compute_surface_distances(t[..., None], p[..., None], (1, 1, 1))
            self.nsd.append(float(compute_surface_dice_at_tolerance(distances, self.tolerance)))

    def mean_dice(self) -> float:
        return float(np.mean(self.dice)) if self.dice else _nan("per-image Dice of no image; reporting NaN")

    def mean_nsd(self) -> float:
        return float(np.mean(self.nsd)) if self.nsd else _nan("NSD of no image; reporting NaN")


class CalibrationMetrics:
    """The expected calibration error of maps read as pixel probabilities (``bins`` equal-width bins:
    ``sum_b n_b / N |mean(y) - mean(p)|``), and the mean of uncertainty maps where a method gives them.
    Streaming: a few numbers a bin."""

    def __init__(self, bins: int = 15) -> None:
        self.bins = bins
        self.count = torch.zeros(bins, dtype=torch.float64)
        self.confidence = torch.zeros(bins, dtype=torch.float64)
        self.positive = torch.zeros(bins, dtype=torch.float64)
        self.uncertainty_sum, self.uncertainty_count = 0.0, 0

    def update(self, maps: torch.Tensor, masks: torch.Tensor, uncertainty: torch.Tensor | None = None) -> None:
        p = maps.detach().cpu().double().flatten().clamp(0, 1)
        y = masks.detach().cpu().flatten().double()
        index = (p * self.bins).long().clamp(max=self.bins - 1)
        self.count += torch.bincount(index, minlength=self.bins).double()
        self.confidence += torch.bincount(index, weights=p, minlength=self.bins)
        self.positive += torch.bincount(index, weights=y, minlength=self.bins)
        if uncertainty is not None:
            self.uncertainty_sum += float(uncertainty.detach().double().sum())
            self.uncertainty_count += uncertainty.numel()

    def ece(self) -> float:
        total = float(self.count.sum())
        if total == 0:
            return _nan("calibration error of no pixel; reporting NaN")
        return float((self.positive - self.confidence).abs().sum() / total)

    def uncertainty_mean(self) -> float | None:
        return self.uncertainty_sum / self.uncertainty_count if self.uncertainty_count else None
