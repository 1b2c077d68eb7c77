"""On-disk cache of frozen features, one file per image and recipe.

A recipe names everything the features depend on (backbone, weights, image size, layers, what is
computed); its hash is the folder, and the image file's content hash is the file name. Writes are atomic,
so an interrupted run never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

Features = dict[str | int, torch.Tensor]


class FeatureCache:
    """``cached(recipe, keys, images, compute)``: per-image features, computed only for cache misses."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    @staticmethod
    def namespace(recipe: dict) -> str:
        return hashlib.sha1(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _path(self, ns: str, key: str) -> Path:
        assert self.root is not None
        return self.root / ns / key[:2] / f"{key}.pt"

    def cached(
        self, recipe: dict, keys: Sequence[str], images: torch.Tensor, compute: Callable[[torch.Tensor], Features]
    ) -> Features:
        """Features of a batch, stacked on dim 0; ``compute`` sees only the images whose entry is missing."""
        if self.root is None:
            self.misses += len(keys)
            return compute(images)
        ns = self.namespace(recipe)
        found: list[Features | None] = []
        for key in keys:
            path = self._path(ns, key)
            found.append(torch.load(path, map_location="cpu") if path.is_file() else None)
        missing = [i for i, f in enumerate(found) if f is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = compute(images[missing])
            for j, i in enumerate(missing):
                entry = {name: value[j].detach().cpu().clone() for name, value in fresh.items()}
                found[i] = entry
                path = self._path(ns, keys[i])
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save(entry, tmp)
                os.replace(tmp, path)
                if ns and not (self.root / ns / "recipe.json").exists():
                    (self.root / ns / "recipe.json").write_text(json.dumps(recipe, indent=1, default=str))
        device = images.device
        return {name: torch.stack([f[name] for f in found]).to(device) for name in found[0]}
