"""Checks made before anything is recorded, each fault one line, all of them at once (``PreflightError``).

Every cell's split is listed (file names only: nothing is decoded), every test set must hold normal and
anomalous images, a dataset the protocol locks (``data_locks``) must hash to its lock file by file, every
backbone's weights must be on this machine, and what a method needs besides them (an optional extra), and the
results folder, the experiment folder and the tracking store must be writable. Nothing here imports torch or
MLflow unless a pretrained backbone has to be looked up.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from benchmark.cells import Cell
from benchmark.data.catalog import DatasetSpec
from benchmark.data.layout import dataset_dir
from benchmark.data.locks import lock_problems
from benchmark.data.splits import Split, make_split
from benchmark.data.synthetic import SYNTHETIC_SETS, SyntheticConfig, write_synthetic
from benchmark.errors import BenchmarkError, PreflightError
from benchmark.method import METHODS
from benchmark.protocol import Protocol
from benchmark.tracking import check_server


def cell_split(cell: Cell, protocol: Protocol, catalog: dict[str, DatasetSpec], root: Path) -> Split:
    """The training, validation and test samples of one cell (the dry run shows the same)."""
    return make_split(
        root,
        catalog,
        cell.dataset,
        cell.setting,
        cell.shots,
        cell.sampling_seed,
        cell.loo_sources,
        protocol.manifests,
        need_valid=protocol.threshold.mode == "validation",
        design=cell.prompt_design,
    )


def prepare_synthetic(protocol: Protocol, catalog: dict[str, DatasetSpec], root: Path) -> None:
    """Write the protocol's synthetic data sets under ``root`` unless complete copies are there."""
    try:
        config = SyntheticConfig(**protocol.synthetic)
    except TypeError as exc:
        raise BenchmarkError(f"{protocol.path}: synthetic: {exc}") from None
    for name in protocol.datasets:
        if catalog[name].synthetic:
            if name not in SYNTHETIC_SETS:
                raise BenchmarkError(f"dataset '{name}' is marked synthetic but no generator is named so")
            write_synthetic(root, catalog[name], config)


def check_splits(
    protocol: Protocol, catalog: dict[str, DatasetSpec], cells: list[Cell], root: Path
) -> tuple[dict[str, Split], list[str], dict[str, str]]:
    """Every cell's split, listing files only; every fault found on the way (one line each): masks without
    images, K above a pool, a test set without both normal and anomalous images; and the datasets whose
    folders are missing, each with its one line."""
    problems: list[str] = []
    splits: dict[str, Split] = {}
    missing: dict[str, str] = {}
    for name in dict.fromkeys(d for c in cells for d in (c.dataset, *c.loo_sources)):
        try:
            dataset_dir(root, catalog[name])
        except BenchmarkError as exc:
            missing[name] = str(exc)
    for cell in cells:
        if set(missing) & {cell.dataset, *cell.loo_sources}:
            continue
        try:
            split = cell_split(cell, protocol, catalog, root)
        except BenchmarkError as exc:
            problems.append(str(exc))
            continue
        normal, anomalous = split.class_counts()
        if (not normal or not anomalous) and not catalog[cell.dataset].segmentation_only:
            problems.append(
                f"dataset '{cell.dataset}': the test split under '{root / catalog[cell.dataset].folder / 'test'}' "
                f"holds {normal} normal and {anomalous} anomalous images; a test set needs both"
            )
        splits[cell.cell_id] = split
    return splits, problems, missing


def check_weights(cells: list[Cell]) -> list[str]:
    """One line for each pretrained backbone whose weights are not on this machine."""
    problems = []
    for spec in dict.fromkeys(c.backbone for c in cells):
        if spec.random_init or spec.absent:
            continue
        import open_clip

        from benchmark.backbones.weights import resolve_clip_weights, resolve_timm_weights

        try:
            if spec.model in open_clip.list_models():
                resolve_clip_weights(spec.model, spec.weights)
            else:
                resolve_timm_weights(spec.model, spec.weights)
        except BenchmarkError as exc:
            problems.append(str(exc))
    return problems


def check_requirements(cells: list[Cell]) -> list[str]:
    """One line for each thing a cell's method needs on this machine and lacks (``Method.requirements``)."""
    problems: list[str] = []
    seen = set()
    for cell in cells:
        key = (cell.plugin_name, json.dumps(cell.params, sort_keys=True, default=str))
        if key not in seen:
            seen.add(key)
            problems += [p for p in METHODS.get(cell.plugin_name).requirements(cell.params) if p not in problems]
    return problems


def writable(folder: Path, what: str) -> str | None:
    """Why ``folder`` cannot take a new file, or None when it can. Nothing is created: a probe file is written
    and removed in the folder, or in its nearest existing ancestor (permission bits alone mislead root)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{what} '{folder}' cannot be created ('{existing}' is not a folder)"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as exc:
        return f"{what} '{folder}' cannot be written ({exc.strerror or exc})"
    return None


def check_folders(protocol: Protocol, uri: str) -> list[str]:
    """The results folder, the experiment folder and a local tracking store must be writable."""
    results = Path(protocol.results_dir)
    problems = [p for p in (writable(results, "results folder"),) if p]
    if problems:
        return problems
    problems += [p for p in (writable(results / protocol.name, "experiment folder"),) if p]
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        problem = writable(db.parent, "tracking store folder")
        if problem is None and db.exists() and not os.access(db, os.W_OK):
            problem = f"tracking store '{db}' cannot be written (read-only file)"
        problems += [problem] if problem else []
        problems += [p for p in (writable(results / "mlartifacts" / protocol.name, "artifact folder"),) if p]
    return problems


def preflight(
    protocol: Protocol, catalog: dict[str, DatasetSpec], cells: list[Cell], root: Path, uri: str
) -> dict[str, Split]:
    """Fail before anything is recorded, naming every fault at once: folders, the tracking server (asked once,
    with a short timeout), data layout, weights. Every cell's split (files listed, not read), by cell id."""
    problems = check_folders(protocol, uri)
    problems += [p for p in (check_server(uri),) if p]
    splits, found, missing = check_splits(protocol, catalog, cells, root)
    problems += [*missing.values(), *found]
    locked = {d: p for d, p in protocol.data_locks.items() if d not in missing and any(c.dataset == d for c in cells)}
    problems += lock_problems(locked, catalog, root, workers=max(1, min(4, os.cpu_count() or 1)))
    problems += check_weights(cells)
    problems += check_requirements(cells)
    if problems:
        raise PreflightError(problems)
    return splits
