"""Which samples a cell may train on, and its test split.

Pools, per dataset (documented in the README):

- labelled pool: ``train/`` when it holds anomalous images, else ``valid/`` (BMAD's ``train/`` is normal
  only, and MVFA-AD's copy has no ``train/``; both draw labelled samples from ``valid/``);
- normal pool: ``train/good`` when ``train/`` exists, else ``valid/good`` (``full_normal`` needs ``train/``: it is
  refused without it, never run on the few normal images of ``valid/``).

Settings: ``zero_shot_loo`` trains on the labelled pools of the other listed datasets and never opens the
target's ``train/`` or ``valid/``; ``few_shot`` K draws K normal and K anomalous images from the labelled
pool (MVFA-AD's convention: its ``fewshot_seed`` files list ``n-i:`` and ``a-i:`` lines of K names each);
``few_normal`` K draws K normal images; ``supervised`` takes the whole labelled pool; ``full_normal`` the
whole normal pool. Draws use their own seed (the cell's sampling seed), apart from the model seed.

MedCLIPSeg's settings, on datasets of its layout: ``data_fraction`` p trains on the images its
``Train_text_{p}.xlsx`` lists and keeps those of ``Val_text_{p}.xlsx`` as validation (100: all);
``domain_generalization`` trains on the labelled pool of its source dataset and tests on the target (the
source itself: in-domain), never reading the target's training or validation images. A prompt design
(protocol axis) picks the test images' descriptions, ``Test_text_{design}.xlsx``.

Auxiliary data: a method that declares a setting in its ``auxiliary_settings`` (April-GAN's few-normal-shot
mode: a model trained on other data, plus K normal reference images) also gets, in that setting, the labelled
pools of the protocol's other datasets, as ``zero_shot_loo`` trains on; never the target's.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmark.data.catalog import DatasetSpec
from benchmark.data.layout import Sample, file_hash, has_split, read_segmentation_split, read_split
from benchmark.errors import BenchmarkError


@dataclass(frozen=True)
class Split:
    """Training samples, test samples, and the target's valid/ samples not used for training (none in LOO)."""

    train: tuple[Sample, ...]
    test: tuple[Sample, ...]
    valid: tuple[Sample, ...]
    train_source: str
    root: Path = Path()
    header: dict = field(default_factory=dict)
    auxiliary: tuple[Sample, ...] = ()  # other datasets' labelled pools (auxiliary_settings); empty otherwise

    def manifest(self) -> dict:
        """The record of what the cell trained on: paths relative to the data root, labels and, but for
        ``zero_shot_loo`` (whole pools of other datasets), each file's SHA-1 (read here, not when listing)."""
        hashed = self.header.get("setting") != "zero_shot_loo"
        train = [
            {"path": _rel(s.path, self.root), "label": s.label, **({"sha1": file_hash(s.path)} if hashed else {})}
            for s in self.train
        ]
        extra = {"auxiliary_count": len(self.auxiliary)} if self.auxiliary else {}
        return {**self.header, "train": train, "test_count": len(self.test), **extra}

    def class_counts(self) -> tuple[int, int]:
        """Normal and anomalous test images."""
        anomalous = sum(s.label for s in self.test)
        return len(self.test) - anomalous, anomalous


def labelled_pool(root: Path, spec: DatasetSpec) -> tuple[list[Sample], str]:
    if has_split(root, spec, "train"):
        train = read_split(root, spec, "train")
        if any(s.label for s in train):
            return train, "train"
    return read_split(root, spec, "valid"), "valid"


def normal_pool(root: Path, spec: DatasetSpec) -> tuple[list[Sample], str]:
    split = "train" if has_split(root, spec, "train") else "valid"
    return read_split(root, spec, split, states=("good",)), split


def _rng(sampling_seed: int, dataset: str, shots: int, kind: str) -> np.random.Generator:
    return np.random.default_rng([sampling_seed, zlib.crc32(dataset.encode()), shots, zlib.crc32(kind.encode())])


def _draw(pool: list[Sample], k: int, rng: np.random.Generator, what: str, spec: DatasetSpec) -> list[Sample]:
    if len(pool) < k:
        raise BenchmarkError(f"dataset '{spec.name}': {k}-shot needs {k} {what} images, the pool has {len(pool)}")
    idx = rng.choice(len(pool), size=k, replace=False)
    return sorted((pool[i] for i in idx), key=lambda s: s.path)


def _manifest_names(path: Path, iteration: int, dataset: str) -> tuple[list[str], list[str]]:
    """Normal and anomalous file names from our JSON manifest or an MVFA-AD ``K-shot.txt`` file."""
    if not path.is_file():
        raise BenchmarkError(f"sampling.manifests: file '{path}' for dataset '{dataset}' not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        return (
            [Path(s["path"]).name for s in data["train"] if s["label"] == 0],
            [Path(s["path"]).name for s in data["train"] if s["label"] == 1],
        )
    lines = {}
    for line in text.splitlines():
        parts = line.split()
        if parts:
            lines[parts[0]] = parts[1:]
    normal, anomalous = lines.get(f"n-{iteration}:"), lines.get(f"a-{iteration}:")
    if normal is None and anomalous is None:
        raise BenchmarkError(f"{path}: no 'n-{iteration}:' or 'a-{iteration}:' line (the sampling seed picks the line)")
    return normal or [], anomalous or []


def _from_names(pool: list[Sample], names: list[str], label: int, source: Path) -> list[Sample]:
    by_name = {Path(s.path).name: s for s in pool if s.label == label}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise BenchmarkError(f"{source}: '{missing[0]}' is not in the dataset's pool")
    return [by_name[n] for n in names]


def manifest_path(template: str, spec: DatasetSpec, shots: int) -> Path:
    return Path(
        template.format(
            dataset=spec.name,
            folder=spec.folder.removesuffix("_AD"),
            mvfa=spec.mvfa_seed_folder or spec.folder.removesuffix("_AD"),
            shots=shots,
        )
    )


def make_split(
    root: Path,
    catalog: dict[str, DatasetSpec],
    dataset: str,
    setting: str,
    shots: int | None,
    sampling_seed: int,
    loo_sources: tuple[str, ...] = (),
    manifests: str | None = None,
    need_valid: bool = False,
    design: str | None = None,
) -> Split:
    spec = catalog[dataset]
    root = Path(root)
    if setting == "data_fraction" and spec.layout != "medclipseg":
        raise BenchmarkError(f"data_fraction: dataset '{dataset}' is not in the medclipseg layout (no subsets)")
    if design is not None and spec.layout != "medclipseg":
        raise BenchmarkError(f"prompt_designs: dataset '{dataset}' has no prompt files (not the medclipseg layout)")
    test = read_segmentation_split(root, spec, "test", design=design) if design else read_split(root, spec, "test")
    source: str
    fraction_valid: list[Sample] | None = None
    if setting == "data_fraction":
        train = read_segmentation_split(root, spec, "train", fraction=shots)
        fraction_valid = read_segmentation_split(root, spec, "valid", fraction=shots) if has_split(
            root, spec, "valid") else []  # fmt: skip
        source = f"{shots} % of Train_Folder (Prompts_Folder listing)"
    elif setting == "domain_generalization":
        train, where = labelled_pool(root, catalog[loo_sources[0]])
        source = f"{loo_sources[0]}'s {where} (domain generalisation)"
    elif setting == "zero_shot_loo":
        if not loo_sources:
            raise BenchmarkError(f"zero_shot_loo on '{dataset}' needs at least one other dataset to train on")
        train: list[Sample] = []
        for other in loo_sources:
            pool, _ = labelled_pool(root, catalog[other])
            train += pool
        source = "labelled pools of " + ", ".join(loo_sources)
    elif setting in ("few_shot", "supervised"):
        pool, where = labelled_pool(root, spec)
        source = f"{where}/"
        if setting == "supervised":
            train = pool
        elif manifests:
            path = manifest_path(manifests, spec, shots or 0)
            normal_names, anomalous_names = _manifest_names(path, sampling_seed, dataset)
            train = _from_names(pool, normal_names, 0, path) + _from_names(pool, anomalous_names, 1, path)
            source += f" from manifest {path}"
        else:
            k = shots or 0
            train = _draw(
                [s for s in pool if not s.label], k, _rng(sampling_seed, dataset, k, "n"), "normal", spec
            ) + _draw([s for s in pool if s.label], k, _rng(sampling_seed, dataset, k, "a"), "anomalous", spec)
    elif setting in ("few_normal", "full_normal"):
        if setting == "full_normal" and spec.layout == "bmad" and not has_split(root, spec, "train"):
            raise BenchmarkError(
                f"dataset '{dataset}': full_normal trains on every normal image of train/good, and "
                f"'{root / spec.folder / 'train'}' is not there (MVFA-AD's copy lacks it; BMAD's release has it: "
                f"see {spec.card or 'its card'}, or `python -m benchmark fetch-data {dataset}`)"
            )
        pool, where = normal_pool(root, spec)
        source = f"{where}/good"
        if setting == "full_normal":
            train = pool
        elif manifests:
            path = manifest_path(manifests, spec, shots or 0)
            train = _from_names(pool, _manifest_names(path, sampling_seed, dataset)[0], 0, path)
            source += f" from manifest {path}"
        else:
            k = shots or 0
            train = _draw(pool, k, _rng(sampling_seed, dataset, k, "n"), "normal", spec)
    else:
        raise BenchmarkError(f"unknown setting '{setting}'")

    auxiliary: list[Sample] = []
    if setting not in ("zero_shot_loo", "domain_generalization") and loo_sources:
        for other in loo_sources:
            auxiliary += labelled_pool(root, catalog[other])[0]
        source += f"; auxiliary: labelled pools of {', '.join(loo_sources)} ({len(auxiliary)} images)"
    valid: list[Sample] = []
    if fraction_valid is not None:
        valid = fraction_valid
    elif setting not in ("zero_shot_loo", "domain_generalization") and has_split(root, spec, "valid"):
        used = {s.path for s in train}
        valid = [s for s in read_split(root, spec, "valid") if s.path not in used]
    if need_valid:
        if setting in ("zero_shot_loo", "domain_generalization"):
            raise BenchmarkError(
                f"threshold.mode: validation is not available with {setting} "
                "(the target's valid/ is never read); use mode: fixed"
            )
        if not valid or (len({s.label for s in valid}) < 2 and not spec.segmentation_only):
            raise BenchmarkError(
                f"threshold.mode: validation: dataset '{dataset}' has no normal and anomalous "
                "valid/ images left that are not training samples"
            )
    overlap = {s.path for s in (*train, *auxiliary)} & {s.path for s in test}
    if overlap:
        raise BenchmarkError(f"dataset '{dataset}': training and test samples overlap ('{sorted(overlap)[0]}')")
    header = {"dataset": dataset, "setting": setting, "shots": shots, "sampling_seed": sampling_seed, "source": source}
    return Split(tuple(train), tuple(test), tuple(valid), source, root, header, tuple(auxiliary))


def _rel(path: str, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return path


def content_hash(hashes: list[str]) -> str:
    """One hash for a set of samples, from their sorted file hashes."""
    return hashlib.sha1("\n".join(sorted(hashes)).encode()).hexdigest()
