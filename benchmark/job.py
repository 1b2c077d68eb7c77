"""One cell as a pure job: its full description in, its result out as data (``run_job``).

A job reads the data, fits and evaluates the method, and writes only the shared feature cache and, with
``--save-predictions``, the cell's ``predictions.npz``; it never touches the results store or MLflow, so
that any number of workers may run jobs while the driver alone writes records. Every exception becomes a
``failed`` result with a one-line reason; nothing is recorded half.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
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

from benchmark import efficiency, environment, fits, precision
from benchmark.backbones.cache import FeatureCache
from benchmark.backbones.weights import weights_identity
from benchmark.cells import Cell
from benchmark.data.catalog import DatasetSpec
from benchmark.data.layout import Sample
from benchmark.data.loading import LoaderConfig, iterate_batches, native_mask
from benchmark.data.splits import content_hash
from benchmark.efficiency import LoadTimer
from benchmark.errors import BenchmarkError
from benchmark.evidence import Evidence, EvidenceWriter
from benchmark.importers import load_checkpoint
from benchmark.killpoints import kill_point
from benchmark.method import METHODS, Method, MethodContext, TrainSet
from benchmark.metrics import CalibrationMetrics, ImageMetrics, PixelMetrics, SegmentationMetrics
from benchmark.predictions import PredictionWriter
from benchmark.preflight import cell_split
from benchmark.protocol import Protocol
from benchmark.reports.figures import Curve, SampleView, roc_figure, samples_figure, sweep_figure, to_png


@dataclass(frozen=True)
class CellJob:
    """Everything a cell's result depends on, and where its shared files go."""

    cell: Cell
    protocol: Protocol
    catalog: dict[str, DatasetSpec]
    data_root: str
    cache_dir: str
    cell_dir: str
    save_predictions: bool = False
    device: str = "auto"
    fits_dir: str = ""  # the fit store (``benchmark.fits``); empty: no store (every cell trains)
    refit_before: float = 0.0  # stored fits whose training began before this are ignored (``--refit``: the run's start)


@dataclass
class CellResult:
    """A cell's outcome as data: metrics and params when ``finished``; a one-line ``error`` when ``failed``."""

    cell_id: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    sweep: list[dict[str, float]] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG
    evidence: bytes = b""  # evidence.npz: per-image scores, labels and pixel counts
    efficiency: dict[str, float] = field(default_factory=dict)  # benchmark.efficiency: times, memory, size, FLOPs
    history: dict[str, list[float]] = field(default_factory=dict)  # per-epoch training curves
    test_hash: str = ""
    environment: dict = field(default_factory=dict)
    started: float = 0.0
    duration: float = 0.0
    error: str = ""
    traceback: str = ""
    bad_input: bool = False
    warnings: list[str] = field(default_factory=list)  # one line each, printed by the driver
    fit_file: str = ""  # the fit this cell trained and saved (an MLflow artifact)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BenchmarkError(f"device: '{name}' asked for, but CUDA is not available on this machine")
    return torch.device(name)


def loader_config(protocol: Protocol, device: torch.device) -> LoaderConfig:
    """The protocol's ``loader_workers``; else, on CUDA, decoding ahead in up to 4 processes (this process's
    CPU threads, the GPU computing meanwhile), with pinned memory; on the CPU none (decoding would take
    cores from the model: ``tests/perf/loader.py`` and the demo measure it)."""
    workers = protocol.loader_workers
    if workers is None:
        workers = min(4, max(1, torch.get_num_threads())) if device.type == "cuda" else 0
    return LoaderConfig(workers, pin_memory=device.type == "cuda")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class FigurePicks:
    """The test images a cell's samples figure shows, chosen in the one streaming pass with ``n`` held at most:
    the highest-scored normal images (the likeliest false alarms) and, of the anomalous ones, the lowest-scored
    (the worst missed) then the highest-scored (the best found). Without normal images (a segmentation-only
    set) every pick is anomalous. Ties keep the earlier image."""

    def __init__(self, n: int, image_level: bool = True) -> None:
        anomalous = n // 2 if image_level else n
        self.quota = {(0, 1.0): n - anomalous, (1, -1.0): (anomalous + 1) // 2, (1, 1.0): anomalous // 2}
        self.kept: dict[tuple[int, float], list[tuple[float, int, SampleView]]] = {k: [] for k in self.quota}
        self.seen = 0

    def offer(self, score: float, label: int, view: Callable[[], SampleView]) -> None:
        """``view()`` builds the image's ``SampleView``, only when it is kept."""
        self.seen += 1
        built = None
        for (wanted, sign), quota in self.quota.items():
            kept = self.kept[(wanted, sign)]
            if wanted != label or not quota or (len(kept) == quota and sign * score <= kept[-1][0]):
                continue
            built = built or view()
            kept.append((sign * score, -self.seen, built))
            kept.sort(key=lambda k: k[:2], reverse=True)
            del kept[quota:]

    def views(self) -> list[SampleView]:
        """Normal picks, then the worst and the best anomalous ones; an image picked twice is shown once."""
        out: dict[int, SampleView] = {}  # by the image's place in the test set (names repeat across folders)
        for (_, sign), kept in self.kept.items():
            why = "highest score" if sign > 0 else "lowest score"
            for _, order, v in kept:
                out.setdefault(order, dataclasses.replace(v, note=why))
        return list(out.values())


@dataclass
class Evaluation:
    metrics: dict[str, float]
    sweep: list[dict[str, float]]
    figure: list[SampleView]  # the samples figure's images (``FigurePicks``)
    test_hash: str
    roc: dict[str, Curve]
    evidence: Evidence | None  # per-image evidence (not kept for a validation pass)


def _check_prediction(method: Method, scores: torch.Tensor, maps: torch.Tensor, n: int, size: int, uncertainty=None):
    if uncertainty is not None and (tuple(uncertainty.shape) != (n, size, size) or not uncertainty.isfinite().all()):
        raise RuntimeError(
            f"method '{method.name}' returned an uncertainty map {tuple(uncertainty.shape)}; expected finite "
            f"({n}, {size}, {size})"
        )
    if tuple(scores.shape) != (n,) or tuple(maps.shape) != (n, size, size):
        raise RuntimeError(
            f"method '{method.name}' returned scores {tuple(scores.shape)} and maps "
            f"{tuple(maps.shape)}; expected ({n},) and ({n}, {size}, {size})"
        )
    for what, t in (("image scores", scores), ("anomaly maps", maps)):
        if not torch.isfinite(t).all() or t.min() < -1e-5 or t.max() > 1 + 1e-5:
            raise RuntimeError(f"method '{method.name}' returned {what} outside [0, 1] or not finite")
    return scores.clamp(0, 1), maps.clamp(0, 1)


def _sample_view(batch, scores: torch.Tensor, maps: torch.Tensor, uncertainty, i: int) -> SampleView:
    """A batch's ``i``-th test image as the figures draw it."""
    return SampleView(
        Path(batch.paths[i]).name,
        batch.images[i].permute(1, 2, 0).clamp(0, 1).numpy(),
        batch.masks[i].bool().numpy(),
        maps[i].numpy(),
        float(scores[i]),
        int(batch.labels[i]),
        uncertainty[i].numpy() if uncertainty is not None else None,
    )


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
    loader: LoaderConfig | None = None,
    keep_evidence: bool = True,
    image_level: bool = True,
    timer: LoadTimer | None = None,
    native: bool = False,
) -> Evaluation:
    """Predict ``samples`` batch by batch into streaming accumulators; maps are never all held at once.

    A metric that would be undefined (one class only, no anomalous pixel left at ``size``) is an error, so
    that no NaN is ever recorded as a result. ``image_level`` False (a segmentation-only dataset: every image
    holds a lesion) leaves the image metrics out: not applicable, so absent. A ``timer`` times the loading of
    batches. ``native`` scores the per-image DSC and NSD at each mask's own size (``SegmentationMetrics``)."""
    images = ImageMetrics()
    pixels = PixelMetrics((*sweep, thresholds["dice"])) if has_masks else None
    segments = SegmentationMetrics(thresholds["dice"]) if has_masks else None
    calibration = CalibrationMetrics() if has_masks else None
    first: list[SampleView] = []  # the first images of each class: every method's evidence shows the same ones
    picks = FigurePicks(figure_samples, image_level)
    keys: list[str] = []
    evidence = EvidenceWriter((*sweep, thresholds["dice"]), has_masks) if keep_evidence else None
    want = {0: (figure_samples + 1) // 2, 1: figure_samples // 2}
    batches = iterate_batches(samples, size, batch_size, loader)
    by_path = {s.path: s for s in samples} if native else {}
    for batch in timer.timed(batches) if timer is not None else batches:
        with torch.no_grad():
            pred = method.predict(batch.unlabelled())
        # float32 whatever the precision the method computed in (benchmark.precision)
        uncertainty = pred.uncertainty.float().cpu() if pred.uncertainty is not None else None
        scores, maps = _check_prediction(
            method, pred.image_scores.float().cpu(), pred.maps.float().cpu(), len(batch.keys), size, uncertainty
        )
        images.update(scores, batch.labels)
        if pixels is not None:
            pixels.update(maps, batch.masks)
            # per-image DSC and NSD over the anomalous images where a set also holds normal ones: on a normal
            # image an empty prediction would score 1 (MedCLIPSeg defines them on sets where every image is)
            scored = [i for i, label in enumerate(batch.labels.tolist()) if label or not image_level]
            at_native = [native_mask(by_path[batch.paths[i]]) for i in scored] if native else None
            segments.update(maps[scored], batch.masks[scored], at_native)
            calibration.update(maps, batch.masks, uncertainty)
        if writer is not None:
            writer.add(batch.paths, scores, batch.labels, maps, batch.masks, uncertainty)
        if evidence is not None:
            names = [Path(p).name for p in batch.paths]
            evidence.update(batch.keys, names, scores, batch.labels, maps, batch.masks)
        for i, label in enumerate(batch.labels.tolist()):
            view = functools.partial(_sample_view, batch, scores, maps, uncertainty, i)
            picks.offer(float(scores[i]), label, view)
            if want[label] > 0:
                want[label] -= 1
                first.append(view())
        keys += batch.keys
    anomalous = int(images.labels.sum())
    if image_level and (not anomalous or anomalous == len(images.labels)):
        raise BenchmarkError(
            f"the {what} images hold {len(images.labels) - anomalous} normal and {anomalous} anomalous images; "
            "image metrics need both"
        )
    if pixels is not None and pixels.n_pos == 0:
        raise BenchmarkError(
            f"no anomalous pixel is left in the {what} masks at {size}x{size} px; pixel metrics would be undefined"
        )
    metrics = {}
    if image_level:
        metrics |= {
            "image_auroc": images.auroc(),
            "image_accuracy": images.accuracy(thresholds["accuracy"]),
            "image_aupr": images.aupr(),
            "image_f1_max": images.f1_max(),
        }
    rows = []
    for t in sweep:
        row = {"threshold": t, **({"image_accuracy": images.accuracy(t)} if image_level else {})}
        if pixels is not None:
            row["dice"] = pixels.dice(t)
        rows.append(row)
    if pixels is not None:
        metrics["pixel_auroc"] = pixels.auroc()
        metrics["pixel_auroc_bin_error_bound"] = pixels.auroc_error_bound()
        metrics["pixel_aupr"] = pixels.aupr()
        metrics["pixel_aupro"] = pixels.aupro()
        metrics["pixel_aupro_bin_error_bound"] = pixels.aupro_error_bound()
        metrics["dice"] = pixels.dice(thresholds["dice"])
        for row in rows:
            metrics[f"dice_t{row['threshold']:g}"] = row["dice"]
        metrics["dice_oracle"] = max(r["dice"] for r in rows)
        metrics["dice_per_image"] = segments.mean_dice()
        metrics["nsd"] = segments.mean_nsd()
        metrics["pixel_ece"] = calibration.ece()
        if calibration.uncertainty_mean() is not None:
            metrics["uncertainty_mean"] = calibration.uncertainty_mean()
    undefined = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if undefined:
        raise RuntimeError(f"metrics {', '.join(undefined)} are not finite")
    roc = {"image": Curve(*images.roc(), metrics["image_auroc"])} if image_level else {}
    if pixels is not None:
        roc["pixel"] = Curve(*pixels.roc(), metrics["pixel_auroc"])
    examples = {
        "names": np.array([s.name for s in first]),
        "images": np.stack([(s.image * 255).round().astype(np.uint8) for s in first]) if first else np.zeros(0),
        "masks": np.stack([s.mask for s in first]) if first else np.zeros(0),
        "maps": np.stack([s.amap.astype(np.float16) for s in first]) if first else np.zeros(0),
    }
    if first and all(s.uncertainty is not None for s in first):  # evidence.npz: an MLflow artifact
        examples["uncertainty"] = np.stack([s.uncertainty.astype(np.float16) for s in first])
    pixel_roc = (roc["pixel"].fpr, roc["pixel"].tpr) if "pixel" in roc else None
    kept = evidence.build(examples, pixel_roc) if evidence is not None else None
    return Evaluation(metrics, rows, picks.views(), content_hash(keys), roc, kept)


def choose_thresholds(
    method: Method,
    valid: tuple[Sample, ...],
    has_masks: bool,
    protocol: Protocol,
    size: int,
    loader: LoaderConfig,
    image_level: bool = True,
) -> dict[str, float]:
    """Thresholds of best validation Dice (pixels) and accuracy (images) over the protocol's sweep."""
    fixed = {"dice": protocol.threshold.value, "accuracy": protocol.threshold.value}
    if protocol.threshold.mode == "fixed":
        return fixed
    ev = evaluate(
        method, valid, has_masks, fixed, protocol.sweep, size, protocol.batch_size, what="validation", loader=loader,
        keep_evidence=False, image_level=image_level,
    )  # fmt: skip
    best_acc = max(ev.sweep, key=lambda r: r["image_accuracy"])["threshold"] if image_level else fixed["accuracy"]
    best_dice = max(ev.sweep, key=lambda r: r.get("dice", -1.0))["threshold"] if has_masks else fixed["dice"]
    return {"dice": best_dice, "accuracy": best_acc}


def cell_figures(ev: Evaluation, title: str, thresholds: dict[str, float]) -> dict[str, bytes]:
    """A cell's PNGs: test samples at the Dice threshold, the threshold sweep, the ROC curves."""
    return {
        "samples.png": to_png(samples_figure(ev.figure, title, thresholds["dice"])),
        "sweep.png": to_png(sweep_figure(ev.sweep, f"threshold sweep | {title}", thresholds["dice"])),
        "roc.png": to_png(roc_figure(ev.roc, title)),
    }


def obtain_fit(
    method: Method,
    cell: Cell,
    train: TrainSet,
    fits_dir: str,
    refit_before: float,
    policy: precision.Policy,
    result: CellResult,
) -> tuple[Method, float, dict]:
    """The method with its fit: a given checkpoint loaded; else the stored fit of its key in ``fits_dir`` (begun
    after ``refit_before``); else trained and stored (also a stored fit that no longer loads, in a freshly built
    method). The fit's duration (that of the cell that trained it, for a stored one) and what the record says of
    it; warnings and the trained fit's file go into ``result``, its precision into ``policy``."""
    device = method.context.device
    started = time.perf_counter()
    if cell.checkpoint:
        source = load_checkpoint(method, cell.checkpoint, cell.checkpoint_format or "ours", train)
        efficiency.synchronise(device)
        return method, time.perf_counter() - started, {"fit": f"{source} {cell.checkpoint}", "fit_source": source}
    if not method.fit_state or not fits_dir:
        method.fit(train)
        efficiency.synchronise(device)
        return method, time.perf_counter() - started, {"fit_source": "retrain"}
    key = fits.fit_key(type(method), dataclasses.asdict(cell), train, policy.name)
    store = fits.FitStore(fits_dir)
    with store.claim(key):  # a cell of the same key in another process waits here, then loads it
        found, problem = store.find(key, refit_before)
        if found is not None:
            tensors, meta = found
            try:
                fits.restore(method, tensors, meta["layout"])
            except (BenchmarkError, RuntimeError) as exc:  # a fit of an older version of the method
                found, problem = (
                    None,
                    f"fit '{store.path(key)}' does not load ({str(exc).splitlines()[0]}); training it again",
                )
                seed_everything(cell.seed)
                method = type(method)(method.params, method.context)
        if problem:
            result.warnings.append(problem)
        if found is not None:
            policy.trained_in = meta.get("training_precision")
            info = {"fit": f"reused {key}", "fit_key": key, "fit_sha256": meta["sha256"], "fit_cell": meta["cell"]}
            info |= {"fit_source": "retrain", "fit_load_s": round(time.perf_counter() - started, 3)}
            return method, float(meta["fit_s"]), info
        begun = time.time()
        method.fit(train)
        efficiency.synchronise(device)
        fit_s = time.perf_counter() - started
        meta = {
            "method": method.name,
            "fit_version": method.fit_version,
            "params": method.effective_params(),
            "cell_params": cell.params,  # as the protocol gave them: a checkpoint entry takes them (cells.expand)
            "backbone": cell.backbone.label(),
            "backbone_weights": weights_identity(cell.backbone.weights),
            "image_size": cell.image_size,
            "resize": cell.resize or "bicubic",
            "precision": policy.name,
            "training_precision": policy.trained_in,
            "seed": cell.seed,
            "setting": cell.setting,
            "cell": cell.cell_id,
            "fit_s": fit_s,
            "manifest_sha256": hashlib.sha256(json.dumps(result.manifest, sort_keys=True).encode()).hexdigest(),
            "started": begun,
        }
        saved = fits.save_fit(store.root, key, method, meta)
    kill_point("fit_saved")
    result.fit_file = str(store.path(key))
    info = {"fit": f"trained {key}", "fit_key": key, "fit_sha256": saved["sha256"], "fit_source": "retrain"}
    return method, fit_s, info | {"fit_file_bytes": saved["bytes"]}


def run_job(job: CellJob) -> CellResult:
    """Fit and evaluate one cell; never raises but for an interrupt (the cell is then not recorded)."""
    cell, protocol, catalog = job.cell, job.protocol, job.catalog
    started = time.time()
    result = CellResult(cell.cell_id, "failed", started=started)
    try:
        kill_point(f"job@{cell.cell_id}")
        device = resolve_device(job.device)
        result.environment = environment.describe(device)
        spec = catalog[cell.dataset]
        split = cell_split(cell, protocol, catalog, Path(job.data_root))
        result.manifest = split.manifest()
        seed_everything(cell.seed)
        cls = METHODS.get(cell.plugin_name)
        cache = FeatureCache(job.cache_dir, {"resize": cell.resize} if cell.resize else None)
        context = MethodContext(
            spec, cell.setting, cell.shots, cell.seed, cell.image_size, device, cell.backbone, cache
        )
        specs = {name: catalog[name] for name in {s.dataset for s in (*split.train, *split.auxiliary)} | {cell.dataset}}
        loader = dataclasses.replace(loader_config(protocol, device), resize=cell.resize or "bicubic")
        train = TrainSet(
            split.train, cell.setting, cell.shots, cell.image_size, specs, split.valid, loader, split.auxiliary
        )
        image_level = not spec.segmentation_only
        writer = None
        if job.save_predictions:
            Path(job.cell_dir).mkdir(parents=True, exist_ok=True)
            writer = PredictionWriter(Path(job.cell_dir) / "predictions.npz", len(split.test), cell.image_size)
        timer = LoadTimer()
        efficiency.reset_peak_memory(device)
        computing = precision.resolve(cell.precision, cls.reference_precision, device.type)
        with precision.running(computing, device.type) as policy:
            method = cls.build(cls.Params(**cell.params), context)
            method, fit_s, fit_info = obtain_fit(method, cell, train, job.fits_dir, job.refit_before, policy, result)
            seed_everything(cell.seed)  # evaluation draws (Monte Carlo samples) alike after a fit trained or loaded
            thresholds = choose_thresholds(
                method, split.valid, spec.masks, protocol, cell.image_size, loader, image_level
            )
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
                loader=loader,
                image_level=image_level,
                timer=timer,
                native=protocol.evaluation_size == "native",
            )
            # the model's cost without the feature cache: a batch timed, then one image's FLOPs counted
            one = dataclasses.replace(loader, workers=0)
            batch = next(iterate_batches(split.test, cell.image_size, protocol.batch_size, one)).unlabelled()
            with cache.bypassed():
                model_s = efficiency.time_forward(lambda: method.predict(batch), device)
                peak_mb = efficiency.peak_memory_mb(device)
                gflops = efficiency.count_flops(lambda: method.predict(batch.first(1)), 1)
            described = method.describe()  # a method may compute here (a head's FLOPs): in the cell's precision
        if writer is not None:
            writer.close()
        result.efficiency = {
            "fit_s": fit_s,
            **efficiency.speed(timer, model_s, len(batch.keys)),
            "peak_memory_mb": peak_mb,
            **efficiency.parameter_counts(method),
            # the method's own count where it gives one (the head it trains, not every module left trainable)
            **({"trainable_params": float(described["trainable_params"])} if "trainable_params" in described else {}),
            "gflops_per_image": gflops,
        }
        if protocol.cell_figures:
            result.figures = cell_figures(ev, f"{cell.cell_id} | backbone {cell.backbone.label()}", thresholds)
        result.metrics, result.sweep, result.test_hash = ev.metrics, ev.sweep, ev.test_hash
        result.evidence = ev.evidence.to_bytes()
        result.history = method.curves()
        result.info = {
            **{f"param_{k}": v for k, v in method.effective_params().items()},
            **fit_info,
            "train_source": split.train_source,
            "train_count": len(split.train),
            "test_count": len(split.test),
            "threshold_dice": thresholds["dice"],
            "threshold_accuracy": thresholds["accuracy"],
            # the images that the per-image DSC and NSD average over (``evaluate``)
            **({"segmentation_images": "anomalous" if image_level else "all"} if spec.masks else {}),
            "published_as": method.published_as(),
            "precision": computing,
            **({"training_precision": policy.trained_in} if policy.trained_in else {}),
            **described,
        }
        if computing != precision.DEFAULT:  # a row of its own in the tables, never averaged with fp32 seeds
            result.info["variant"] = f"{result.info.get('variant', cell.method)} ({computing})"
        if cell.prompt_design:  # a row per design; only the original prompts are the published configuration
            result.info["variant"] = f"{result.info.get('variant', cell.method)} (prompts: {cell.prompt_design})"
            result.info["prompt_design"] = cell.prompt_design
            if cell.prompt_design != "original":
                result.info["published_as"] = ""
        if cell.checkpoint:  # a row of its own, never counted as a retrain
            result.info["variant"] = f"{result.info.get('variant', cell.method)} ({fit_info['fit_source']})"
        if cell.trained_on:
            result.info["trained_on"] = cell.trained_on
        result.status = "finished"
    except Exception as exc:
        result.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        result.traceback = traceback.format_exc()
        result.bad_input = isinstance(exc, BenchmarkError)
    result.duration = time.time() - started
    return result
