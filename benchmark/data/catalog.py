"""Dataset cards: Markdown files whose YAML front matter describes one dataset.

The cards under ``datasets/`` are the single source of truth for a dataset's folder, modality, the organ
word used in prompts and whether it has pixel masks. A protocol may name extra card folders, so a new
dataset is one Markdown file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from benchmark.errors import BenchmarkError

CARDS_DIR = Path(__file__).resolve().parents[2] / "datasets"
_CARD_KEYS = {
    "name", "folder", "modality", "organ", "masks", "synthetic", "mvfa_seed_folder", "mask_threshold", "layout",
    "segmentation_only", "source", "mask_suffix", "mask_extension",
}  # fmt: skip
LAYOUTS = ("bmad", "medclipseg")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class DatasetSpec:
    """What the harness needs to know of one dataset, read from its card."""

    name: str
    folder: str
    modality: str
    organ: str
    masks: bool
    synthetic: bool = False
    mvfa_seed_folder: str | None = None
    mask_threshold: float | None = None  # masks not stored binary: pixel is anomalous where mask > this
    layout: str = "bmad"  # bmad: <Obj>_AD/{train,valid,test}/...; medclipseg: {Train,Val,Test}_Folder/{img,label}
    segmentation_only: bool = False  # every image holds a lesion: image-level metrics do not apply
    source: str = ""  # where the data come from (a citation or an address)
    mask_suffix: str = ""  # a mask is named <image stem><mask_suffix><mask_extension>
    mask_extension: str | None = None  # None: any of IMAGE_SUFFIXES
    card: str = ""


def read_card(path: Path) -> DatasetSpec:
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n") or "\n---" not in text[4:]:
        raise BenchmarkError(f"{path}: a dataset card must start with YAML front matter between '---' lines")
    front = yaml.safe_load(text[4 : text.index("\n---", 4)]) or {}
    if not isinstance(front, dict):
        raise BenchmarkError(f"{path}: front matter must be a mapping")
    unknown = set(front) - _CARD_KEYS
    if unknown:
        raise BenchmarkError(f"{path}: unknown key '{sorted(unknown)[0]}' (expected {sorted(_CARD_KEYS)})")
    for key in ("name", "folder", "modality", "organ", "masks"):
        if key not in front:
            raise BenchmarkError(f"{path}: missing key '{key}'")
    if not isinstance(front["masks"], bool):
        raise BenchmarkError(f"{path}: key 'masks' must be true or false")
    if front.get("layout", "bmad") not in LAYOUTS:
        raise BenchmarkError(f"{path}: key 'layout' must be one of {', '.join(LAYOUTS)}, got {front['layout']!r}")
    if not isinstance(front.get("segmentation_only", False), bool):
        raise BenchmarkError(f"{path}: key 'segmentation_only' must be true or false")
    if front.get("layout") == "medclipseg" and not (front.get("segmentation_only") and front["masks"]):
        raise BenchmarkError(f"{path}: the medclipseg layout holds segmentation sets: set masks and segmentation_only")
    threshold = front.get("mask_threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)):
        raise BenchmarkError(f"{path}: key 'mask_threshold' must be a number, got {threshold!r}")
    suffix = front.get("mask_suffix", "")
    if not isinstance(suffix, str) or "/" in suffix or "\\" in suffix:
        raise BenchmarkError(
            f"{path}: key 'mask_suffix' must be text added to an image's file stem (e.g. _mask), got {suffix!r}"
        )
    extension = front.get("mask_extension")
    if extension is not None and (not isinstance(extension, str) or extension.lower() not in IMAGE_SUFFIXES):
        raise BenchmarkError(
            f"{path}: key 'mask_extension' must be one of {', '.join(IMAGE_SUFFIXES)} (any case), got {extension!r}"
        )
    return DatasetSpec(card=str(path), **{k: front[k] for k in front})


def load_catalog(extra_dirs: list[Path] | tuple[Path, ...] = ()) -> dict[str, DatasetSpec]:
    """All cards of ``datasets/`` and of ``extra_dirs`` (later folders override earlier ones), by name."""
    catalog: dict[str, DatasetSpec] = {}
    for folder in (CARDS_DIR, *extra_dirs):
        if not Path(folder).is_dir():
            raise BenchmarkError(f"dataset card folder '{folder}' does not exist")
        for path in sorted(Path(folder).glob("*.md")):
            if path.name.lower() == "readme.md":
                continue
            spec = read_card(path)
            catalog[spec.name] = spec
    return catalog
