"""Image and mask loading: RGB float tensors in [0,1] at the protocol's size, masks by nearest neighbour.

Images are read once: the bytes give both the content hash (the image's identity for caches and
manifests) and the decoded picture. Normalisation (mean/std) is each method's own business.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmark.data.layout import Sample
from benchmark.errors import BenchmarkError


@dataclass(frozen=True)
class ImageBatch:
    """What a method sees at test time: images ``[B,3,S,S]`` in [0,1] and their content hashes. No labels."""

    images: torch.Tensor
    keys: tuple[str, ...]


@dataclass(frozen=True)
class LabelledBatch:
    """A batch with its ground truth, for training (and for the harness's metrics)."""

    images: torch.Tensor
    keys: tuple[str, ...]
    labels: torch.Tensor
    masks: torch.Tensor
    paths: tuple[str, ...]

    def unlabelled(self) -> ImageBatch:
        return ImageBatch(self.images, self.keys)


def _open(path: str, mode: str) -> tuple[Image.Image, str]:
    data = Path(path).read_bytes()
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:
        raise BenchmarkError(f"image '{path}' cannot be read ({type(exc).__name__}: {exc})") from None
    return img.convert(mode), hashlib.sha1(data).hexdigest()


def load_image(path: str, size: int) -> tuple[torch.Tensor, str]:
    """Image as ``[3,size,size]`` float in [0,1] (bicubic resize, as MVFA-AD and open_clip) and its hash."""
    img, key = _open(path, "RGB")
    img = img.resize((size, size), Image.BICUBIC)
    array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).clamp_(0.0, 1.0), key


def load_mask(path: str | None, size: int) -> torch.Tensor:
    """Binary mask ``[size,size]`` (nearest-neighbour resize); all zero when ``path`` is None."""
    if path is None:
        return torch.zeros(size, size, dtype=torch.bool)
    img, _ = _open(path, "L")
    img = img.resize((size, size), Image.NEAREST)
    return torch.from_numpy(np.asarray(img) > 127)


def load_batch(samples: Sequence[Sample], size: int) -> LabelledBatch:
    loaded = [load_image(s.path, size) for s in samples]
    return LabelledBatch(
        images=torch.stack([img for img, _ in loaded]),
        keys=tuple(key for _, key in loaded),
        labels=torch.tensor([s.label for s in samples], dtype=torch.long),
        masks=torch.stack([load_mask(s.mask, size) for s in samples]),
        paths=tuple(s.path for s in samples),
    )


def iterate_batches(samples: Sequence[Sample], size: int, batch_size: int) -> Iterator[LabelledBatch]:
    for start in range(0, len(samples), batch_size):
        yield load_batch(samples[start : start + batch_size], size)
