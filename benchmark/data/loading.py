"""Image and mask loading: RGB float tensors in [0,1] at the protocol's size, masks by nearest neighbour.

Images are read once: the bytes give both the content hash (the image's identity for caches and
manifests) and the decoded picture. Normalisation (mean/std) is each method's own business.

What is read, and what is refused (a one-line ``BenchmarkError`` naming the file):

- 8-bit images (grayscale, RGB, RGBA, palette) are converted to RGB and resized as 8-bit pictures;
- 16- and 32-bit grayscale images (PNGs exported from DICOM, TIFFs) are scaled by their bit depth, never
  clipped at 255, and resized in floating point: 16-bit by ``2**16 - 1``, 32-bit integers by ``2**31 - 1``
  (Pillow holds them as signed 32-bit numbers; a negative value is an error); float images must already
  lie in [0, 1];
- masks must be binary: values in {0, 255} or {0, 1} (or {0, 65535} for 16-bit masks), any other value
  set is an error unless the dataset card sets ``mask_threshold`` (then ``mask > mask_threshold``);
- a mask must have its image's size, and the mask of an anomalous image must not be empty.
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

BINARY_VALUE_SETS = ({0, 1}, {0, 255}, {0, 65535})
_HIGH_DEPTH_MODES = {"I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16}


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


def _open(path: str) -> tuple[Image.Image, str]:
    data = Path(path).read_bytes()
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:
        raise BenchmarkError(f"image '{path}' cannot be read ({type(exc).__name__}: {exc})") from None
    return img, hashlib.sha1(data).hexdigest()


def bit_depth(img: Image.Image) -> int | None:
    """Bits per sample of a high-bit-depth grayscale image (16 or 32); None for 8-bit and float modes."""
    if img.mode in _HIGH_DEPTH_MODES:
        return _HIGH_DEPTH_MODES[img.mode]
    if img.mode == "I":  # 32-bit integer storage: a 16-bit PNG in older Pillow, or a TIFF of 16 or 32 bits
        if img.format == "PNG":
            return 16
        bits = getattr(img, "tag_v2", {}).get(258)
        bits = bits[0] if isinstance(bits, tuple) else bits
        return int(bits) if bits else 32
    return None


def _grayscale_float(img: Image.Image, path: str) -> np.ndarray:
    """A 16-, 32-bit or float grayscale image as float32 in [0, 1], scaled by its bit depth."""
    array = np.asarray(img).astype(np.float64)
    bits = bit_depth(img)
    if bits is not None:
        if array.min() < 0:
            raise BenchmarkError(f"image '{path}': negative values in a {bits}-bit image")
        return (array / (2.0 ** min(bits, 31) - 1.0)).astype(np.float32)
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise BenchmarkError(
            f"image '{path}': a float image must hold values in [0, 1] (found {array.min():g} to {array.max():g})"
        )
    return array.astype(np.float32)


def decode_image(img: Image.Image, path: str, size: int, resize: str = "bicubic") -> torch.Tensor:
    """``[3,size,size]`` float in [0,1], grayscale repeated. ``resize``: ``bicubic``, PIL's (antialiased when it
    shrinks; as MVFA-AD and open_clip), or ``bilinear``, OpenCV's ``cv2.resize`` with its default
    ``INTER_LINEAR`` (half-pixel centres, no antialiasing; on the 8-bit image: MedCLIPSeg's loader)."""
    if img.mode in _HIGH_DEPTH_MODES or img.mode in ("I", "F"):
        plane = _grayscale_float(img, path)
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
    img, key = _open(path)
    return decode_image(img, path, size, resize), key


def mask_values(img: Image.Image) -> np.ndarray:
    """A mask's raw values as a 2-D array (palette and colour masks through their grey levels)."""
    if img.mode == "1":
        return np.asarray(img).astype(np.uint8)
    if img.mode in _HIGH_DEPTH_MODES or img.mode in ("I", "F", "L"):
        return np.asarray(img)
    return np.asarray(img.convert("L"))


def binarize_mask(values: np.ndarray, path: str, threshold: float | None = None) -> np.ndarray:
    """``values > threshold`` where the card sets one; else a binary value set read as ``values > 0``."""
    if threshold is not None:
        return values > threshold
    found = set(np.unique(values).tolist())
    if not any(found <= allowed for allowed in BINARY_VALUE_SETS):
        shown = sorted(found)
        listed = ", ".join(f"{v:g}" for v in shown[:6]) + (", ..." if len(shown) > 6 else "")
        raise BenchmarkError(
            f"mask '{path}': values {{{listed}}} are not binary (expected {{0, 255}} or {{0, 1}}); "
            "binarise the masks, or set mask_threshold in the dataset card"
        )
    return values > 0


def load_mask(sample: Sample, size: int, image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Binary mask ``[size,size]`` (nearest-neighbour resize); all zero when the sample has no mask.

    ``image_size`` (width, height) is the size of the sample's image, which the mask must share."""
    if sample.mask is None:
        return torch.zeros(size, size, dtype=torch.bool)
    img, _ = _open(sample.mask)
    if image_size is not None and img.size != image_size:
        raise BenchmarkError(
            f"mask '{sample.mask}' is {img.size[0]}x{img.size[1]} but its image '{sample.path}' is "
            f"{image_size[0]}x{image_size[1]}"
        )
    binary = binarize_mask(mask_values(img), sample.mask, sample.mask_threshold)
    if sample.label and not sample.segmentation_only and not binary.any():
        raise BenchmarkError(f"mask '{sample.mask}' of the anomalous image '{sample.path}' is empty")
    resized = Image.fromarray(binary.astype(np.uint8)).resize((size, size), Image.NEAREST)
    return torch.from_numpy(np.asarray(resized) > 0)


def native_mask(sample: Sample) -> torch.Tensor:
    """The sample's binary mask at its own size (all zero, at its image's size, when it has none)."""
    if sample.mask is None:
        with Image.open(sample.path) as img:
            width, height = img.size
        return torch.zeros(height, width, dtype=torch.bool)
    img, _ = _open(sample.mask)
    return torch.from_numpy(binarize_mask(mask_values(img), sample.mask, sample.mask_threshold))


def load_sample(sample: Sample, size: int, resize: str = "bicubic") -> tuple[torch.Tensor, str, torch.Tensor]:
    """Image ``[3,size,size]``, its file's SHA-1 and its mask ``[size,size]``, checked against each other."""
    img, key = _open(sample.path)
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
