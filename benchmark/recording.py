"""The single writer of records: a cell's result goes to its folder and ``results.jsonl`` first, then MLflow.

Only the driver process writes here. The local record is the source of truth: it is written whatever MLflow
does, and ``reconcile`` brings MLflow up to date from it (``--resume`` and ``python -m benchmark sync``):
runs of finished cells that a dead invocation left RUNNING are finished from the record, records without
a run get one, and runs a dead invocation left RUNNING with no record are marked KILLED. Nothing is logged
twice: each record names its MLflow run.

Tests kill the process between these stages (``benchmark.killpoints``) to check that ``--resume`` completes
whatever a kill left.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

from benchmark.errors import BenchmarkError
from benchmark.killpoints import kill_point
from benchmark.store import ResultStore
from benchmark.tracking import DRIVER_TAG, STORE_TAG, Tracker, driver_is_dead

CELL_FILES = (
    "config.json",
    "environment.json",
    "manifest.json",
    "sweep.csv",
    "samples.png",
    "sweep.png",
    "roc.png",
    "evidence.npz",
    "error.txt",
)


def mlflow_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The metrics MLflow shows as columns: the record's metrics but the sweep's ``dice_t*`` (they stay in the
    record and ``sweep.png``), and its efficiency figures as ``efficiency/*``."""
    metrics = {k: v for k, v in record["metrics"].items() if not k.startswith("dice_t")}
    return metrics | {f"efficiency/{k}": v for k, v in record.get("efficiency", {}).items()}


class RecordingError(BenchmarkError):
    """A record cannot be written (a full or read-only disk): the grid stops."""


def cell_tags(record: dict[str, Any]) -> dict[str, str]:
    return {
        "method": record["method"],
        "plugin": record.get("plugin", record["method"]),
        "dataset": record["dataset"],
        "setting": record["setting"],
        "shots": str(record.get("shots") or 0),
        "seed": str(record["seed"]),
        "backbone_weights": record.get("backbone_weights", ""),
        "config_hash": record["config_hash"],
    }


def store_tag(store: ResultStore) -> dict[str, str]:
    """The tag naming the results.jsonl a run's record lives in."""
    return {STORE_TAG: str(store.path.resolve())}


def _abandoned(run) -> bool:
    """A RUNNING run whose invocation is gone (this invocation's own runs are not)."""
    return driver_is_dead(run.data.tags.get(DRIVER_TAG, ""))


class Recorder:
    """Writes each cell's files, its line in ``results.jsonl`` and its MLflow run, in that order."""

    def __init__(self, store: ResultStore, tracker: Tracker, parent: str | None) -> None:
        self.store, self.tracker, self.parent = store, tracker, parent

    def start(self, base: dict[str, Any]) -> str | None:
        """The cell's MLflow run, RUNNING while its job runs."""
        return self.tracker.start(base["cell_id"], {**cell_tags(base), **store_tag(self.store)}, self.parent)

    def write(self, record: dict[str, Any], files: dict[str, bytes]) -> None:
        """The cell's folder, then its line: a record never names files that are not there, and a cell's folder
        keeps no file of an earlier attempt that this one did not write (an old ``error.txt`` beside a finish)."""
        cell_dir = self.store.dir / record["cell_id"]
        try:
            cell_dir.mkdir(parents=True, exist_ok=True)
            for name in set(CELL_FILES) - set(files):
                (cell_dir / name).unlink(missing_ok=True)
            for name, data in files.items():
                tmp = cell_dir / f".{name}.partial"
                try:
                    tmp.write_bytes(data)
                    tmp.replace(cell_dir / name)
                finally:
                    tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind
            self.store.append(record)
        except OSError as exc:
            raise RecordingError(f"cannot write the record of '{record['cell_id']}' in '{cell_dir}' ({exc})") from None
        kill_point("local_recorded")

    def log(self, record: dict[str, Any], run_id: str | None) -> None:
        """The record's params, metrics, tags and files into its MLflow run, then the run's end."""
        if run_id is None:
            return
        finished = record["status"] == "finished"
        if finished:
            self.tracker.log(
                run_id, params=record["params"], metrics=mlflow_metrics(record), tags=record.get("tags", {})
            )
            self.tracker.log_curves(run_id, record.get("history", {}))
        else:
            self.tracker.log(run_id, tags={"error": record.get("error", "")[:5000]})
        cell_dir = self.store.dir / record["cell_id"]
        for name in CELL_FILES:
            if (cell_dir / name).is_file():
                self.tracker.log_artifact(run_id, cell_dir / name)
        fit = Path(record.get("fit_file") or "")
        if finished and fit.is_file():  # the fit this cell trained: taken from the MLflow UI or a team's server
            for path in (fit, fit.with_suffix(".json")):
                self.tracker.log_artifact(run_id, path, "fit")
        kill_point("mlflow_logged")
        self.tracker.end(run_id, "FINISHED" if finished else "FAILED")

    def reconcile(self) -> dict[str, int]:
        """Bring MLflow up to date with the local records (see the module docstring); counts of what it did."""
        done: Counter[str] = Counter()
        runs = {r.info.run_id: r for r in self.tracker.runs()}
        if self.tracker.behind is not None:
            return done
        for record in self.store.latest().values():
            if record["status"] not in ("finished", "failed"):
                continue
            run = runs.get(record.get("mlflow_run_id") or "")
            want = "FINISHED" if record["status"] == "finished" else "FAILED"
            if run is not None and run.info.status == want:
                continue
            if run is not None and run.info.status == "RUNNING" and not _abandoned(run):
                continue  # an invocation that is still alive is finishing it
            if run is None:
                run_id = self.start(record)
                if run_id is None:
                    break
                self.store.append({**record, "mlflow_run_id": run_id})
                done["created"] += 1
            else:
                run_id = run.info.run_id
                done["completed"] += 1
            logged = run is not None and run.data.metrics  # a run killed after its metrics: the rest only
            self.log({**record, "metrics": {}, "efficiency": {}, "history": {}} if logged else record, run_id)
        named = {r.get("mlflow_run_id") for r in self.store.latest().values()}
        ours = store_tag(self.store)[STORE_TAG]
        for run in runs.values():
            if run.data.tags.get(STORE_TAG) != ours:
                continue  # its record is in another results folder, which this store cannot see
            if run.info.status == "RUNNING" and run.info.run_id not in named and _abandoned(run):
                self.tracker.end(run.info.run_id, "KILLED")
                done["killed"] += 1
        return done


def cell_files(result, config: dict, environment: dict) -> dict[str, bytes]:
    """The files of a cell's folder, from its result (``benchmark.job.CellResult``)."""
    files = {
        "config.json": json.dumps(config, indent=1, default=str).encode(),
        "environment.json": json.dumps(environment, indent=1).encode(),
    }
    if result.manifest:
        files["manifest.json"] = json.dumps(result.manifest, indent=1).encode()
    if result.status == "finished":
        buffer = io.StringIO()
        out = csv.DictWriter(buffer, fieldnames=list(result.sweep[0]), lineterminator="\n")
        out.writeheader()
        out.writerows(result.sweep)
        files["sweep.csv"] = buffer.getvalue().encode()
        files.update(result.figures)
        files["evidence.npz"] = result.evidence
    else:
        files["error.txt"] = (result.traceback or result.error).encode()
    return files
