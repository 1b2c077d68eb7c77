"""Dataset cards: Markdown files whose YAML front matter describes one dataset.

The cards under ``datasets/`` are the single source of truth for a dataset's folder, modality, the organ
word used in prompts, whether it has pixel masks, where it comes from and under which licence (``source``,
``licence``), how to get it (``fetch``: a file of a Hugging Face dataset repository, or one sentence saying where
to get it by hand) and how many images its sources say each split holds (``expected``). A protocol may name
extra card folders, so a new dataset is one Markdown file.

``expected`` is ``"not stated: <why>"`` or a mapping: ``from`` (where the numbers are published) and, per split
(``train``, ``valid``, ``test``), a number of images, ``{good: N, Ungood: M}`` (normal and anomalous images) or
``"not stated"``; for MedCLIPSeg's layout also ``fractions``: ``{train: {10: N, ...}, valid: {...}}``, the rows of
each data-fraction prompt table (``Train_text_10.xlsx``...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from benchmark.errors import BenchmarkError

CARDS_DIR = Path(__file__).resolve().parents[2] / "datasets"
_CARD_KEYS = {
    "name", "folder", "modality", "organ", "masks", "synthetic", "mvfa_seed_folder", "mask_threshold", "layout",
    "segmentation_only", "source", "mask_suffix", "mask_extension", "licence", "fetch", "expected",
}  # fmt: skip
NOT_STATED = "not stated"
CLASSES = ("good", "Ungood")
SPLITS = ("train", "valid", "test")  # the folder splits of every layout
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
    licence: str = NOT_STATED  # as its distributor states it
    fetch: Fetch | None = None  # where ``fetch-data`` gets it, or where a person gets it by hand
    expected: Expected | None = None  # the image counts its sources publish
    card: str = ""


@dataclass(frozen=True)
class Fetch:
    """Where a dataset comes from: ``file`` of the Hugging Face dataset repository ``hub`` (``fetch-data``
    downloads it), or ``manual``, one sentence saying where a person gets it (registration, a Drive folder)."""

    hub: str | None = None
    file: str | None = None
    manual: str | None = None


@dataclass(frozen=True)
class Expected:
    """The number of images per split its sources publish: ``counts[split]`` is a total, ``{good, Ungood}``,
    or None where the sources state nothing; ``why`` says why nothing at all is stated."""

    source: str
    counts: dict[str, int | dict[str, int] | None]
    why: str = ""
    fractions: dict[str, dict[int, int]] = field(default_factory=dict)  # split -> {percent: images}

    def total(self, split: str) -> int | None:
        value = self.counts.get(split)
        return sum(value.values()) if isinstance(value, dict) else value

    def described(self, split: str) -> str:
        value = self.counts.get(split)
        if value is None:
            return NOT_STATED
        if isinstance(value, dict):
            return " + ".join(f"{value[c]:,} {'normal' if c == 'good' else 'anomalous'}" for c in CLASSES if c in value)
        return f"{value:,}"


def _fetch(path: Path, value) -> Fetch:
    ok = isinstance(value, dict) and (
        (set(value) == {"hub", "file"} and all(isinstance(value[k], str) and value[k] for k in value))
        or (set(value) == {"manual"} and isinstance(value["manual"], str) and value["manual"].strip())
    )
    if not ok:
        raise BenchmarkError(
            f"{path}: key 'fetch' must be {{hub: OWNER/NAME, file: FILE}} (a Hugging Face dataset repository's file) "
            f"or {{manual: one sentence saying where to get it}}, got {value!r}"
        )
    if "hub" in value and value["hub"].count("/") != 1:
        raise BenchmarkError(f"{path}: key 'fetch.hub' must be a repository id OWNER/NAME, got {value['hub']!r}")
    return Fetch(**value)


def _expected(path: Path, value, segmentation: bool) -> Expected:
    if isinstance(value, str):
        if not value.startswith(NOT_STATED):
            raise BenchmarkError(f"{path}: key 'expected' must be a mapping of counts or '{NOT_STATED}: <why>'")
        return Expected("", {}, value.removeprefix(NOT_STATED).lstrip(": ").strip())
    if not isinstance(value, dict) or not isinstance(value.get("from"), str) or not value["from"].strip():
        raise BenchmarkError(f"{path}: key 'expected' needs 'from': where its numbers are published")
    unknown = set(value) - {"from", *SPLITS, *(("fractions",) if segmentation else ())}
    if unknown:
        raise BenchmarkError(f"{path}: expected: unknown key '{sorted(unknown)[0]}' (expected from, "
                             f"{', '.join(SPLITS)}{', fractions' if segmentation else ''})")  # fmt: skip
    counts: dict[str, int | dict[str, int] | None] = {}
    for split in SPLITS:
        count = value.get(split, NOT_STATED)
        if count == NOT_STATED:
            counts[split] = None
        elif isinstance(count, int) and not isinstance(count, bool) and count >= 0:
            counts[split] = count
        elif (isinstance(count, dict) and not segmentation and count and set(count) <= set(CLASSES)
              and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in count.values())):  # fmt: skip
            counts[split] = dict(count)
        else:
            shape = "a number" if segmentation else "a number or {good: N, Ungood: M}"
            raise BenchmarkError(f"{path}: expected.{split}: expected {shape} or '{NOT_STATED}', got {count!r}")
    fractions = value.get("fractions", {})
    ok = isinstance(fractions, dict) and set(fractions) <= {"train", "valid"} and all(
        isinstance(by, dict) and all(p in (10, 25, 50) and isinstance(n, int) and not isinstance(n, bool) and n > 0
                                     for p, n in by.items()) for by in fractions.values())  # fmt: skip
    if not ok:
        raise BenchmarkError(f"{path}: expected.fractions: expected {{train: {{10: N, 25: N, 50: N}}, valid: {{...}}}} "
                             f"(images per data-fraction prompt table), got {fractions!r}")  # fmt: skip
    return Expected(value["from"].strip(), counts, fractions={k: dict(v) for k, v in fractions.items()})


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
    licence = front.get("licence", NOT_STATED)
    if not isinstance(licence, str) or not licence.strip():
        raise BenchmarkError(f"{path}: key 'licence' must be the licence as its distributor states it, or "
                             f"'{NOT_STATED}'")  # fmt: skip
    if "fetch" in front:
        front["fetch"] = _fetch(path, front["fetch"])
    if "expected" in front:
        front["expected"] = _expected(path, front["expected"], bool(front.get("segmentation_only")))
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


def data_table(catalog: dict[str, DatasetSpec]) -> str:
    """The README's "Getting the data" table: one Markdown row per card (``python -m benchmark list --data-table``;
    a test keeps the README's copy equal to it)."""
    rows = [
        "| dataset | folder | source | licence | how to get it | expected images: train / valid / test |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for spec in sorted(catalog.values(), key=lambda s: (s.synthetic, s.layout, s.name)):
        if spec.fetch and spec.fetch.hub:
            how = f"`fetch-data {spec.name}` ({spec.fetch.hub}, {spec.fetch.file})"
        elif spec.fetch:
            how = f"by hand: `fetch-data {spec.name}` says where"
        else:
            how = "`synth`, or the first run of a protocol that names it" if spec.synthetic else "see its card"
        expected = spec.expected
        if expected is None or not expected.counts:
            counts = expected.why if expected and expected.why else NOT_STATED
        else:
            counts = " / ".join(expected.described(s) for s in SPLITS)
            for split, by in expected.fractions.items():
                counts += f"; {split} {'/'.join(str(p) for p in by)} %: {'/'.join(f'{n:,}' for n in by.values())}"
            counts += f" ({expected.source})"
        cells = [spec.name, f"`{spec.folder}/`", spec.source or NOT_STATED, spec.licence, how, counts]
        rows.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(rows) + "\n"
