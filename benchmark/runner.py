"""Runs a protocol's grid: preflight, then every cell as a job on an executor; this process alone records.

Per cell: its MLflow run starts (RUNNING) when its job starts; the job's result comes back as data; its
folder and its line in ``results.jsonl`` are written, then its MLflow run is logged and ended. A cell is
``finished`` or ``failed``, never half: an interrupt (Ctrl-C, SIGTERM) ends the running cells' MLflow runs
and the parent KILLED and records nothing for them; ``--resume`` runs them again and reconciles MLflow with
the local records (see ``benchmark.recording``).
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from benchmark import environment
from benchmark.cells import Cell
from benchmark.claims import Claims
from benchmark.data.catalog import DatasetSpec
from benchmark.data.locks import lock_label
from benchmark.data.splits import Split
from benchmark.errors import BenchmarkError
from benchmark.executors import Executor, SerialExecutor
from benchmark.killpoints import kill_point
from benchmark.method import METHODS
from benchmark.preflight import preflight, prepare_synthetic
from benchmark.protocol import BackboneSpec, Protocol
from benchmark.recording import Recorder, cell_files, store_tag
from benchmark.store import ResultStore, strict_json
from benchmark.tracking import Tracker, tracking_uri

if TYPE_CHECKING:
    from benchmark.job import CellResult


@dataclass
class RunSummary:
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)  # skipped: another live invocation runs them
    failed: list[tuple[str, str]] = field(default_factory=list)
    bad_input: bool = False
    mlflow_behind: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)  # a row per cell run: id, metrics or error
    experiment_id: str | None = None  # the MLflow experiment's id, where the store answered


SHOWN = ("image_auroc", "pixel_auroc", "pixel_aupro")


def cell_line(result, threshold: float | None) -> str:
    """A finished cell's main metrics, Dice at the cell's threshold beside the sweep's best (the oracle)."""
    m = result.metrics
    parts = [f"{k}={m[k]:.3f}" for k in SHOWN if k in m]
    if "dice" in m:
        best = max(result.sweep, key=lambda r: r.get("dice", -1.0))
        parts.append(f"dice@{threshold:g}={m['dice']:.3f} (oracle {m['dice_oracle']:.3f} @{best['threshold']:g})")
    return " ".join(parts)


def _row_fields(cell: Cell, result: CellResult) -> dict[str, Any]:
    """What the closing summary groups a cell's line by (its method entry, prompt design and precision; the
    variant's name where it finished), beside its metrics and time."""
    k = (f" {cell.shots} %" if cell.setting == "data_fraction" else f" K={cell.shots}") if cell.shots else ""
    return {"entry": (cell.method, cell.prompt_design, cell.precision), "method": result.info.get("variant"),
            "setting": cell.setting + k, **result.metrics, "seconds": result.duration}  # fmt: skip


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The run at a glance: per method variant and setting, its cells (failed ones counted), the means of its
    main metrics over datasets and seeds, and its cells' time in seconds."""
    from tabulate import tabulate

    columns = [c for c in (*SHOWN, "dice", "dice_oracle", "image_accuracy") if any(c in r for r in rows)]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["entry"], r["setting"]), []).append(r)
    body = []
    for ((entry, *_), setting), part in groups.items():
        method = next((r["method"] for r in part if r.get("method")), entry)
        done = [r for r in part if "error" not in r]
        means = []
        for c in columns:
            values = [r[c] for r in done if c in r]
            means.append(f"{sum(values) / len(values):.3f}" if values else "")
        failed = len(part) - len(done)
        cells = f"{len(part)}" + (f" ({failed} failed)" if failed else "")
        body.append([method, setting, cells, *means, f"{sum(r['seconds'] for r in part):.1f}"])
    headers = ["method", "setting", "cells", *(f"{c} (mean)" for c in columns), "time (s)"]
    return tabulate(body, headers=headers, tablefmt="simple", disable_numparse=True)


def sync_command(protocol: Protocol) -> str:
    """The exact command that catches MLflow up with this run's records (their folder named, whatever the
    protocol file says: a flag may have changed it)."""
    return f"python -m benchmark sync {shlex.quote(protocol.path)} --results-dir {shlex.quote(protocol.results_dir)}"


# the experiment's runs in MLflow's model-training view, every cell a row (sorted by a metric, nothing nested)
RUNS_VIEW = "#/experiments/{}/runs?workflowType=machine_learning&orderByKey=metrics.%60image_auroc%60&orderByAsc=false"


def next_commands(protocol: Protocol, experiment_id: str | None = None) -> list[str]:
    """What to type after a run: the paper-style table, and the MLflow UI with the address of the experiment's
    runs (``RUNS_VIEW``: from 3.10 the UI opens on its GenAI pages unless the address asks for that view)."""
    results = "" if Path(protocol.results_dir) == Path("results") else f" --results-dir {protocol.results_dir}"
    uri = tracking_uri(protocol)
    remote = uri.startswith(("http://", "https://"))
    where = f"{uri.rstrip('/') if remote else 'http://127.0.0.1:5000'}/{RUNS_VIEW.format(experiment_id or '')}"
    if experiment_id is None:
        where = uri if remote else "http://127.0.0.1:5000"
    ui = f"open {where} in a browser" if remote else f"mlflow ui --backend-store-uri {uri}   # then open {where}"
    return [
        f"python -m benchmark tables {protocol.name}{results} --format latex   # paper-style table",
        f"{ui}   (README: 'Reading the results in MLflow')",
    ]


def weights_kind(spec: BackboneSpec) -> str:
    """What a record says of a backbone's weights: ``random-init``, ``none`` (no backbone) or ``pretrained:TAG``."""
    return "random-init" if spec.random_init else "none" if spec.absent else f"pretrained:{spec.weights}"


def _base(cell: Cell, protocol: Protocol) -> dict[str, Any]:
    return {
        "config_hash": cell.config_hash(protocol),
        "cell_id": cell.cell_id,
        "method": cell.method,
        "plugin": cell.plugin_name,
        "dataset": cell.dataset,
        "setting": cell.setting,
        "shots": cell.shots,
        "seed": cell.seed,
        "sampling_seed": cell.sampling_seed,
        "seed_free": cell.seed_free,  # run once: no seed changes its result (cells.seed_free)
        "backbone": cell.backbone.label(),
        "backbone_weights": weights_kind(cell.backbone),
        "protocol_version": protocol.version,
        "evaluation_size": protocol.evaluation_size,
        # the lock its copy was checked against before any cell ran (protocol data_locks), else None
        "data_lock": lock_label(protocol.data_locks[cell.dataset]) if cell.dataset in protocol.data_locks else None,
    }


def _record(base: dict[str, Any], result, cell: Cell, protocol: Protocol, run_id: str | None) -> dict[str, Any]:
    """A cell's line in ``results.jsonl`` from its job's result."""
    record = {**base, "status": result.status, "mlflow_run_id": run_id, "duration_s": round(result.duration, 2)}
    if result.status != "finished":
        return {**record, "error": result.error}
    env = result.environment
    params = strict_json(
        {
            "backbone": cell.backbone.label(),
            "image_size": cell.image_size,
            "resize": cell.resize or "bicubic",
            "sampling_seed": cell.sampling_seed,
            "protocol_version": protocol.version,
            "threshold_mode": protocol.threshold.mode,
            **{f"param_{k}": v for k, v in cell.params.items()},
            **result.info,
        }
    )  # as JSON has them, so that a later sync logs the very same values
    return {
        **record,
        "metrics": result.metrics,
        "efficiency": result.efficiency,
        "history": result.history,
        "params": params,
        # the protocol's main threshold (None when chosen per cell on validation data; the chosen values are
        # in params): tables group seeds on it and match published Dice by it
        "threshold": protocol.threshold.value if protocol.threshold.mode == "fixed" else None,
        "variant": result.info.get("variant", cell.method),
        "published_as": result.info["published_as"],
        "fit_source": result.info.get("fit_source", "retrain"),  # retrain | checkpoint | authors' checkpoint
        "precision": result.info["precision"],
        "test_content_hash": result.test_hash,
        "tags": {
            "test_content_hash": result.test_hash,
            **({"data_lock": record["data_lock"]} if record.get("data_lock") else {}),
            "git_commit": env.get("git_commit", ""),
            "torch": env.get("pkg_torch", ""),
            "cuda": env.get("cuda", ""),
            "device": env.get("device", ""),
        },
    }


def run_protocol(
    protocol: Protocol,
    catalog: dict[str, DatasetSpec],
    cells: list[Cell],
    data_root: Path,
    resume: bool = False,
    save_predictions: bool = False,
    echo: Callable[[str], None] = print,
    executor: Executor | None = None,
    refit: bool = False,
    log_fits: bool = True,
) -> RunSummary:
    """Run ``cells``; ``refit``: train again the fits whose training began before now; ``log_fits``: log each
    trained fit in MLflow."""
    executor = executor or SerialExecutor()
    fitting = Fitting(time.time() if refit else 0.0, log_fits)
    uri = tracking_uri(protocol)
    executor.prepare(cells)  # first: local workers start (import torch) while the data are checked
    try:
        prepare_synthetic(protocol, catalog, data_root)
        splits = preflight(protocol, catalog, cells, data_root, uri)
        store = ResultStore(protocol.results_dir, protocol.name)
        claims = Claims(store)
        try:
            # claimed before reading which cells are finished: an invocation that ends meanwhile has recorded them
            elsewhere = claims.take([c.config_hash(protocol) for c in cells])
            return _run(
                protocol, catalog, cells, data_root, uri, executor, store, elsewhere, claims.touch, resume,
                save_predictions, echo, fitting, splits,
            )  # fmt: skip
        finally:
            try:
                claims.release()
            except BenchmarkError as exc:  # the grid's own outcome (or error) stands; the claims lapse on their own
                print(f"warning: {exc}", file=sys.stderr)
    finally:
        executor.close()


@dataclass(frozen=True)
class Fitting:
    refit_before: float  # stored fits whose training began before this time are trained again (``--refit``); 0: none
    log: bool  # each trained fit logged as an MLflow artifact (``--save-fits``)


def fit_group(cell: Cell) -> tuple:
    """What a cell's fit depends on that the cell tells (its key also hashes the data): cells of one group share
    a fit. A domain-generalisation cell of a method whose fit never reads the target shares it across targets."""
    cls = METHODS.get(cell.plugin_name)
    shared = cell.setting == "domain_generalization" and not cls.fit_reads_target
    params = {k: v for k, v in cell.params.items() if k not in cls.test_params}
    named = cls.reads_setting(cell.setting)  # as fits.fit_key
    return (
        cell.plugin_name, repr(sorted(params.items())), cell.backbone, cell.image_size, cell.resize, cell.precision,
        cell.seed, cell.sampling_seed, cell.setting if named else "", cell.shots if named else None,
        cell.loo_sources, None if shared else cell.dataset,
    )  # fmt: skip


def result_identity(cell: Cell, split: Split, thresholds_from_valid: bool) -> tuple:
    """Everything a cell's result depends on: cells alike in it compute one result. The setting counts only for a
    method that reads it (``Method.setting_blind``) or in zero-shot LOO, the training images only as far as the
    method reads them (the normal ones of a ``Method.one_class`` method), the validation images where the method
    or the thresholds read them; the data are compared as files."""
    cls = METHODS.get(cell.plugin_name)
    train = tuple(s for s in split.train if not s.label) if cls.one_class else split.train
    valid = split.valid if cls.reads_valid or thresholds_from_valid else ()
    named = cls.reads_setting(cell.setting)

    def files(samples) -> tuple:
        return tuple((str(s.path), s.label) for s in samples)

    return (
        cell.plugin_name, repr(sorted(cell.params.items())), cell.backbone, cell.image_size, cell.resize,
        cell.precision, cell.seed, cell.checkpoint, cell.checkpoint_format, cell.prompt_design,
        cell.setting if named else "", cell.shots if named else None,
        cell.dataset, files(train), files(split.auxiliary), files(valid), files(split.test),
    )  # fmt: skip


def copy_result(result: CellResult, cell: Cell, split: Split, source: Cell) -> CellResult:
    """``result``, computed for ``source``, a cell alike (``result_identity``), as ``cell``'s: its own training
    files listed (the method read those it reads of them), no fit of its own, no time spent."""
    info = {k: v for k, v in result.info.items() if k not in ("trained_on", "fit_key", "fit_sha256", "fit_file_bytes")}
    info |= {"fit": f"same result as {source.cell_id}", "train_source": split.train_source,
             "train_count": len(split.train)}  # fmt: skip
    if cell.trained_on:
        info["trained_on"] = cell.trained_on
    return dataclasses.replace(
        result, cell_id=cell.cell_id, info=info, duration=0.0, manifest=split.manifest(), fit_file=None
    )


def fits_first(jobs: list) -> list:
    """The jobs with the first of each fit group ahead of the others, which then load its fit instead of waiting
    for it (given checkpoints need no fit)."""
    seen: set[tuple] = set()
    first, later = [], []
    for job in jobs:
        group = fit_group(job.cell)
        (later if group in seen and not job.cell.checkpoint else first).append(job)
        seen.add(group)
    return first + later


def _run(
    protocol: Protocol,
    catalog: dict[str, DatasetSpec],
    cells: list[Cell],
    data_root: Path,
    uri: str,
    executor: Executor,
    store: ResultStore,
    elsewhere: dict[str, str],
    alive: Callable[[], None],
    resume: bool,
    save_predictions: bool,
    echo: Callable[[str], None],
    fitting: Fitting,
    splits: dict[str, Split],
) -> RunSummary:
    """The grid on a prepared executor: records cell by cell as results come back. ``elsewhere``: the cells
    another live invocation runs (config hash -> host:pid); ``alive()`` after each record keeps this
    invocation's claims fresh. A cell whose result another cell of the grid computes (``result_identity``) is
    not run: it is recorded from that cell's result, with ``same_result_as`` naming it."""
    from benchmark.job import CellJob

    summary = RunSummary()
    finished = store.finished_hashes() if resume else set()
    artifacts = Path(protocol.results_dir) / "mlartifacts" / protocol.name
    tracker = Tracker(uri, protocol.name, artifacts, protocol.description)
    env = environment.base()
    parent = tracker.start(
        f"{protocol.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        {"protocol_version": str(protocol.version), "git_commit": env["git_commit"], **store_tag(store)},
    )
    tracker.log(parent, params={"protocol": protocol.path, "protocol_version": protocol.version, "cells": len(cells)})
    tracker.log_dict(parent, protocol.raw, "protocol.json")
    tracker.log_dict(parent, env, "environment.json")
    recorder = Recorder(store, tracker, parent)
    if resume:
        done = recorder.reconcile()
        if done:
            echo("MLflow reconciled with results.jsonl: " + ", ".join(f"{n} runs {what}" for what, n in done.items()))

    jobs, index, bases, running = [], {}, {}, {}
    alike: dict[tuple, list] = {}  # result identity -> the jobs of the cells it is
    copies: dict[str, list[Cell]] = {}  # cell id -> the cells recorded from its result
    from_valid = protocol.threshold.mode == "validation"
    cache_dir = str(Path(protocol.results_dir) / "cache")
    fits_dir = str(Path(protocol.results_dir) / "fits")
    for position, cell in enumerate(cells, 1):
        base = _base(cell, protocol)
        if base["config_hash"] in finished:
            summary.skipped.append(cell.cell_id)
            echo(f"[{position}/{len(cells)}] {cell.cell_id}: finished earlier, skipped (--resume)")
            continue
        if base["config_hash"] in elsewhere:
            summary.skipped.append(cell.cell_id)
            summary.elsewhere.append(cell.cell_id)
            owner = elsewhere[base["config_hash"]]
            echo(f"[{position}/{len(cells)}] {cell.cell_id}: being run by another invocation ({owner}), skipped")
            continue
        job = CellJob(
            cell, protocol, catalog, str(data_root), cache_dir, str(store.dir / cell.cell_id), save_predictions,
            protocol.device, fits_dir, fitting.refit_before,
        )  # fmt: skip
        index[cell.cell_id], bases[cell.cell_id] = position, base
        alike.setdefault(result_identity(cell, splits[cell.cell_id], from_valid), []).append(job)
    for group in alike.values():
        # computed by the cell that brings the fewest training files (few_normal's, not few_shot's), then the first
        first = min(group, key=lambda j: len(splits[j.cell.cell_id].train))
        jobs.append(first)
        copies[first.cell.cell_id] = [j.cell for j in group if j is not first]
    jobs = fits_first(jobs)
    if any(copies.values()):
        same = sum(len(c) for c in copies.values())
        echo(f"{same} cells are alike another cell of the grid in method, the data its fit reads and test split: "
             "each is recorded from that cell's result (same_result_as), not computed again")  # fmt: skip

    # one live line on a terminal (cells done / running / failed, ETA); per-cell lines above it; none in logs
    total = len(jobs) + sum(len(c) for c in copies.values())
    bar = tqdm(total=total, unit="cell", desc=protocol.name, disable=None, dynamic_ncols=True, leave=False)
    say = bar.write if not bar.disable else echo

    def on_start(job: CellJob) -> None:
        running[job.cell.cell_id] = recorder.start(bases[job.cell.cell_id])
        bar.set_postfix(running=len(running), failed=len(summary.failed))
        kill_point("cell_started")

    try:
        for job, computed in executor.run(jobs, on_start):
            kill_point("cell_computed")
            for cell in (job.cell, *copies.get(job.cell.cell_id, ())):
                source = job.cell
                result = computed if cell is source else copy_result(computed, cell, splits[cell.cell_id], source)
                if cell is not job.cell:
                    running[cell.cell_id] = recorder.start(bases[cell.cell_id])
                run_id = running.get(cell.cell_id)
                record = _record(bases[cell.cell_id], result, cell, protocol, run_id)
                if cell is not source:
                    record["same_result_as"] = {
                        "cell": source.cell_id,
                        "setting": source.setting,
                        "shots": source.shots,
                        "method": source.method,
                    }
                    kept = store.dir / source.cell_id / "predictions.npz"
                    if kept.is_file():  # --save-predictions: the same predictions, in this cell's folder too
                        (store.dir / cell.cell_id).mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(kept, store.dir / cell.cell_id / "predictions.npz")
                if result.fit_file and fitting.log:
                    record["fit_file"] = result.fit_file
                recorder.write(record, cell_files(result, cell.config(protocol), result.environment or env))
                recorder.log(record, run_id)
                running.pop(cell.cell_id, None)
                alive()
                kill_point("cell_ended")
                bar.update(1)
                tag = f"[{index[cell.cell_id]}/{len(cells)}] {cell.cell_id}"
                for warning in result.warnings if cell is job.cell else ():
                    say(f"{tag}: {warning}")
                if result.status == "finished":
                    summary.finished.append(cell.cell_id)
                    summary.rows.append({"cell": cell.cell_id, **_row_fields(cell, result)})
                    label = " [random-init backbone]" if cell.backbone.random_init else ""
                    if cell is not job.cell:
                        label += f" [same result as {job.cell.cell_id}: not computed again]"
                    elif str(result.info.get("fit", "")).startswith("reused "):  # not trained here: the fit was stored
                        label += f" [fit reused from {result.info['fit_cell']}]"
                    line = cell_line(result, result.info["threshold_dice"])
                    say(f"{tag}: {line} ({result.duration:.1f} s){label}")
                else:
                    summary.failed.append((cell.cell_id, result.error))
                    summary.rows.append({"cell": cell.cell_id, "error": result.error, **_row_fields(cell, result)})
                    summary.bad_input |= result.bad_input
                    say(f"{tag}: FAILED: {result.error} (traceback in {store.dir / cell.cell_id / 'error.txt'})")
                bar.set_postfix(running=len(running), failed=len(summary.failed))
    except BaseException:
        bar.close()
        for run_id in running.values():
            tracker.end(run_id, "KILLED")
        tracker.end(parent, "KILLED", even_if_behind=True)
        raise
    bar.close()
    tracker.end(parent, "FAILED" if summary.failed else "FINISHED", even_if_behind=True)
    summary.mlflow_behind = tracker.behind
    summary.experiment_id = tracker.experiment_id
    return summary
