"""On-disk cache of frozen features, one file per image and recipe.

A recipe names everything the features depend on (backbone, weights, image size, layers, what is
computed); its hash is the folder, and the image file's content hash is the file name. Features are computed
in chunks of exactly ``CHUNK`` images (the last one padded with copies of its last image): matrix kernels
are chosen by batch size, so an image encoded alone differs in its last bits from the same image in a full
batch; with one shape for every call, an image's features do not depend on which other images were missing
with it, and a resumed run or a recomputed entry gives the very bits of an uninterrupted run. Writes are atomic
(a file of the writer's own, then a rename), so concurrent writers of one key and interrupted runs never
leave a half-written entry; an entry that cannot be read all the same (a disk that filled up, a copy cut
short) is reported in one line, removed and computed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmark import precision

Features = dict[str | int, torch.Tensor]
CHUNK = 8  # images per feature computation, whatever the batch (see the module docstring)


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` to a file of this process and thread, then rename it over ``path`` (atomic on POSIX)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def computed_in_chunks(compute: Callable[[torch.Tensor], Features], images: torch.Tensor) -> Features:
    """``compute`` over ``images`` in chunks of exactly ``CHUNK`` images, the last padded with copies of its last
    image (their features dropped): each image's features are the same bits in any batch."""
    parts: list[Features] = []
    for start in range(0, len(images), CHUNK):
        chunk = images[start : start + CHUNK]
        n = len(chunk)
        if n < CHUNK:
            chunk = torch.cat([chunk, chunk[-1:].expand(CHUNK - n, *chunk.shape[1:])])
        parts.append({name: value[:n] for name, value in compute(chunk).items()})
    if len(parts) == 1:
        return parts[0]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def _serialised(entry: Features) -> bytes:
    """``torch.save`` to memory: a full disk then fails the write with "No space left on device", where torch's
    own writer said "unexpected pos"."""
    buffer = io.BytesIO()
    torch.save(entry, buffer)
    return buffer.getvalue()


class FeatureCache:
    """``cached(recipe, keys, images, compute)``: per-image features, computed only for cache misses."""

    def __init__(self, root: str | Path | None, inputs: dict | None = None) -> None:
        self.root = Path(root) if root is not None else None
        self.inputs = inputs or {}  # how the images were decoded, where not the default (``resize``)
        self.hits = 0
        self.misses = 0
        self.bypass = False

    def full_recipe(self, recipe: dict) -> dict:
        """The recipe with the active precision where it is not fp32 (``benchmark.precision``) and the images'
        decoding where it is not the default: features computed in bf16, or of bilinearly resized images, never
        stand in for others."""
        name = precision.active().name
        recipe = recipe if name == precision.DEFAULT else {**recipe, "precision": name}
        return {**recipe, **self.inputs}

    def namespace(self, recipe: dict) -> str:
        return hashlib.sha1(json.dumps(self.full_recipe(recipe), sort_keys=True, default=str).encode()).hexdigest()[:16]

    @contextlib.contextmanager
    def bypassed(self):
        """Inside, every call computes directly, reading and writing nothing: a forward pass as it costs without
        the cache (``benchmark.efficiency`` counts its FLOPs)."""
        self.bypass = True
        try:
            yield
        finally:
            self.bypass = False

    def entry(self, recipe: dict, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One tensor cached whole under ``key`` (a prompt list's text embeddings), computed when missing (``hits``
        and ``misses`` count per-image features only)."""
        if self.root is None or self.bypass:
            return compute()
        path = self._path(self.namespace(recipe), key)
        found = self._read(path)
        if found is not None:
            return found["value"]
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"value": value.detach().cpu().clone()}
        _atomic(path, lambda tmp: tmp.write_bytes(_serialised(entry)))
        self._write_recipe(recipe)
        return value

    def _path(self, ns: str, key: str) -> Path:
        assert self.root is not None
        return self.root / ns / key[:2] / f"{key}.pt"

    @staticmethod
    def _read(path: Path) -> Features | None:
        """The entry at ``path``; None when absent, or when unreadable (then removed, with one warning line)."""
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu")
            if not isinstance(entry, dict) or not all(isinstance(v, torch.Tensor) for v in entry.values()):
                raise ValueError("not a mapping of tensors")
            return entry
        except Exception as exc:
            print(
                f"warning: feature cache entry '{path}' is corrupt ({type(exc).__name__}); removed and recomputed",
                file=sys.stderr,
            )
            path.unlink(missing_ok=True)
            return None

    def _write_recipe(self, recipe: dict) -> None:
        """``recipe.json`` beside a recipe's entries, once: what they were computed with."""
        assert self.root is not None
        path = self.root / self.namespace(recipe) / "recipe.json"
        if not path.exists():
            text = json.dumps(self.full_recipe(recipe), indent=1, default=str)
            _atomic(path, lambda tmp: tmp.write_text(text))

    def cached(
        self, recipe: dict, keys: Sequence[str], images: torch.Tensor, compute: Callable[[torch.Tensor], Features]
    ) -> Features:
        """Features of a batch, stacked on dim 0; ``compute`` sees only the images whose entry is missing."""
        if self.bypass:
            return compute(images)
        if self.root is None:
            self.misses += len(keys)
            return computed_in_chunks(compute, images)
        ns = self.namespace(recipe)
        found = [self._read(self._path(ns, key)) for key in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = computed_in_chunks(compute, images[missing])
            for j, i in enumerate(missing):
                entry = {name: value[j].detach().cpu().clone() for name, value in fresh.items()}
                found[i] = entry
                path = self._path(ns, keys[i])
                path.parent.mkdir(parents=True, exist_ok=True)
                _atomic(path, lambda tmp, entry=entry: tmp.write_bytes(_serialised(entry)))
                self._write_recipe(recipe)
        device = images.device
        return {name: torch.stack([f[name] for f in found]).to(device) for name in found[0]}
