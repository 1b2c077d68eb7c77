"""``verify-data``: a local copy of a dataset checked against its card before any GPU time is spent.

Three levels, every problem of a set gathered into one line:

- the layout: the split folders, image-mask pairing, and for MedCLIPSeg's layout the prompt tables that list
  each split (read as a run reads them);
- the number of images per split and class against the counts its sources publish (the card's ``expected``);
- ``deep``: every image and mask decoded by the rules a run decodes them with (``benchmark.data.decoding``),
  in parallel processes.

A BMAD-layout copy without ``train/`` (MVFA-AD's tarballs) is not an error: its few-shot settings draw from
``valid/``; the line says which settings need the all-normal split and where to get it.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchmark.data.catalog import CLASSES, SPLITS, DatasetSpec
from benchmark.data.layout import (
    PROMPT_FILES,
    SEGMENTATION_FOLDERS,
    Sample,
    has_split,
    image_files,
    read_segmentation_split,
    read_split,
)
from benchmark.errors import BenchmarkError

SHOWN_FILES = 3  # faulty files named in a line, the rest counted
NEEDS_TRAIN = "full_normal"  # the setting that trains on every normal training image (train/good)


@dataclass
class Check:
    """What ``verify`` found of one set: image counts per split and class, problems and notes."""

    spec: DatasetSpec
    root: Path
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)  # every image a run may read, with its mask
    decoded: int = 0  # images (each with its mask) decoded by --deep
    count_source: str = ""  # where the published counts a problem differs from come from (said once)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        """One line: OK with the counts, or every problem at once; notes after them."""
        name = self.spec.name
        if self.problems:
            head = f"{name}: {len(self.problems)} problem{'s' * (len(self.problems) > 1)}: " + "; ".join(self.problems)
            head += f" (published counts: {self.count_source})" if self.count_source else ""
        else:
            head = f"{name}: OK ({self.described()})"
        return head + "".join(f"; note: {n}" for n in self.notes)

    def described(self) -> str:
        parts = []
        for split, by_class in self.counts.items():
            if self.spec.layout == "medclipseg":
                parts.append(f"{split} {by_class['all']:,}")
            else:
                parts.append(f"{split} " + " + ".join(f"{by_class[c]:,} {_word(c)}" for c in CLASSES if c in by_class))
        expected = self.spec.expected
        said = f"; counts as {expected.source}" if expected and expected.source else "; no published counts to check"
        deep = f"; {self.decoded:,} images decoded with their masks" if self.decoded else ""
        return ", ".join(parts) + deep + said


def _word(state: str) -> str:
    return "normal" if state == "good" else "anomalous"


def _listed(folder: Path) -> list[Path]:
    return image_files(folder) if folder.is_dir() else []


def _count(root: Path, spec: DatasetSpec) -> dict[str, dict[str, int]]:
    base = Path(root) / spec.folder
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        if not has_split(root, spec, split):
            continue
        if spec.layout == "medclipseg":
            counts[split] = {"all": len(_listed(base / SEGMENTATION_FOLDERS[split] / "img"))}
        else:
            counts[split] = {c: len(_listed(base / split / c / "img")) for c in CLASSES if (base / split / c).is_dir()}
    return counts


def _where(spec: DatasetSpec) -> str:
    if spec.fetch and spec.fetch.manual:
        return spec.fetch.manual.rstrip(".")
    if spec.fetch and spec.fetch.hub:
        return f"python -m benchmark fetch-data {spec.name}"
    if spec.synthetic:
        return "python -m benchmark synth, or the first run of a protocol that names it"
    return f"see {spec.card or 'its card'}"


def _layout(check: Check) -> None:
    spec, root = check.spec, check.root
    folder = Path(root) / spec.folder
    if not folder.is_dir():
        check.problems.append(f"folder '{folder}' not found (get it: {_where(spec)})")
        return
    if spec.layout == "medclipseg":
        _segmentation_layout(check)
        return
    for split in SPLITS:
        if not has_split(root, spec, split):
            if split == "train":
                check.notes.append(
                    f"no train/ (the all-normal split, which MVFA-AD's copy lacks): {NEEDS_TRAIN} needs it, and "
                    f"few_normal then draws from valid/good; BMAD's release has it (`python -m benchmark fetch-data "
                    f"{spec.name}` says where)"
                )
            else:
                check.problems.append(f"no {split}/ folder in '{folder}'")
            continue
        for state in CLASSES:  # train/ is normal only in BMAD's copy; a synthetic set's holds anomalies too
            if not (folder / split / state / "img").is_dir():
                if state == "good" or split != "train":
                    check.problems.append(f"no {split}/{state}/img/ folder in '{folder}' (its {_word(state)} images)")
                continue
            try:
                check.samples += read_split(root, spec, split, (state,))
            except BenchmarkError as exc:
                check.problems.append(_short(str(exc), spec))


def _segmentation_layout(check: Check) -> None:
    spec, root = check.spec, check.root
    folder = Path(root) / spec.folder
    prompts = folder / "Prompts_Folder"
    if not prompts.is_dir():
        check.problems.append(
            f"no Prompts_Folder/ in '{folder}' (MedCLIPSeg's per-image descriptions, *.xlsx: without them every image "
            "gets the default prompt)"
        )
    for split in SPLITS:
        base = folder / SEGMENTATION_FOLDERS[split]
        stated = spec.expected.total(split) if spec.expected else None
        if stated == 0 and not _listed(base / "img"):
            continue  # an empty split, as its sources publish it (no validation images)
        if not base.is_dir():
            if split == "test" or stated:
                check.problems.append(f"no {SEGMENTATION_FOLDERS[split]}/ folder in '{folder}'")
            continue
        listing = prompts / (PROMPT_FILES[split] + ("_original" if split == "test" else "") + ".xlsx")
        if prompts.is_dir() and not listing.is_file():
            check.problems.append(f"no prompt table '{listing.name}' in '{prompts}' (it lists {base.name}/)")
        try:
            check.samples += read_segmentation_split(root, spec, split)
        except BenchmarkError as exc:
            check.problems.append(_short(str(exc), spec))
    fractions = spec.expected.fractions if spec.expected else {}
    for table in sorted(prompts.glob("*.xlsx")) if prompts.is_dir() else ():
        split, variant = _prompt_table(table.stem)
        if split is None or variant is None:
            continue  # the split's own listing, read above
        try:
            if split == "test":
                read_segmentation_split(root, spec, split, design=variant)
                continue
            rows = len(read_segmentation_split(root, spec, split, fraction=int(variant)))
        except (BenchmarkError, ValueError) as exc:
            check.problems.append(_short(str(exc), spec))
            continue
        stated = fractions.get(split, {}).get(int(variant))
        if stated is not None and rows != stated:
            check.problems.append(f"{table.name}: {rows:,} images, expected {stated:,}")
            check.count_source = spec.expected.source
    for split, by in fractions.items():
        for percent in by:
            table = prompts / f"{PROMPT_FILES[split]}_{percent}.xlsx"
            if prompts.is_dir() and not table.is_file():
                check.problems.append(f"no prompt table '{table.name}' in '{prompts}' (its {percent} % subset)")


def _prompt_table(stem: str) -> tuple[str | None, str | None]:
    """(split, data fraction or prompt design) of a prompt table's name; (split, None) for a split's own listing."""
    for split, prefix in PROMPT_FILES.items():
        if stem == prefix:
            return split, None
        if stem.startswith(prefix + "_"):
            variant = stem.removeprefix(prefix + "_")
            return split, None if variant == "original" else variant
    return None, None


def _short(message: str, spec: DatasetSpec) -> str:
    """A reader's error without the card or dataset prefix it starts with (the line names the set already)."""
    for prefix in (f"{spec.card}: ", f"dataset '{spec.name}': "):
        message = message.removeprefix(prefix)
    return message


def _counts(check: Check) -> None:
    expected = check.spec.expected
    if expected is None or not expected.counts:
        return
    for split in SPLITS:
        stated = expected.counts.get(split)
        found = check.counts.get(split)
        if stated is None or found is None:
            continue
        if isinstance(stated, dict):
            for state, n in stated.items():
                if found.get(state, 0) != n:
                    check.problems.append(f"{split}/{state}: {found.get(state, 0):,} {_word(state)} images, expected "
                                          f"{n:,}")  # fmt: skip
                    check.count_source = expected.source
        elif sum(found.values()) != stated:
            check.problems.append(f"{split}: {sum(found.values()):,} images, expected {stated:,}")
            check.count_source = expected.source


def _decode_all(samples: list[Sample], workers: int, progress: bool) -> list[str]:
    from benchmark.data.decoding import check_sample

    faults = [f for f in parallel(check_sample, samples, workers, progress, "decoding") if f]
    if not faults:
        return []
    shown = "; ".join(faults[:SHOWN_FILES]) + (
        f"; and {len(faults) - SHOWN_FILES} more" if len(faults) > SHOWN_FILES else ""
    )
    return [f"{len(faults)} of {len(samples)} images (each with its mask) a run would refuse: {shown}"]


def _init_worker() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"  # each process decodes one file at a time


def parallel(fn: Callable, items: Iterable, workers: int, progress: bool, what: str) -> Iterator:
    """``fn`` over ``items`` in order, in ``workers`` processes (1: here), with a progress bar on stderr."""
    from tqdm import tqdm

    items = list(items)
    bar = tqdm(total=len(items), desc=what, unit="file", file=sys.stderr, disable=not progress, leave=False)
    try:
        if workers <= 1 or len(items) < 2 * workers:
            for item in items:
                yield fn(item)
                bar.update()
            return
        with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
            for out in pool.imap(fn, items, chunksize=max(1, min(256, len(items) // (8 * workers)))):
                yield out
                bar.update()
    finally:
        bar.close()


def verify(root: Path, spec: DatasetSpec, deep: bool = False, workers: int = 1, progress: bool = False) -> Check:
    """Every problem of the copy of ``spec`` under ``root``: layout, counts against the card's, and (``deep``)
    every image and mask decoded."""
    check = Check(spec, Path(root))
    _layout(check)
    if (Path(root) / spec.folder).is_dir():
        check.counts = _count(root, spec)
        _counts(check)
    if deep and check.samples:
        check.problems += _decode_all(check.samples, workers, progress)
        check.decoded = len(check.samples)
    return check
