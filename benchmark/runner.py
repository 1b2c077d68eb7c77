"""Runs a protocol's cells: split -> fit -> predict on batches -> streaming metrics -> record.

Each cell is atomic: it is recorded ``finished`` (local store and MLflow) only after every metric and
artifact is written; any exception records it ``failed`` and the run goes on with the next cell.
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmark import environment
from benchmark.backbones.cache import FeatureCache
from benchmark.backbones.cnn import resolve_timm_weights
from benchmark.backbones.weights import resolve_clip_weights
from benchmark.cells import Cell
from benchmark.data.catalog import DatasetSpec
from benchmark.data.layout import Sample, dataset_dir
from benchmark.data.loading import iterate_batches
from benchmark.data.splits import Split, content_hash, make_split
from benchmark.data.synthetic import MODALITIES, SyntheticConfig, write_dataset
from benchmark.errors import BenchmarkError, PreflightError
from benchmark.method import METHODS, Method, MethodContext, TrainSet
from benchmark.metrics import ImageMetrics, PixelMetrics
from benchmark.predictions import PredictionWriter
from benchmark.protocol import Protocol
from benchmark.reports.figures import samples_figure
from benchmark.store import ResultStore
from benchmark.tracking import Tracker, tracking_uri


@dataclass
class RunSummary:
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    bad_input: bool = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BenchmarkError(f"device: '{name}' asked for, but CUDA is not available on this machine")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    )


def check_splits(
    protocol: Protocol, catalog: dict[str, DatasetSpec], cells: list[Cell], root: Path
) -> tuple[dict[str, Split], list[str]]:
    """Every cell's split, listing files only, and every fault found on the way (one line each): missing
    folders or masks, K above a pool, a test set without both normal and anomalous images."""
    problems: list[str] = []
    splits: dict[str, Split] = {}
    missing: set[str] = set()
    for name in dict.fromkeys(d for c in cells for d in (c.dataset, *c.loo_sources)):
        try:
            dataset_dir(root, catalog[name])
        except BenchmarkError as exc:
            problems.append(str(exc))
            missing.add(name)
    for cell in cells:
        if missing & {cell.dataset, *cell.loo_sources}:
            continue
        try:
            split = cell_split(cell, protocol, catalog, root)
        except BenchmarkError as exc:
            problems.append(str(exc))
            continue
        normal, anomalous = split.class_counts()
        if not normal or not anomalous:
            problems.append(
                f"dataset '{cell.dataset}': the test split under '{root / catalog[cell.dataset].folder / 'test'}' "
                f"holds {normal} normal and {anomalous} anomalous images; a test set needs both"
            )
        splits[cell.cell_id] = split
    return splits, problems


def preflight(protocol: Protocol, catalog: dict[str, DatasetSpec], cells: list[Cell], root: Path) -> None:
    """Fail before anything is recorded, naming every fault at once: data layout (every cell's split) and
    the weights of every backbone."""
    _, problems = check_splits(protocol, catalog, cells, root)
    for spec in dict.fromkeys(c.backbone for c in cells):
        if spec.random_init:
            continue
        import open_clip

        try:
            if spec.model in open_clip.list_models():
                resolve_clip_weights(spec.model, spec.weights)
            else:
                resolve_timm_weights(spec.model, spec.weights)
        except BenchmarkError as exc:
            problems.append(str(exc))
    if problems:
        raise PreflightError(problems)


def prepare_synthetic(protocol: Protocol, catalog: dict[str, DatasetSpec], root: Path) -> None:
    """Write the protocol's synthetic data sets under ``root`` unless complete copies are there."""
    try:
        config = SyntheticConfig(**protocol.synthetic)
    except TypeError as exc:
        raise BenchmarkError(f"{protocol.path}: synthetic: {exc}") from None
    for name in protocol.datasets:
        if catalog[name].synthetic:
            if name not in MODALITIES:
                raise BenchmarkError(f"dataset '{name}' is marked synthetic but no generator is named so")
            write_dataset(root, catalog[name], config)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    sweep: list[dict[str, float]]
    figure: list[tuple]
    test_hash: str


def _check_prediction(method: Method, scores: torch.Tensor, maps: torch.Tensor, n: int, size: int):
    if tuple(scores.shape) != (n,) or tuple(maps.shape) != (n, size, size):
        raise RuntimeError(
            f"method '{method.name}' returned scores {tuple(scores.shape)} and maps "
            f"{tuple(maps.shape)}; expected ({n},) and ({n}, {size}, {size})"
        )
    for what, t in (("image scores", scores), ("anomaly maps", maps)):
        if not torch.isfinite(t).all() or t.min() < -1e-5 or t.max() > 1 + 1e-5:
            raise RuntimeError(f"method '{method.name}' returned {what} outside [0, 1] or not finite")
    return scores.clamp(0, 1), maps.clamp(0, 1)


def evaluate(
    method: Method,
    samples: tuple[Sample, ...],
    has_masks: bool,
    thresholds: dict[str, float],
    sweep: tuple[float, ...],
    size: int,
    batch_size: int,
    figure_samples: int = 0,
    writer: PredictionWriter | None = None,
    what: str = "test",
) -> Evaluation:
    """Predict ``samples`` batch by batch into streaming accumulators; maps are never all held at once.

    A metric that would be undefined (one class only, no anomalous pixel left at ``size``) is an error, so
    that no NaN is ever recorded as a result."""
    images = ImageMetrics()
    pixels = PixelMetrics((*sweep, thresholds["dice"])) if has_masks else None
    figure: list[tuple] = []
    keys: list[str] = []
    want = {0: (figure_samples + 1) // 2, 1: figure_samples // 2}
    for batch in iterate_batches(samples, size, batch_size):
        with torch.no_grad():
            pred = method.predict(batch.unlabelled())
        scores, maps = _check_prediction(method, pred.image_scores.cpu(), pred.maps.cpu(), len(batch.keys), size)
        images.update(scores, batch.labels)
        if pixels is not None:
            pixels.update(maps, batch.masks)
        if writer is not None:
            writer.add(batch.paths, scores, batch.labels, maps, batch.masks)
        for i, label in enumerate(batch.labels.tolist()):
            if want[label] > 0:
                want[label] -= 1
                figure.append((Path(batch.paths[i]).name, batch.images[i], batch.masks[i], maps[i], float(scores[i])))
        keys += batch.keys
    anomalous = int(images.labels.sum())
    if not anomalous or anomalous == len(images.labels):
        raise BenchmarkError(
            f"the {what} images hold {len(images.labels) - anomalous} normal and {anomalous} anomalous images; "
            "image metrics need both"
        )
    if pixels is not None and pixels.n_pos == 0:
        raise BenchmarkError(
            f"no anomalous pixel is left in the {what} masks at {size}x{size} px; pixel metrics would be undefined"
        )
    metrics = {"image_auroc": images.auroc(), "image_accuracy": images.accuracy(thresholds["accuracy"])}
    rows = []
    for t in sweep:
        row = {"threshold": t, "image_accuracy": images.accuracy(t)}
        if pixels is not None:
            row["dice"] = pixels.dice(t)
        rows.append(row)
    if pixels is not None:
        metrics["pixel_auroc"] = pixels.auroc()
        metrics["pixel_auroc_bin_error_bound"] = pixels.auroc_error_bound()
        metrics["dice"] = pixels.dice(thresholds["dice"])
        for row in rows:
            metrics[f"dice_t{row['threshold']:g}"] = row["dice"]
        metrics["dice_oracle"] = max(r["dice"] for r in rows)
    undefined = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if undefined:
        raise RuntimeError(f"metrics {', '.join(undefined)} are not finite")
    return Evaluation(metrics, rows, figure, content_hash(keys))


def choose_thresholds(
    method: Method, valid: tuple[Sample, ...], has_masks: bool, protocol: Protocol, size: int
) -> dict[str, float]:
    """Thresholds of best validation Dice (pixels) and accuracy (images) over the protocol's sweep."""
    fixed = {"dice": protocol.threshold.value, "accuracy": protocol.threshold.value}
    if protocol.threshold.mode == "fixed":
        return fixed
    ev = evaluate(method, valid, has_masks, fixed, protocol.sweep, size, protocol.batch_size, what="validation")
    best_acc = max(ev.sweep, key=lambda r: r["image_accuracy"])["threshold"]
    best_dice = max(ev.sweep, key=lambda r: r.get("dice", -1.0))["threshold"] if has_masks else fixed["dice"]
    return {"dice": best_dice, "accuracy": best_acc}


def run_cell(
    cell: Cell,
    protocol: Protocol,
    catalog: dict[str, DatasetSpec],
    root: Path,
    device: torch.device,
    cache: FeatureCache,
    cell_dir: Path,
    save_predictions: bool,
) -> tuple[Evaluation, dict]:
    spec = catalog[cell.dataset]
    split = cell_split(cell, protocol, catalog, root)
    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / "manifest.json").write_text(json.dumps(split.manifest(), indent=1))
    seed_everything(cell.seed)
    cls = METHODS.get(cell.plugin_name)
    context = MethodContext(spec, cell.setting, cell.shots, cell.seed, cell.image_size, device, cell.backbone, cache)
    method = cls(cls.Params(**cell.params), context)
    specs = {name: catalog[name] for name in {s.dataset for s in split.train} | {cell.dataset}}
    method.fit(TrainSet(split.train, cell.setting, cell.shots, cell.image_size, specs, split.valid))
    thresholds = choose_thresholds(method, split.valid, spec.masks, protocol, cell.image_size)
    writer = None
    if save_predictions:
        writer = PredictionWriter(cell_dir / "predictions.npz", len(split.test), cell.image_size)
    ev = evaluate(
        method,
        split.test,
        spec.masks,
        thresholds,
        protocol.sweep,
        cell.image_size,
        protocol.batch_size,
        protocol.figure_samples,
        writer,
    )
    if writer is not None:
        writer.close()
    with (cell_dir / "sweep.csv").open("w", newline="") as fh:
        out = csv.DictWriter(fh, fieldnames=list(ev.sweep[0]))
        out.writeheader()
        out.writerows(ev.sweep)
    title = f"{cell.cell_id} | backbone {cell.backbone.label()}"
    samples_figure(ev.figure, title, cell_dir / "samples.png")
    info = {
        "train_source": split.train_source,
        "train_count": len(split.train),
        "test_count": len(split.test),
        "threshold_dice": thresholds["dice"],
        "threshold_accuracy": thresholds["accuracy"],
        "published_as": method.published_as(),
        **method.describe(),
    }
    return ev, info


def run_protocol(
    protocol: Protocol,
    catalog: dict[str, DatasetSpec],
    cells: list[Cell],
    data_root: Path,
    resume: bool = False,
    save_predictions: bool = False,
    echo: Callable[[str], None] = print,
) -> RunSummary:
    summary = RunSummary()
    store = ResultStore(protocol.results_dir, protocol.name)
    finished = store.finished_hashes() if resume else set()
    device = resolve_device(protocol.device)
    prepare_synthetic(protocol, catalog, data_root)
    preflight(protocol, catalog, cells, data_root)
    cache = FeatureCache(Path(protocol.results_dir) / "cache")
    tracker = Tracker(tracking_uri(protocol), protocol.name, Path(protocol.results_dir) / "mlartifacts" / protocol.name)
    env = environment.describe(device)
    parent = tracker.start(
        f"{protocol.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        {"protocol_version": str(protocol.version), "git_commit": env["git_commit"]},
    )
    tracker.log(parent, params={"protocol": protocol.path, "protocol_version": protocol.version, "cells": len(cells)})
    tracker.log_dict(parent, protocol.raw, "protocol.json")
    tracker.log_dict(parent, env, "environment.json")
    for index, cell in enumerate(cells, 1):
        digest = cell.config_hash(protocol)
        tag = f"[{index}/{len(cells)}] {cell.cell_id}"
        if digest in finished:
            summary.skipped.append(cell.cell_id)
            echo(f"{tag}: finished earlier, skipped (--resume)")
            continue
        base = {
            "config_hash": digest,
            "cell_id": cell.cell_id,
            "method": cell.method,
            "plugin": cell.plugin_name,
            "dataset": cell.dataset,
            "setting": cell.setting,
            "shots": cell.shots,
            "seed": cell.seed,
            "sampling_seed": cell.sampling_seed,
            "backbone": cell.backbone.label(),
            "protocol_version": protocol.version,
        }
        weights_tag = "random-init" if cell.backbone.random_init else f"pretrained:{cell.backbone.weights}"
        run_id = tracker.start(
            cell.cell_id,
            {
                "method": cell.method,
                "plugin": cell.plugin_name,
                "dataset": cell.dataset,
                "setting": cell.setting,
                "shots": str(cell.shots or 0),
                "seed": str(cell.seed),
                "backbone_weights": weights_tag,
                "config_hash": digest,
            },
            parent,
        )
        started = time.time()
        cell_dir = store.dir / cell.cell_id
        try:
            tracker.log_dict(run_id, cell.config(protocol), "config.json")
            tracker.log_dict(run_id, env, "environment.json")
            ev, info = run_cell(cell, protocol, catalog, data_root, device, cache, cell_dir, save_predictions)
            params = {
                "backbone": cell.backbone.label(),
                "image_size": cell.image_size,
                "sampling_seed": cell.sampling_seed,
                "protocol_version": protocol.version,
                "threshold_mode": protocol.threshold.mode,
                **{f"param_{k}": v for k, v in cell.params.items()},
                **info,
            }
            tracker.log(
                run_id,
                params=params,
                metrics=ev.metrics,
                tags={
                    "test_content_hash": ev.test_hash,
                    "git_commit": env["git_commit"],
                    "torch": env["pkg_torch"],
                    "cuda": env["cuda"],
                    "device": env["device"],
                },
            )
            for name in ("manifest.json", "sweep.csv", "samples.png"):
                tracker.log_artifact(run_id, cell_dir / name)
            duration = time.time() - started
            store.append(
                {
                    **base,
                    "status": "finished",
                    "metrics": ev.metrics,
                    "params": params,
                    # the protocol's main threshold (None when chosen per cell on validation data; the
                    # chosen values are in params): tables group seeds on it and match published Dice by it
                    "threshold": protocol.threshold.value if protocol.threshold.mode == "fixed" else None,
                    "variant": info.get("variant", cell.method),
                    "published_as": info["published_as"],
                    "test_content_hash": ev.test_hash,
                    "mlflow_run_id": run_id,
                    "duration_s": round(duration, 2),
                }
            )
            tracker.end(run_id, ok=True)
            summary.finished.append(cell.cell_id)
            shown = " ".join(
                f"{k}={ev.metrics[k]:.3f}" for k in ("image_auroc", "pixel_auroc", "dice") if k in ev.metrics
            )
            label = " [random-init backbone]" if cell.backbone.random_init else ""
            echo(f"{tag}: {shown} ({duration:.1f} s){label}")
        except Exception as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            summary.failed.append((cell.cell_id, message))
            summary.bad_input |= isinstance(exc, BenchmarkError)
            (cell_dir).mkdir(parents=True, exist_ok=True)
            (cell_dir / "error.txt").write_text(traceback.format_exc())
            store.append({**base, "status": "failed", "error": message, "mlflow_run_id": run_id})
            tracker.log(run_id, tags={"error": message[:5000]})
            tracker.end(run_id, ok=False)
            echo(f"{tag}: FAILED: {message} (traceback in {cell_dir / 'error.txt'})")
    tracker.end(parent, ok=not summary.failed)
    return summary
