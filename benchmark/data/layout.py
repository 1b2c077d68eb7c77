"""Reader for the BMAD folder layout.

``<root>/<Obj>_AD/{train,valid,test}/{good,Ungood}/img/`` holds images; masks of anomalous images lie in
``Ungood/anomaly_mask/`` (BMAD's own configs call the folder ``Ungood/label``: both are accepted) and are
paired with images by file stem, never by sorted position. Listings are always sorted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from benchmark.data.catalog import DatasetSpec
from benchmark.errors import BenchmarkError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_FOLDERS = ("anomaly_mask", "label")
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Sample:
    """One image on disk: its path, its label (1 anomalous) and its mask path, if any."""

    path: str
    label: int
    mask: str | None = None
    dataset: str = ""
    mask_threshold: float | None = None  # the dataset card's, for masks that are not stored binary


def file_hash(path: str | Path) -> str:
    """SHA-1 of a file's bytes: the identity of an image in caches and manifests."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _mask_dir(state_dir: Path) -> Path | None:
    for name in MASK_FOLDERS:
        if (state_dir / name).is_dir():
            return state_dir / name
    return None


def dataset_dir(root: Path, spec: DatasetSpec) -> Path:
    path = Path(root) / spec.folder
    if not path.is_dir():
        raise BenchmarkError(
            f"dataset '{spec.name}': folder '{path}' not found (expected the BMAD layout "
            f"<root>/{spec.folder}/{{train,valid,test}}/...; see {spec.card or 'its card'})"
        )
    return path


def has_split(root: Path, spec: DatasetSpec, split: str) -> bool:
    return (Path(root) / spec.folder / split).is_dir()


def read_split(root: Path, spec: DatasetSpec, split: str, states: tuple[str, ...] = ("good", "Ungood")) -> list[Sample]:
    """All samples of one split, normal images first, each sorted by name; masks paired by file stem."""
    base = dataset_dir(root, spec) / split
    if not base.is_dir():
        raise BenchmarkError(f"dataset '{spec.name}': split folder '{base}' not found")
    samples: list[Sample] = []
    for state in states:
        state_dir = base / state
        img_dir = state_dir / "img"
        if not img_dir.is_dir():
            if state == "good" and split != "train":
                raise BenchmarkError(f"dataset '{spec.name}': expected folder '{img_dir}'")
            continue
        label = int(state == "Ungood")
        images = _images(img_dir)
        if not label or not spec.masks:
            samples += [Sample(str(p), label, None, spec.name) for p in images]
            continue
        mask_dir = _mask_dir(state_dir)
        if mask_dir is None:
            raise BenchmarkError(
                f"dataset '{spec.name}': '{state_dir}' has no mask folder (expected one of {MASK_FOLDERS})"
            )
        masks = {p.stem: p for p in _images(mask_dir)}
        missing = [p.name for p in images if p.stem not in masks]
        if missing:
            raise BenchmarkError(f"dataset '{spec.name}': no mask in '{mask_dir}' for image '{missing[0]}'")
        extra = sorted(set(masks) - {p.stem for p in images})
        if extra:
            raise BenchmarkError(f"dataset '{spec.name}': mask '{masks[extra[0]].name}' in '{mask_dir}' has no image")
        samples += [Sample(str(p), 1, str(masks[p.stem]), spec.name, spec.mask_threshold) for p in images]
    if not samples:
        raise BenchmarkError(f"dataset '{spec.name}': split '{base}' holds no images")
    return samples
