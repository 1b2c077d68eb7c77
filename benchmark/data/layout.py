"""Readers for the two folder layouts a dataset card may name.

BMAD (``layout: bmad``): ``<root>/<Obj>_AD/{train,valid,test}/{good,Ungood}/img/`` holds images; masks of
anomalous images lie in ``Ungood/anomaly_mask/`` (BMAD's own configs call the folder ``Ungood/label``: both
are accepted) and are paired with images by file stem, never by sorted position. Listings are always sorted.
Where masks are paired by name, a mask is named ``<image stem><mask_suffix><mask_extension>`` (card keys; by
default the image's stem with any image extension).

MedCLIPSeg (``layout: medclipseg``): ``<root>/<Name>/{Train,Val,Test}_Folder/{img,label}/`` and
``Prompts_Folder/*.xlsx`` (columns ``Image``, ``Ground Truth``, ``Description``, read with pandas): a split's
images are the rows of ``Train_text.xlsx`` / ``Val_text.xlsx`` (``Train_text_{p}.xlsx`` for a data fraction of
p %) and ``Test_text_{design}.xlsx`` (its prompt designs; ``original`` by default), each with its own
description; without a prompt file, every image of the folder, its mask paired by file stem, and no text.
Every image holds a lesion (segmentation sets): label 1, and an empty mask is allowed.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmark.data.catalog import IMAGE_SUFFIXES, DatasetSpec
from benchmark.errors import BenchmarkError

MASK_FOLDERS = ("anomaly_mask", "label")
SEGMENTATION_FOLDERS = {"train": "Train_Folder", "valid": "Val_Folder", "test": "Test_Folder"}
PROMPT_FILES = {"train": "Train_text", "valid": "Val_text", "test": "Test_text"}
PROMPT_COLUMNS = ("Image", "Ground Truth", "Description")


@dataclass(frozen=True)
class Sample:
    """One image on disk: its path, its label (1 anomalous) and its mask path, if any."""

    path: str
    label: int
    mask: str | None = None
    dataset: str = ""
    mask_threshold: float | None = None  # the dataset card's, for masks that are not stored binary
    text: str | None = None  # the image's own description (MedCLIPSeg layout's Prompts_Folder)
    segmentation_only: bool = False  # every image of its dataset holds a lesion; an empty mask is allowed


def file_hash(path: str | Path) -> str:
    """SHA-1 of a file's bytes: the identity of an image in caches, manifests and fit keys (read once per process
    while its size and modification time stay the same: a grid hashes a pool once, not once per cell)."""
    stat = os.stat(path)
    return _bytes_hash(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1 << 17)
def _bytes_hash(path: str, _size: int, _mtime_ns: int) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in blocks (fit files, downloaded archives)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def image_files(folder: Path) -> list[Path]:
    """The images of a folder, sorted; hidden files (macOS's ``._name.png`` resource forks) are not images."""
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def _mask_dir(state_dir: Path) -> Path | None:
    for name in MASK_FOLDERS:
        if (state_dir / name).is_dir():
            return state_dir / name
    return None


def _pair_masks(
    spec: DatasetSpec, img_dir: Path, images: list[Path], mask_dir: Path, what: str, orphans_fail: bool
) -> dict[Path, str]:
    """Each image's mask in ``mask_dir``, named as the card says; else one line counting every image without a
    mask and every mask without an image (the latter an error by itself only where ``orphans_fail``)."""
    extension = spec.mask_extension
    listing = image_files(mask_dir) if mask_dir.is_dir() else []
    masks = {p.stem: p for p in listing if extension is None or p.suffix.lower() == extension.lower()}
    missing = [p.name for p in images if p.stem + spec.mask_suffix not in masks]
    extra = sorted(masks[stem].name for stem in set(masks) - {p.stem + spec.mask_suffix for p in images})
    if missing or (extra and orphans_fail):
        rule = f"<stem>{spec.mask_suffix}{extension or '{' + ','.join(IMAGE_SUFFIXES) + '}'}"
        if missing:
            parts = [f"{len(missing)} of {len(images)} {what} in '{img_dir}' have no mask in '{mask_dir}' (looked "
                     f"for {rule}; e.g. {_first(missing)})"]  # fmt: skip
            if extra:
                parts.append(f"{len(extra)} of {len(masks)} masks there match no image (e.g. {_first(extra)})")
            parts.append("set mask_suffix/mask_extension in the card if masks are named otherwise")
        else:
            parts = [f"{len(extra)} of {len(masks)} masks in '{mask_dir}' are not named {rule} after an image in "
                     f"'{img_dir}' (e.g. {_first(extra)})"]  # fmt: skip
        raise BenchmarkError(f"{spec.card or f'dataset {spec.name!r}'}: " + "; ".join(parts))
    return {p: str(masks[p.stem + spec.mask_suffix]) for p in images}


def _first(names: list[str], count: int = 3) -> str:
    return ", ".join(f"'{n}'" for n in names[:count]) + (", ..." if len(names) > count else "")


def dataset_dir(root: Path, spec: DatasetSpec) -> Path:
    path = Path(root) / spec.folder
    if not path.is_dir():
        expected = (
            f"the MedCLIPSeg layout <root>/{spec.folder}/{{Train,Val,Test}}_Folder/{{img,label}}"
            if spec.layout == "medclipseg"
            else f"the BMAD layout <root>/{spec.folder}/{{train,valid,test}}/..."
        )
        raise BenchmarkError(
            f"dataset '{spec.name}': folder '{path}' not found (expected {expected}; see {spec.card or 'its card'})"
        )
    return path


def has_split(root: Path, spec: DatasetSpec, split: str) -> bool:
    name = SEGMENTATION_FOLDERS[split] if spec.layout == "medclipseg" else split
    return (Path(root) / spec.folder / name).is_dir()


def prompt_file(root: Path, spec: DatasetSpec, split: str, fraction: int | None = None, design: str | None = None):
    """The MedCLIPSeg prompt file that lists a split: per data fraction (train, valid) or prompt design (test)."""
    if split == "test":
        name = f"Test_text_{design or 'original'}.xlsx"
    else:
        name = PROMPT_FILES[split] + ("" if fraction in (None, 100) else f"_{fraction}") + ".xlsx"
    return Path(root) / spec.folder / "Prompts_Folder" / name


def read_segmentation_split(
    root: Path, spec: DatasetSpec, split: str, fraction: int | None = None, design: str | None = None
) -> list[Sample]:
    """One split of a MedCLIPSeg-layout dataset, sorted by image name (its ``DatasetSegmentation``)."""
    base = dataset_dir(root, spec) / SEGMENTATION_FOLDERS[split]
    if not base.is_dir():
        raise BenchmarkError(f"dataset '{spec.name}': split folder '{base}' not found")
    listing = prompt_file(root, spec, split, fraction, design)
    img_dir, mask_dir = base / "img", base / "label"
    if listing.is_file():
        import pandas as pd

        try:
            rows = pd.read_excel(listing)
        except Exception as exc:  # not a readable workbook
            raise BenchmarkError(f"{listing}: cannot be read as a prompt table ({type(exc).__name__})") from None
        missing = [c for c in PROMPT_COLUMNS if c not in rows.columns]
        if missing:
            raise BenchmarkError(f"{listing}: missing column '{missing[0]}' (expected {', '.join(PROMPT_COLUMNS)})")
        samples = []
        for image, mask, text in zip(rows["Image"], rows["Ground Truth"], rows["Description"], strict=True):
            for path in (img_dir / str(image), mask_dir / str(mask)):
                if not path.is_file():
                    raise BenchmarkError(f"{listing}: lists '{path.name}', which is not in '{path.parent}'")
            description = (text.strip() or None) if isinstance(text, str) else None  # blank: the default prompt
            samples.append(Sample(str(img_dir / str(image)), 1, str(mask_dir / str(mask)), spec.name,
                                  spec.mask_threshold, description, True))  # fmt: skip
    elif fraction not in (None, 100) or design not in (None, "original"):
        what = f"data fraction {fraction} %" if split != "test" else f"prompt design '{design}'"
        raise BenchmarkError(f"dataset '{spec.name}': {what} needs '{listing}', which is not there")
    else:
        images = image_files(img_dir) if img_dir.is_dir() else []
        masks = _pair_masks(spec, img_dir, images, mask_dir, f"{split} images", orphans_fail=False)
        samples = [Sample(str(p), 1, masks[p], spec.name, spec.mask_threshold, None, True) for p in images]
    if not samples:
        raise BenchmarkError(f"dataset '{spec.name}': split '{base}' holds no images")
    blank = sum(s.text is None for s in samples)
    if listing.is_file() and blank and listing not in _SAID:
        _SAID.add(listing)
        print(f"note: {listing}: {blank} of {len(samples)} images have no Description; they are given the "
              "method's default prompt", file=sys.stderr)  # fmt: skip
    return sorted(samples, key=lambda s: Path(s.path).name)


_SAID: set[Path] = set()  # prompt tables whose blank descriptions were reported (once a process)


def read_split(root: Path, spec: DatasetSpec, split: str, states: tuple[str, ...] = ("good", "Ungood")) -> list[Sample]:
    """All samples of one split, normal images first, each sorted by name; masks paired by file name."""
    if spec.layout == "medclipseg":
        return read_segmentation_split(root, spec, split) if "Ungood" in states else []
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
        images = image_files(img_dir)
        if not label or not spec.masks:
            samples += [Sample(str(p), label, None, spec.name) for p in images]
            continue
        mask_dir = _mask_dir(state_dir)
        if mask_dir is None:
            raise BenchmarkError(
                f"dataset '{spec.name}': '{state_dir}' has no mask folder (expected one of {MASK_FOLDERS})"
            )
        masks = _pair_masks(spec, img_dir, images, mask_dir, f"anomalous {split} images", orphans_fail=True)
        samples += [Sample(str(p), 1, masks[p], spec.name, spec.mask_threshold) for p in images]
    if not samples:
        raise BenchmarkError(f"dataset '{spec.name}': split '{base}' holds no images")
    return samples
