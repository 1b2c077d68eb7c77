"""Time and peak memory of our streaming pixel metrics against scikit-learn, side by side in one run.

    python tests/perf/metrics.py [--pixels 50000000] [--batch 16]

Ours: ``PixelMetrics.update`` over batches of ``batch x 240 x 240`` maps (pixel AUROC from 65,536-bin
histograms and exact Dice at the nine sweep thresholds). scikit-learn: ``roc_auc_score`` plus one Dice per
threshold on the whole flattened array, which it needs in memory at once. Peak memory is measured with
tracemalloc (numpy and torch CPU allocations are both traced) for each side separately.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from benchmark.metrics import PixelMetrics

SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SIDE = 240


def make_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    masks = rng.random((n, SIDE, SIDE)) < 0.05
    maps = np.clip(rng.random((n, SIDE, SIDE), dtype=np.float32) * 0.8 + 0.2 * masks, 0, 1).astype(np.float32)
    return maps, masks


def ours(total: int, batch: int, seed: int) -> tuple[float, float, float, float]:
    rng = np.random.default_rng(seed)
    metric = PixelMetrics(SWEEP)
    elapsed, done = 0.0, 0
    tracemalloc.start()
    while done < total:
        n = min(batch, (total - done) // (SIDE * SIDE) or 1)
        maps, masks = make_batch(rng, n)  # generation is not timed, but its memory is traced like sklearn's
        t0 = time.perf_counter()
        metric.update(torch.from_numpy(maps), torch.from_numpy(masks))
        elapsed += time.perf_counter() - t0
        done += maps.size
    t0 = time.perf_counter()
    auc, dice = metric.auroc(), metric.dice(0.5)
    elapsed += time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return elapsed, peak, auc, dice


def sklearn(total: int, batch: int, seed: int) -> tuple[float, float, float, float]:
    rng = np.random.default_rng(seed)
    tracemalloc.start()
    parts_maps, parts_masks, done = [], [], 0
    while done < total:
        n = min(batch, (total - done) // (SIDE * SIDE) or 1)
        maps, masks = make_batch(rng, n)
        parts_maps.append(maps)
        parts_masks.append(masks)
        done += maps.size
    t0 = time.perf_counter()
    maps = np.concatenate(parts_maps).ravel()
    masks = np.concatenate(parts_masks).ravel()
    del parts_maps, parts_masks
    auc = roc_auc_score(masks, maps)
    dice = {}
    for t in SWEEP:
        pred = maps >= t
        dice[t] = 2 * np.logical_and(pred, masks).sum() / (pred.sum() + masks.sum())
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return elapsed, peak, auc, dice[0.5]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pixels", type=int, default=50_000_000)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    t_ours, m_ours, auc_ours, dice_ours = ours(args.pixels, args.batch, 0)
    t_sk, m_sk, auc_sk, dice_sk = sklearn(args.pixels, args.batch, 0)
    mib = 1024 * 1024
    print(f"pixels: {args.pixels:,} in batches of {args.batch}x{SIDE}x{SIDE}")
    print(f"{'':22s}{'ours (streaming)':>20s}{'scikit-learn':>16s}{'ratio sk/ours':>16s}")
    print(f"{'time, s':22s}{t_ours:20.2f}{t_sk:16.2f}{t_sk / t_ours:16.2f}")
    print(f"{'peak memory, MiB':22s}{m_ours / mib:20.1f}{m_sk / mib:16.1f}{m_sk / m_ours:16.1f}")
    print(f"{'pixel AUROC':22s}{auc_ours:20.6f}{auc_sk:16.6f}{'|diff| ' + format(abs(auc_ours - auc_sk), '.1e'):>16s}")
    print(
        f"{'Dice @ 0.5':22s}{dice_ours:20.6f}{dice_sk:16.6f}{'|diff| ' + format(abs(dice_ours - dice_sk), '.1e'):>16s}"
    )


if __name__ == "__main__":
    main()
