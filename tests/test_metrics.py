import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from benchmark.metrics import METRICS, ImageMetrics, PixelMetrics, auroc_exact

SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _dice(maps, masks, t):
    pred = maps >= t
    inter = np.logical_and(pred, masks).sum()
    return 2 * inter / (pred.sum() + masks.sum())


def _feed(metric: PixelMetrics, maps: np.ndarray, masks: np.ndarray, batch: int = 3) -> None:
    for i in range(0, len(maps), batch):
        metric.update(torch.from_numpy(maps[i : i + batch]), torch.from_numpy(masks[i : i + batch]))


@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_and_accuracy_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 301)
    scores = np.round(rng.random(301) + 0.3 * labels, 1)  # rounding makes many ties
    m = ImageMetrics()
    for i in range(0, 301, 50):
        m.update(torch.from_numpy(scores[i : i + 50]), torch.from_numpy(labels[i : i + 50]))
    assert m.auroc() == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    for t in SWEEP:
        assert m.accuracy(t) == pytest.approx(np.mean((scores >= t) == labels))


def test_auroc_all_equal_scores_is_half():
    labels = np.array([0, 1, 0, 1, 1])
    assert auroc_exact(np.full(5, 0.3), labels) == pytest.approx(roc_auc_score(labels, np.full(5, 0.3))) == 0.5


def test_auroc_one_class_is_nan_with_warning():
    with pytest.warns(RuntimeWarning, match="one class"):
        assert np.isnan(auroc_exact(np.array([0.1, 0.9]), np.array([1, 1])))
    pix = PixelMetrics(SWEEP)
    pix.update(torch.rand(2, 8, 8), torch.zeros(2, 8, 8, dtype=torch.bool))
    with pytest.warns(RuntimeWarning):
        assert np.isnan(pix.auroc())
    with pytest.warns(RuntimeWarning):
        assert np.isnan(pix.dice(0.5))


@pytest.mark.parametrize("seed", range(4))
def test_pixel_auroc_within_documented_bound_and_dice_exact(seed):
    rng = np.random.default_rng(seed)
    masks = rng.random((7, 33, 29)) < 0.2
    maps = np.clip(rng.random((7, 33, 29)) * 0.7 + 0.3 * masks, 0, 1).astype(np.float32)
    pix = PixelMetrics(SWEEP)
    _feed(pix, maps, masks)
    exact = roc_auc_score(masks.ravel(), maps.ravel())
    assert abs(pix.auroc() - exact) <= pix.auroc_error_bound() + 1e-12
    assert pix.auroc_error_bound() < 1e-3
    for t in SWEEP:
        assert pix.dice(t) == pytest.approx(_dice(maps, masks, t), abs=1e-12)


def test_pixel_auroc_adversarial_ties_and_edges():
    # scores on exact threshold values, at 0 and 1, and all inside one histogram bin
    rng = np.random.default_rng(7)
    masks = rng.random((4, 16, 16)) < 0.5
    maps = rng.choice(np.array([0.0, 0.1, 0.5, 0.9, 1.0], dtype=np.float32), size=(4, 16, 16))
    pix = PixelMetrics(SWEEP)
    _feed(pix, maps, masks)
    assert pix.auroc() == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    for t in SWEEP:
        assert pix.dice(t) == pytest.approx(_dice(maps, masks, t), abs=1e-12)
    # every score in one bin: the bound is 0.5 and the error reaches it only as far as the bound allows
    same_bin = (0.5 + rng.random((2, 8, 8)) * 1e-6).astype(np.float32)
    masks2 = same_bin > np.median(same_bin)
    pix2 = PixelMetrics(SWEEP)
    _feed(pix2, same_bin, masks2)
    assert pix2.auroc() == 0.5
    assert pix2.auroc_error_bound() == pytest.approx(0.5)
    assert abs(pix2.auroc() - roc_auc_score(masks2.ravel(), same_bin.ravel())) <= pix2.auroc_error_bound()


def test_all_equal_maps_and_memory_is_fixed():
    pix = PixelMetrics(SWEEP, bins=1024)
    before = (pix.hist_pos.numel(), pix.level_pos.numel())
    masks = torch.zeros(3, 20, 20, dtype=torch.bool)
    masks[:, 5:9, 5:9] = True
    for _ in range(5):
        pix.update(torch.full((3, 20, 20), 0.5), masks)
    assert (pix.hist_pos.numel(), pix.level_pos.numel()) == before
    assert pix.auroc() == 0.5
    assert pix.dice(0.5) == pytest.approx(2 * 240 / (6000 + 240))
    assert pix.dice(0.6) == 0.0


def test_metric_directions_declared():
    lower = {"pixel_ece", "uncertainty_mean"}  # a calibration error and an uncertainty: lower is better
    assert all(m.higher_is_better == (name not in lower) for name, m in METRICS.items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = ImageMetrics()
        m.update(torch.tensor([0.2, 0.8]), torch.tensor([0, 1]))
        assert m.auroc() == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_image_aupr_and_f1_max_match_references(seed):
    from sklearn.metrics import average_precision_score, precision_recall_curve

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 157)
    scores = np.round(rng.random(157) + 0.4 * labels, 1 + seed % 2)  # ties
    m = ImageMetrics()
    m.update(torch.from_numpy(scores), torch.from_numpy(labels))
    assert m.aupr() == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0)
    assert m.f1_max() == pytest.approx(f1.max(), abs=1e-12)


def _maps(seed: int, n: int = 6, side: int = 24, quantise: bool = False):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, side, side), dtype=bool)
    for i in range(n - 2):  # two normal images
        for _ in range(1 + i % 3):
            y, x, h, w = rng.integers(0, side - 6, 2).tolist() + rng.integers(1, 6, 2).tolist()
            masks[i, y : y + h, x : x + w] = True
    maps = np.clip(rng.random(masks.shape) * 0.7 + 0.35 * masks, 0, 1).astype(np.float32)
    if quantise:
        maps = np.round(maps * 255) / 255  # 8-bit maps: many ties
    return maps.astype(np.float32), masks


def test_pixel_aupr_is_average_precision_of_the_binned_maps(synth_root):
    from sklearn.metrics import average_precision_score

    maps, masks = _maps(0)
    m = PixelMetrics(SWEEP)
    _feed(m, maps, masks)
    binned = np.minimum(np.floor(maps.astype(np.float64) * m.bins), m.bins - 1)  # the bins the metric keeps
    assert m.aupr() == pytest.approx(average_precision_score(masks.ravel(), binned.ravel()), abs=1e-12)
    assert m.aupr() == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-4)


def _exact_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Direct per-region computation: every distinct score a threshold, each region's overlap counted."""
    from scipy import ndimage

    regions = []
    for amap, mask in zip(maps, masks, strict=True):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [amap[labels == k] for k in range(1, n + 1)]
    normal = maps[~masks]
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fpr.append(float((normal >= t).mean()))
        pro.append(float(np.mean([(r >= t).mean() for r in regions])))
    fpr, pro = np.array(fpr), np.array(pro)
    k = int(np.searchsorted(fpr, limit, side="right"))
    if k < len(fpr):
        cut = pro[k - 1] + (limit - fpr[k - 1]) / (fpr[k] - fpr[k - 1]) * (pro[k] - pro[k - 1])
        fpr, pro = np.r_[fpr[:k], limit], np.r_[pro[:k], cut]
    return float(np.trapezoid(pro, fpr) / limit)


@pytest.mark.parametrize(("seed", "quantise"), [(0, False), (1, False), (2, True), (3, True)])
def test_pixel_aupro_matches_a_direct_per_region_computation(seed, quantise):
    maps, masks = _maps(seed, quantise=quantise)
    m = PixelMetrics(SWEEP)
    _feed(m, maps, masks)
    exact = _exact_aupro(maps, masks)
    assert 0.0 < exact < 1.0
    assert abs(m.aupro() - exact) <= m.aupro_error_bound() + 1e-9
    if not quantise:  # 8-bit maps put whole runs of tied pixels in one bin: the bound is loose, not the value
        assert m.aupro_error_bound() < 1e-3


def test_aupro_regions_are_eight_connected():
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True  # touch at a corner: one region
    masks[0, 5, 5] = True  # another
    m = PixelMetrics(SWEEP)
    m.update(torch.rand(1, 8, 8), torch.from_numpy(masks))
    assert m.regions == 2
