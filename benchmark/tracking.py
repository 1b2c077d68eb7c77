"""MLflow logging, by the driver process only: one experiment per protocol, a parent run per invocation, a
child run per cell.

The store defaults to ``sqlite:///<results_dir>/mlflow.db`` with artifacts under ``<results_dir>/mlartifacts``;
a protocol's ``tracking.uri`` or the ``MLFLOW_TRACKING_URI`` variable overrides it. With an ``http(s)`` URI
(a lab's tracking server) the experiment keeps the server's artifact store, so artifacts travel through the
server. The local records come first: when an MLflow call fails, the tracker says so once, skips every
later call of the run, and MLflow is *behind* until ``--resume`` or ``sync`` catches it up.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmark.protocol import Protocol

# bounded HTTP retries for a tracking server (MLflow's defaults retry for minutes); a user's values win
# and no "View run ... at" lines of MLflow's on our output (two a cell)
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
DRIVER_TAG = "medad.driver"  # host:pid of the invocation that started a run (to find runs of dead drivers)
STORE_TAG = "medad.results"  # the results.jsonl holding a run's record (sync judges only the runs of its own)


def results_uri(results_dir: str | Path) -> str:
    """The tracking store of a results folder: ``MLFLOW_TRACKING_URI``, else its sqlite file."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + str((Path(results_dir) / "mlflow.db").resolve())


def tracking_uri(protocol: Protocol) -> str:
    if protocol.tracking_uri:
        return protocol.tracking_uri
    return results_uri(protocol.results_dir)


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def driver_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def driver_is_dead(driver: str) -> bool:
    """True when ``driver`` (host:pid) ran on this host and its process is gone; runs of other hosts are
    never judged."""
    host, _, pid = driver.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


@contextmanager
def _environ(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_server(uri: str, timeout_s: int = 5) -> str | None:
    """Why the tracking server at ``uri`` cannot be used (unreachable, refusing, bad credentials), asked once
    with a short timeout and no retries; None when it answers. Local stores are checked as folders."""
    if not is_remote(uri):
        return None
    from mlflow.tracking import MlflowClient

    _quiet()  # after MLflow's import, which sets its own log levels
    with _environ(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout_s)):
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as exc:
            return f"tracking server '{uri}' cannot be used ({_server_reason(exc, timeout_s)})"
    return None


def _server_reason(exc: BaseException, timeout_s: int | str) -> str:
    """A short reason for a failed request to a tracking server. A failed connection is recognised first (its
    message names the address, whose port may hold "401"); status codes only as whole numbers."""
    text = str(exc)
    for needles, reason in (
        (("Connection refused", "NewConnectionError", "Failed to establish"), "connection refused: is the server up?"),
        (("Name or service not known", "nodename nor servname", "getaddrinfo"), "unknown host"),
        (("timed out", "Timeout"), f"no answer within {timeout_s} s"),
    ):
        if any(n in text for n in needles):
            return reason
    if re.search(r"(?<!\d)(401|403)(?!\d)|Unauthorized|Forbidden|credentials", text):
        return (
            "it refused the credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, "
            "or MLFLOW_TRACKING_TOKEN"
        )
    return _reason(exc)


def _quiet() -> None:
    """MLflow's own log lines off our output: the tracker says each failure in one line (on a full disk MLflow
    logged SQLAlchemy's tracebacks at ERROR, some 200 lines)."""
    for name in ("alembic", "mlflow", "urllib3", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


# MLflow 3 opens an experiment of this kind in its classic view (runs, metric columns, charts), not GenAI's
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_tags(description: str) -> dict[str, str]:
    """The experiment's kind, and its description (the protocol's) as MLflow's note."""
    return {**EXPERIMENT_KIND, **({"mlflow.note.content": description} if description else {})}


class Tracker:
    """MLflow calls that never raise: the first failure is reported in one line and later calls are skipped."""

    def __init__(self, uri: str, experiment: str, artifact_dir: Path, description: str = "") -> None:
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.uri = uri
        self.behind: str | None = None
        self.experiment_id: str | None = None
        self.client = None
        self._call(self._open, experiment, artifact_dir, description)

    def _open(self, experiment: str, artifact_dir: Path, description: str) -> None:
        from filelock import FileLock
        from mlflow.tracking import MlflowClient

        _quiet()  # after MLflow's import, which sets its own log levels
        lock = None
        if self.uri.startswith("sqlite:///"):
            db = Path(self.uri.removeprefix("sqlite:///"))
            db.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(db) + ".lock")  # two first runs must not both create the schema
        with lock or _nothing():
            self.client = MlflowClient(tracking_uri=self.uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                location = None
                if not is_remote(self.uri):
                    artifact_dir.mkdir(parents=True, exist_ok=True)
                    location = artifact_dir.resolve().as_uri()
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                self.experiment_id = found.experiment_id
            have = found.tags if found is not None else {}
            for key, value in experiment_tags(description).items():
                if have.get(key) != value:
                    self.client.set_experiment_tag(self.experiment_id, key, value)

    def _call(self, fn, *args, even_if_behind: bool = False, **kwargs) -> Any:
        if self.behind is not None and not even_if_behind:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if self.behind is not None:
                return None
            self.behind = _server_reason(exc, os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "?"))
            print(
                f"warning: MLflow at '{self.uri}' failed ({self.behind}); results go on being recorded in "
                "results.jsonl, and MLflow catches up with `--resume` or `python -m benchmark sync`",
                file=sys.stderr,
            )
            return None

    def start(self, name: str, tags: dict[str, str], parent: str | None = None) -> str | None:
        tags = {**tags, "mlflow.runName": name, DRIVER_TAG: driver_id()}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self._call(lambda: self.client.create_run(self.experiment_id, tags=tags, run_name=name))
        return run.info.run_id if run is not None else None

    def log(
        self,
        run_id: str | None,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, Any] | None = None,
    ) -> None:
        if run_id is None:
            return
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self._call(
            self.client.log_batch,
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
            params=[Param(k, str(v)[:6000]) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    def log_curves(self, run_id: str | None, curves: dict[str, list[float]]) -> None:
        """Per-epoch values as one metric with steps 0, 1, ... (MLflow draws them as a curve)."""
        if run_id is None or not curves:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, values in curves.items() for step, v in enumerate(values)]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1,000 metrics a batch
            self._call(self.client.log_batch, run_id, metrics=metrics[start : start + 1000])

    def log_dict(self, run_id: str | None, data: dict, name: str) -> None:
        if run_id is not None:
            self._call(self.client.log_dict, run_id, data, name)

    def log_artifact(self, run_id: str | None, path: Path, folder: str | None = None) -> None:
        if run_id is not None:
            self._call(self.client.log_artifact, run_id, str(path), folder)

    def end(self, run_id: str | None, status: str, even_if_behind: bool = False) -> None:
        """``status``: FINISHED, FAILED or KILLED; a parent run is ended even after a failure (one more try)."""
        if run_id is not None and self.client is not None:
            self._call(self.client.set_terminated, run_id, status=status, even_if_behind=even_if_behind)

    def runs(self) -> list:
        """Every run of the experiment (for reconciling with the local records)."""
        if self.experiment_id is None:
            return []

        def every_page() -> list:
            runs, token = [], None
            while True:
                page = self.client.search_runs([self.experiment_id], max_results=1000, page_token=token)
                runs += list(page)
                token = page.token
                if not token:
                    return runs

        return self._call(every_page) or []


@contextmanager
def _nothing():
    yield
