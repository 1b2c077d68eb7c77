"""Score statistics and model selection on images the harness lets a method see: never the test set.

The official code of MVFA, AA-CLIP and MadCLIP min-max normalises its raw maps and scores over the test set and
keeps the epoch best on it. Here the statistics come from calibration images (the target's validation images
not used for training, else the training images) and the epoch is chosen on the validation images:
``minmax`` gathers the statistics, ``scale`` applies them (clamped to [0, 1]: test values beyond the calibration
range tie), ``squash`` likewise but strictly increasing everywhere (no ties: rankings, hence AUROCs, stay those
of the raw values, as under the code's test-set min-max), ``beyond`` the same for one-class methods calibrated on
their normal training images (test anomalies lie beyond that range: room for them above 0.5), ``selection_score``
is the criterion (image AUROC plus pixel AUROC where the dataset has masks, as those codes sum them).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from benchmark.metrics import ImageMetrics, PixelMetrics

Stats = dict[str, tuple[float, float]]


def minmax(outputs: dict[str, list[torch.Tensor]]) -> Stats:
    """The minimum and maximum of each named output over all its batches."""
    return {k: (float(torch.cat(v).min()), float(torch.cat(v).max())) for k, v in outputs.items()}


def ranges(outputs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Stats:
    """``{"image", "map"}`` statistics of ``(image scores, maps)`` batches, keeping only each batch's map range
    (calibrating on thousands of images never holds their pixels)."""
    images, maps = [], []
    for score, batch_maps in outputs:
        images.append(score.detach().flatten().cpu())
        maps.append(torch.stack([batch_maps.amin(), batch_maps.amax()]).detach().cpu())
    return minmax({"image": images, "map": maps})


def scale(value: torch.Tensor, stats: tuple[float, float]) -> torch.Tensor:
    """``(v - min) / (max - min)``, clamped to [0, 1]."""
    low, high = stats
    return ((value - low) / max(high - low, 1e-12)).clamp(0, 1)


def squash(value: torch.Tensor, stats: tuple[float, float], margin: float = 1e-3) -> torch.Tensor:
    """The min-max value ``u`` as ``(1 - 2 m) u + m`` on [0, 1] (0.5 stays 0.5), continued below and above by
    tails ``m / (1 + s |u - edge|)`` of the same slope that approach 0 and 1: strictly increasing, in (0, 1) (in
    float32 values beyond about 17 ranges past the maximum round to the same score)."""
    low, high = stats
    u = (value - low) / max(high - low, 1e-12)
    slope = (1 - 2 * margin) / margin
    inside = (1 - 2 * margin) * u + margin
    below = margin / (1 - slope * u.clamp(max=0))
    above = 1 - margin / (1 + slope * (u - 1).clamp(min=0))
    return torch.where(u < 0, below, torch.where(u > 1, above, inside))


def beyond(value: torch.Tensor, stats: tuple[float, float]) -> torch.Tensor:
    """For a one-class method whose statistics come from its normal training images, which anomalies exceed: the
    training range onto [1/3, 1/2] (0.5: the training maximum), above it ``t / (t + 2)`` of ``t = 2 + (v - max) /
    width`` towards 1 (float32 keeps values 1 % apart distinct up to some 10^5 widths past the maximum, where
    ``squash``'s narrow margin ties them after a few), below it a matching exponential towards 0: strictly
    increasing and smooth. ``width`` is the range, at least 1e-3 of the values' magnitude below the maximum (one
    training image gives no range)."""
    low, high = stats
    width = max(high - low, 1e-3 * (abs(high) + abs(low)), 1e-12)
    t = 2 + (value - high) / width
    return torch.where(t >= 1, t / (t + 2), torch.exp((t.clamp(max=1) - 1) * 2 / 3) / 3)


def selection_score(
    predictions: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]], masks: bool
) -> float:
    """Image AUROC (+ pixel AUROC when ``masks``) of ``(image scores, maps, labels, masks)`` batches; 0 for a
    metric the images cannot give (one class only)."""
    images, pixels = ImageMetrics(), PixelMetrics((0.5,))
    for scores, maps, labels, truth in predictions:
        images.update(scores.cpu(), labels)
        pixels.update(maps.cpu(), truth)
    score = images.auroc() if len(set(images.labels.tolist())) == 2 else 0.0
    if masks and pixels.n_pos and pixels.n_neg:
        score += pixels.auroc()
    return float(np.nan_to_num(score))
