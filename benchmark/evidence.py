"""Per-image evidence of a cell: enough to recompute every image metric and the dataset-level Dice exactly,
and to resample test images (confidence intervals, paired tests).

Per test image: its content key (SHA-1 of the file), name, score, label and, where the dataset has masks,
the pixel counts TP, FP, FN of ``map >= t`` at every tracked threshold (the sweep and the main one), counted
as ``PixelMetrics`` counts them (so summed over images they give its Dice bit for bit). A few example images
with their maps (the cell's figure samples) and the pixel ROC curve ride along for the report. Written per
cell as ``evidence.npz`` (a few kB per hundred images) and logged to MLflow.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmark.metrics import auroc_exact


class EvidenceWriter:
    """Accumulates a cell's per-image evidence batch by batch."""

    def __init__(self, thresholds: tuple[float, ...] | list[float], masks: bool) -> None:
        self.thresholds = tuple(sorted(set(float(t) for t in thresholds)))
        self.masks = masks
        self._thr = torch.tensor(self.thresholds, dtype=torch.float32)
        self.keys: list[str] = []
        self.names: list[str] = []
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []  # [B, 3, T]: TP, FP, FN

    def update(
        self,
        keys: tuple[str, ...],
        names: list[str],
        scores: torch.Tensor,
        labels: torch.Tensor,
        maps: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> None:
        self.keys += list(keys)
        self.names += names
        self.scores.append(scores.detach().cpu().double().numpy())
        self.labels.append(labels.detach().cpu().numpy().astype(np.int8))
        if self.masks and maps is not None and masks is not None:
            self.counts.append(pixel_counts(maps, masks, self._thr))

    def build(self, examples: dict[str, np.ndarray] | None = None, pixel_roc=None) -> Evidence:
        n = len(self.keys)
        counts = np.concatenate(self.counts) if self.counts else np.zeros((n, 3, 0), dtype=np.int64)
        return Evidence(
            keys=np.array(self.keys),
            names=np.array(self.names),
            scores=np.concatenate(self.scores) if self.scores else np.zeros(0),
            labels=np.concatenate(self.labels) if self.labels else np.zeros(0, dtype=np.int8),
            thresholds=np.array(self.thresholds if self.counts else (), dtype=np.float64),
            counts=counts,
            examples=examples or {},
            pixel_roc=pixel_roc,
        )


def pixel_counts(maps: torch.Tensor, masks: torch.Tensor, thresholds: torch.Tensor) -> np.ndarray:
    """Per image ``[B, 3, T]``: TP, FP, FN of ``map >= t`` for each threshold ``t`` (ascending), bucketed as
    ``PixelMetrics.update`` buckets (float32 scores, ``bucketize(right=True)``)."""
    b = maps.shape[0]
    scores = maps.detach().to("cpu", torch.float32).reshape(b, -1)
    truth = masks.detach().to("cpu").reshape(b, -1).bool()
    n = len(thresholds) + 1
    level = torch.bucketize(scores, thresholds, right=True)  # how many thresholds each pixel reaches
    pos = torch.zeros(b, n, dtype=torch.int64).scatter_add_(1, level, truth.long())
    neg = torch.zeros(b, n, dtype=torch.int64).scatter_add_(1, level, (~truth).long())
    # pixels reaching threshold j are those of level > j
    tp = pos.flip(1).cumsum(1).flip(1)[:, 1:]
    fp = neg.flip(1).cumsum(1).flip(1)[:, 1:]
    fn = truth.sum(1, keepdim=True) - tp
    return torch.stack([tp, fp, fn], 1).numpy()


@dataclass
class Evidence:
    keys: np.ndarray  # [N] content keys (str)
    names: np.ndarray  # [N] file names
    scores: np.ndarray  # [N] float64
    labels: np.ndarray  # [N] int8
    thresholds: np.ndarray  # [T] ascending; empty without masks
    counts: np.ndarray  # [N, 3, T] TP, FP, FN
    examples: dict[str, np.ndarray]  # names, images uint8 [k,S,S,3], masks bool, maps (and uncertainty) float16
    pixel_roc: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def has_masks(self) -> bool:
        return len(self.thresholds) > 0

    def image_auroc(self, idx: np.ndarray | None = None) -> float:
        idx = slice(None) if idx is None else idx
        return auroc_exact(self.scores[idx], self.labels[idx].astype(bool))

    def accuracy(self, threshold: float, idx: np.ndarray | None = None) -> float:
        idx = slice(None) if idx is None else idx
        return float(((self.scores[idx] >= threshold) == self.labels[idx].astype(bool)).mean())

    def dice(self, threshold: float, idx: np.ndarray | None = None) -> float:
        """Dataset-level Dice over the images ``idx`` (all by default), from their counts."""
        j = self._column(threshold)
        tp, fp, fn = (self.counts[:, :, j] if idx is None else self.counts[idx, :, j]).sum(0)
        return 2.0 * tp / (2.0 * tp + fp + fn) if tp + fp + fn else float("nan")

    def metric(self, name: str, threshold: float, idx: np.ndarray | None = None) -> float:
        if name == "image_auroc":
            return self.image_auroc(idx)
        if name == "image_accuracy":
            return self.accuracy(threshold, idx)
        if name == "dice":
            return self.dice(threshold, idx)
        raise ValueError(f"no per-image evidence for metric '{name}' (image_auroc, image_accuracy, dice)")

    def _column(self, threshold: float) -> int:
        hits = np.flatnonzero(np.isclose(self.thresholds, threshold, rtol=0, atol=1e-9))
        if not len(hits):
            raise ValueError(f"threshold {threshold} was not tracked (tracked: {self.thresholds.tolist()})")
        return int(hits[0])

    def to_bytes(self) -> bytes:
        arrays = {
            "keys": self.keys.astype(str),
            "names": self.names.astype(str),
            "scores": self.scores,
            "labels": self.labels,
            "thresholds": self.thresholds,
            "counts": self.counts,
            **{f"example_{k}": v for k, v in self.examples.items()},
        }
        if self.pixel_roc is not None:
            arrays["pixel_roc_fpr"], arrays["pixel_roc_tpr"] = self.pixel_roc
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def load(cls, path: Path | str) -> Evidence:
        with np.load(path, allow_pickle=False) as data:
            examples = {k.removeprefix("example_"): data[k] for k in data.files if k.startswith("example_")}
            roc = (data["pixel_roc_fpr"], data["pixel_roc_tpr"]) if "pixel_roc_fpr" in data.files else None
            return cls(
                data["keys"], data["names"], data["scores"], data["labels"], data["thresholds"], data["counts"],
                examples, roc,
            )  # fmt: skip
