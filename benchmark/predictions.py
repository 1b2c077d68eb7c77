"""``--save-predictions``: a cell's raw outputs streamed to ``predictions.npz`` without holding all maps.

Keys: ``paths``, ``image_scores``, ``image_labels``, ``maps`` (float32, at the masks' resolution, which is the
protocol's ``image_size``), ``masks`` (bool) and, for methods that give them, ``uncertainty`` maps
(float32). Maps and masks are written batch by batch into ``.npy``
files on disk, then stored (uncompressed) in the ``.npz`` archive.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch


class PredictionWriter:
    def __init__(self, path: Path, count: int, size: int) -> None:
        self.path = path
        self.tmp = path.parent / "predictions.tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.maps = np.lib.format.open_memmap(
            self.tmp / "maps.npy", mode="w+", dtype=np.float32, shape=(count, size, size)
        )
        self.masks = np.lib.format.open_memmap(self.tmp / "masks.npy", mode="w+", dtype=bool, shape=(count, size, size))
        self.paths: list[str] = []
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.uncertainty: np.memmap | None = None  # created at the first batch that has uncertainty maps
        self.n = 0

    def add(
        self,
        paths,
        scores: torch.Tensor,
        labels: torch.Tensor,
        maps: torch.Tensor,
        masks: torch.Tensor,
        uncertainty: torch.Tensor | None = None,
    ) -> None:
        b = len(paths)
        if uncertainty is not None:
            if self.uncertainty is None:
                self.uncertainty = np.lib.format.open_memmap(
                    self.tmp / "uncertainty.npy", mode="w+", dtype=np.float32, shape=self.maps.shape
                )
            self.uncertainty[self.n : self.n + b] = uncertainty.detach().cpu().float().numpy()
        self.maps[self.n : self.n + b] = maps.detach().cpu().float().numpy()
        self.masks[self.n : self.n + b] = masks.cpu().numpy()
        self.paths += list(paths)
        self.scores.append(scores.detach().cpu().double().numpy())
        self.labels.append(labels.cpu().numpy())
        self.n += b

    def close(self) -> Path:
        self.maps.flush()
        self.masks.flush()
        names = ["paths", "image_scores", "image_labels", "maps", "masks"]
        if self.uncertainty is not None:
            self.uncertainty.flush()
            names.append("uncertainty")
        del self.maps, self.masks, self.uncertainty
        small = {
            "paths": np.array(self.paths),
            "image_scores": np.concatenate(self.scores),
            "image_labels": np.concatenate(self.labels),
        }
        for name, value in small.items():
            np.save(self.tmp / f"{name}.npy", value)
        partial = self.path.with_suffix(".npz.partial")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name in names:
                zf.write(self.tmp / f"{name}.npy", f"{name}.npy")
        partial.replace(self.path)
        for f in self.tmp.iterdir():
            f.unlink()
        self.tmp.rmdir()
        return self.path
