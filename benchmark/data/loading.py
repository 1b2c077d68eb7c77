"""Image and mask loading: RGB float tensors in [0,1] at the protocol's size, masks by nearest neighbour.

Images are read once: the bytes give both the content hash (the image's identity for caches and
manifests) and the decoded picture. Normalisation (mean/std) is each method's own business. What is read
and what is refused: ``benchmark.data.decoding`` (8-bit images as RGB pictures; 16- and 32-bit grayscale
resized in floating point after scaling by their bit depth).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from benchmark.data.decoding import binary_mask, grayscale_float, high_depth, open_image
from benchmark.data.layout import Sample
from benchmark.errors import BenchmarkError


@dataclass(frozen=True)
class ImageBatch:
    """What a method sees at test time: images ``[B,3,S,S]`` in [0,1], their content hashes and their text
    descriptions where the dataset has them (else empty). No labels."""

    images: torch.Tensor
    keys: tuple[str, ...]
    texts: tuple[str | None, ...] = ()

    def first(self, n: int) -> ImageBatch:
        return ImageBatch(self.images[:n], self.keys[:n], self.texts[:n])


@dataclass(frozen=True)
class LabelledBatch:
    """A batch with its ground truth, for training (and for the harness's metrics)."""

    images: torch.Tensor
    keys: tuple[str, ...]
    labels: torch.Tensor
    masks: torch.Tensor
    paths: tuple[str, ...]
    texts: tuple[str | None, ...] = ()  # per-image descriptions (MedCLIPSeg layout), else empty

    def unlabelled(self) -> ImageBatch:
        return ImageBatch(self.images, self.keys, self.texts)

    def pin_memory(self) -> LabelledBatch:
        """Page-locked copies of the tensors (a DataLoader calls this with ``pin_memory=True``)."""
        return LabelledBatch(self.images.pin_memory(), self.keys, self.labels.pin_memory(),
                             self.masks.pin_memory(), self.paths, self.texts)  # fmt: skip


@dataclass(frozen=True)
class LoaderConfig:
    """How images are decoded: ``workers`` processes (0: in the calling process), page-locked batches and
    prefetching for a CUDA device. The order of batches never depends on ``workers``."""

    workers: int = 0
    pin_memory: bool = False
    resize: str = "bicubic"  # RESIZES


def decode_image(img: Image.Image, path: str, size: int, resize: str = "bicubic") -> torch.Tensor:
    """``[3,size,size]`` float in [0,1], grayscale repeated. ``resize``: ``bicubic``, PIL's (antialiased when it
    shrinks; as MVFA-AD and open_clip), or ``bilinear``, OpenCV's ``cv2.resize`` with its default
    ``INTER_LINEAR`` (half-pixel centres, no antialiasing; on the 8-bit image: MedCLIPSeg's loader)."""
    if high_depth(img):
        plane = grayscale_float(img, path)
        if resize == "bilinear":
            plane = _bilinear(plane, size)
        else:
            plane = np.asarray(Image.fromarray(plane).resize((size, size), Image.BICUBIC), dtype=np.float32)
        array = np.repeat(plane[..., None], 3, axis=2)
    elif resize == "bilinear":
        array = _bilinear(np.asarray(img.convert("RGB")), size).astype(np.float32) / 255.0
    else:
        array = np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1).clamp_(0.0, 1.0)


def _bilinear(array: np.ndarray, size: int) -> np.ndarray:
    """``cv2.resize(array, (size, size))``: ``INTER_LINEAR``, as MedCLIPSeg's loader calls it."""
    import cv2  # here, not at import: only this resize needs it

    return cv2.resize(np.ascontiguousarray(array), (size, size), interpolation=cv2.INTER_LINEAR)


def load_image(path: str, size: int, resize: str = "bicubic") -> tuple[torch.Tensor, str]:
    """Image as ``[3,size,size]`` float in [0,1] and the SHA-1 of its file."""
    img, key = open_image(path)
    return decode_image(img, path, size, resize), key


def load_mask(sample: Sample, size: int, image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Binary mask ``[size,size]`` (nearest-neighbour resize); all zero when the sample has no mask.

    ``image_size`` (width, height) is the size of the sample's image, which the mask must share."""
    if sample.mask is None:
        return torch.zeros(size, size, dtype=torch.bool)
    resized = Image.fromarray(binary_mask(sample, image_size).astype(np.uint8)).resize((size, size), Image.NEAREST)
    return torch.from_numpy(np.asarray(resized) > 0)


def native_mask(sample: Sample) -> torch.Tensor:
    """The sample's binary mask at its own size (all zero, at its image's size, when it has none)."""
    if sample.mask is None:
        with Image.open(sample.path) as img:
            width, height = img.size
        return torch.zeros(height, width, dtype=torch.bool)
    return torch.from_numpy(binary_mask(sample))


def load_sample(sample: Sample, size: int, resize: str = "bicubic") -> tuple[torch.Tensor, str, torch.Tensor]:
    """Image ``[3,size,size]``, its file's SHA-1 and its mask ``[size,size]``, checked against each other."""
    img, key = open_image(sample.path)
    return decode_image(img, sample.path, size, resize), key, load_mask(sample, size, img.size)


def load_batch(samples: Sequence[Sample], size: int, resize: str = "bicubic") -> LabelledBatch:
    return _collate([load_sample(s, size, resize) for s in samples], samples)


def _collate(loaded: list[tuple[torch.Tensor, str, torch.Tensor]], samples: Sequence[Sample]) -> LabelledBatch:
    return LabelledBatch(
        images=torch.stack([image for image, _, _ in loaded]),
        keys=tuple(key for _, key, _ in loaded),
        labels=torch.tensor([s.label for s in samples], dtype=torch.long),
        masks=torch.stack([mask for _, _, mask in loaded]),
        paths=tuple(s.path for s in samples),
        texts=tuple(s.text for s in samples) if any(s.text for s in samples) else (),
    )


class _Batches(torch.utils.data.Dataset):
    """Batch ``i`` of ``samples``: a DataLoader over it decodes whole batches in its worker processes."""

    def __init__(self, samples: Sequence[Sample], size: int, batch_size: int, resize: str) -> None:
        self.samples, self.size, self.batch_size, self.resize = list(samples), size, batch_size, resize

    def __len__(self) -> int:
        return (len(self.samples) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, i: int) -> LabelledBatch | BenchmarkError:
        try:
            return load_batch(self.samples[i * self.batch_size : (i + 1) * self.batch_size], self.size, self.resize)
        except BenchmarkError as exc:  # handed over whole: a DataLoader would rewrap it in a generic message
            return exc


def iterate_batches(
    samples: Sequence[Sample], size: int, batch_size: int, loader: LoaderConfig | None = None
) -> Iterator[LabelledBatch]:
    """Batches of ``samples`` in order; decoded ahead in ``loader.workers`` processes when there are any."""
    loader = loader or LoaderConfig()
    if loader.workers == 0 or len(samples) <= batch_size:
        for start in range(0, len(samples), batch_size):
            yield load_batch(samples[start : start + batch_size], size, loader.resize)
        return
    for batch in torch.utils.data.DataLoader(
        _Batches(samples, size, batch_size, loader.resize),
        batch_size=None,
        num_workers=loader.workers,
        pin_memory=loader.pin_memory,
        prefetch_factor=2,
    ):
        if isinstance(batch, BenchmarkError):
            raise batch
        yield batch
