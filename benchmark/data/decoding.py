"""What is read, and what is refused (a one-line ``BenchmarkError`` naming the file): the rules a run decodes
images and masks by, and ``verify-data --deep`` checks a copy with. Torch-free, so checking processes start fast.

- 8-bit images (grayscale, RGB, RGBA, palette) are read as 8-bit pictures (``benchmark.data.loading`` converts
  them to RGB);
- 16- and 32-bit grayscale images (PNGs exported from DICOM, TIFFs) are scaled by their bit depth, never
  clipped at 255: 16-bit by ``2**16 - 1``, 32-bit integers by ``2**31 - 1`` (Pillow holds them as signed 32-bit
  numbers; a negative value is an error); float images must already lie in [0, 1];
- masks must be binary: values in {0, 255} or {0, 1} (or {0, 65535} for 16-bit masks), any other value
  set is an error unless the dataset card sets ``mask_threshold`` (then ``mask > mask_threshold``);
- a mask must have its image's size, and the mask of an anomalous image must not be empty (but in
  segmentation-only sets, where every image is labelled a lesion).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

from benchmark.data.layout import Sample
from benchmark.errors import BenchmarkError

BINARY_VALUE_SETS = ({0, 1}, {0, 255}, {0, 65535})
HIGH_DEPTH_MODES = {"I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16}


def open_image(path: str) -> tuple[Image.Image, str]:
    """The decoded picture of ``path`` and the SHA-1 of its bytes (read once)."""
    data = Path(path).read_bytes()
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:
        raise BenchmarkError(f"image '{path}' cannot be read ({type(exc).__name__}: {exc})") from None
    return img, hashlib.sha1(data).hexdigest()


def bit_depth(img: Image.Image) -> int | None:
    """Bits per sample of a high-bit-depth grayscale image (16 or 32); None for 8-bit and float modes."""
    if img.mode in HIGH_DEPTH_MODES:
        return HIGH_DEPTH_MODES[img.mode]
    if img.mode == "I":  # 32-bit integer storage: a 16-bit PNG in older Pillow, or a TIFF of 16 or 32 bits
        if img.format == "PNG":
            return 16
        bits = getattr(img, "tag_v2", {}).get(258)
        bits = bits[0] if isinstance(bits, tuple) else bits
        return int(bits) if bits else 32
    return None


def high_depth(img: Image.Image) -> bool:
    """Whether an image is read as a 16-, 32-bit or float grayscale plane (``grayscale_float``), not as 8 bits."""
    return img.mode in HIGH_DEPTH_MODES or img.mode in ("I", "F")


def grayscale_float(img: Image.Image, path: str) -> np.ndarray:
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


def mask_values(img: Image.Image) -> np.ndarray:
    """A mask's raw values as a 2-D array (palette and colour masks through their grey levels)."""
    if img.mode == "1":
        return np.asarray(img).astype(np.uint8)
    if img.mode in HIGH_DEPTH_MODES or img.mode in ("I", "F", "L"):
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


def binary_mask(sample: Sample, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """The sample's mask as a boolean array at its own size, checked: binary (or the card's threshold), of its
    image's size ``image_size`` (width, height) when given, not empty for an anomalous image."""
    assert sample.mask is not None
    img, _ = open_image(sample.mask)
    if image_size is not None and img.size != image_size:
        raise BenchmarkError(
            f"mask '{sample.mask}' is {img.size[0]}x{img.size[1]} but its image '{sample.path}' is "
            f"{image_size[0]}x{image_size[1]}"
        )
    binary = binarize_mask(mask_values(img), sample.mask, sample.mask_threshold)
    if sample.label and not sample.segmentation_only and not binary.any():
        raise BenchmarkError(f"mask '{sample.mask}' of the anomalous image '{sample.path}' is empty")
    return binary


def check_sample(sample: Sample) -> str | None:
    """Why a run would refuse ``sample`` (its image and mask decoded as a run decodes them), or None."""
    try:
        img, _ = open_image(sample.path)
        if high_depth(img):
            grayscale_float(img, sample.path)
        else:
            img.convert("RGB")
        if sample.mask is not None:
            binary_mask(sample, img.size)
    except BenchmarkError as exc:
        return str(exc)
    return None
