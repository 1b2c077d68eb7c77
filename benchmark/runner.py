"""Runs a protocol's grid: preflight, then every cell as a job on an executor; this process alone records.

Per cell: its MLflow run starts (RUNNING) when its job starts; the job's result comes back as data; its
folder and its line in ``results.jsonl`` are written, then its MLflow run is logged and ended. A cell is
``finished`` or ``failed``, never half: an interrupt (Ctrl-C, SIGTERM) ends the running cells' MLflow runs
and the parent KILLED and records nothing for them; ``--resume`` runs them again and reconciles MLflow with
the local records (see ``benchmark.recording``).
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmark import environment
from benchmark.cells import Cell
from benchmark.claims import Claims
from benchmark.data.catalog import DatasetSpec
from benchmark.errors import BenchmarkError
from benchmark.executors import Executor, SerialExecutor
from benchmark.killpoints import kill_point
from benchmark.method import METHODS
from benchmark.preflight import preflight, prepare_synthetic
from benchmark.protocol import Protocol
from benchmark.recording import Recorder, cell_files, store_tag
from benchmark.store import ResultStore, strict_json
from benchmark.tracking import Tracker, tracking_uri


@dataclass
class RunSummary:
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)  # skipped: another live invocation runs them
    failed: list[tuple[str, str]] = field(default_factory=list)
    bad_input: bool = False
    mlflow_behind: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)  # a row per cell run: id, metrics or error


SHOWN = ("image_auroc", "pixel_auroc", "pixel_aupro")


def cell_line(result, threshold: float | None) -> str:
    """A finished cell's main metrics, Dice at the cell's threshold beside the sweep's best (the oracle)."""
    m = result.metrics
    parts = [f"{k}={m[k]:.3f}" for k in SHOWN if k in m]
    if "dice" in m:
        best = max(result.sweep, key=lambda r: r.get("dice", -1.0))
        parts.append(f"dice@{threshold:g}={m['dice']:.3f} (oracle {m['dice_oracle']:.3f} @{best['threshold']:g})")
    return " ".join(parts)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The run's cells against their main metrics (failed cells with their reason), as a text table."""
    from tabulate import tabulate

    columns = [c for c in (*SHOWN, "dice", "dice_oracle", "image_accuracy") if any(c in r for r in rows)]
    headers = ["cell", *(columns or ["status"]), "s"]  # every cell failed: their reasons under "status"
    body = []
    for r in rows:
        values = [f"{r[c]:.3f}" if c in r else "" for c in columns]
        if "error" in r:
            values = [f"FAILED: {r['error'][:60]}"] + [""] * (len(headers) - 3)
        body.append([r["cell"], *values, f"{r['seconds']:.1f}"])
    return tabulate(body, headers=headers, tablefmt="simple", disable_numparse=True)


def sync_command(protocol: Protocol) -> str:
    """The exact command that catches MLflow up with this run's records (their folder named, whatever the
    protocol file says: a flag may have changed it)."""
    return f"python -m benchmark sync {shlex.quote(protocol.path)} --results-dir {shlex.quote(protocol.results_dir)}"


def next_commands(protocol: Protocol) -> list[str]:
    """What to type after a run: the paper-style table and the MLflow UI."""
    results = "" if Path(protocol.results_dir) == Path("results") else f" --results-dir {protocol.results_dir}"
    uri = tracking_uri(protocol)
    remote = uri.startswith(("http://", "https://"))
    ui = f"open {uri} in a browser" if remote else f"mlflow ui --backend-store-uri {uri}"
    return [
        f"python -m benchmark tables {protocol.name}{results} --format latex   # paper-style table",
        f"{ui}   # runs side by side (README: 'Reading the results in MLflow')",
    ]


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
        "backbone_weights": "random-init" if cell.backbone.random_init else f"pretrained:{cell.backbone.weights}",
        "protocol_version": protocol.version,
        "evaluation_size": protocol.evaluation_size,
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
        preflight(protocol, catalog, cells, data_root, uri)
        store = ResultStore(protocol.results_dir, protocol.name)
        claims = Claims(store)
        try:
            # claimed before reading which cells are finished: an invocation that ends meanwhile has recorded them
            elsewhere = claims.take([c.config_hash(protocol) for c in cells])
            return _run(
                protocol, catalog, cells, data_root, uri, executor, store, elsewhere, claims.touch, resume,
                save_predictions, echo, fitting,
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
    return (
        cell.plugin_name, repr(sorted(params.items())), cell.backbone, cell.image_size, cell.resize, cell.precision,
        cell.seed, cell.sampling_seed, cell.setting, cell.shots, cell.loo_sources, None if shared else cell.dataset,
    )  # fmt: skip


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
) -> RunSummary:
    """The grid on a prepared executor: records cell by cell as results come back. ``elsewhere``: the cells
    another live invocation runs (config hash -> host:pid); ``alive()`` after each record keeps this
    invocation's claims fresh."""
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
        jobs.append(job)
        index[cell.cell_id], bases[cell.cell_id] = position, base
    jobs = fits_first(jobs)

    # one live line on a terminal (cells done / running / failed, ETA); per-cell lines above it; none in logs
    bar = tqdm(total=len(jobs), unit="cell", desc=protocol.name, disable=None, dynamic_ncols=True, leave=False)
    say = bar.write if not bar.disable else echo

    def on_start(job: CellJob) -> None:
        running[job.cell.cell_id] = recorder.start(bases[job.cell.cell_id])
        bar.set_postfix(running=len(running), failed=len(summary.failed))
        kill_point("cell_started")

    try:
        for job, result in executor.run(jobs, on_start):
            kill_point("cell_computed")
            cell = job.cell
            run_id = running.get(cell.cell_id)
            record = _record(bases[cell.cell_id], result, cell, protocol, run_id)
            if result.fit_file and fitting.log:
                record["fit_file"] = result.fit_file
            recorder.write(record, cell_files(result, cell.config(protocol), result.environment or env))
            recorder.log(record, run_id)
            running.pop(cell.cell_id, None)
            alive()
            kill_point("cell_ended")
            bar.update(1)
            tag = f"[{index[cell.cell_id]}/{len(cells)}] {cell.cell_id}"
            for warning in result.warnings:
                say(f"{tag}: {warning}")
            if result.status == "finished":
                summary.finished.append(cell.cell_id)
                summary.rows.append({"cell": cell.cell_id, **result.metrics, "seconds": result.duration})
                label = " [random-init backbone]" if cell.backbone.random_init else ""
                if str(result.info.get("fit", "")).startswith("reused "):  # not trained here: the fit was stored
                    label += f" [fit reused from {result.info['fit_cell']}]"
                say(f"{tag}: {cell_line(result, result.info['threshold_dice'])} ({result.duration:.1f} s){label}")
            else:
                summary.failed.append((cell.cell_id, result.error))
                summary.rows.append({"cell": cell.cell_id, "error": result.error, "seconds": result.duration})
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
    return summary
