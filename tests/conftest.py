"""Shared fixtures: a small synthetic data root written once per session, and protocol writing."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmark.data.catalog import load_catalog
from benchmark.data.synthetic import MODALITIES, SyntheticConfig, write_dataset

SMALL = SyntheticConfig(
    seed=0,
    image_size=48,
    train_normal=6,
    train_anomalous=4,
    valid_normal=4,
    valid_anomalous=4,
    test_normal=5,
    test_anomalous=5,
)


# the grids tests run go one cell after another in their own process unless a test asks for workers: the test
# processes already use every core (pyproject's ``-n auto``)
os.environ["MEDAD_BENCH_WORKERS"] = "1"


def pytest_configure(config) -> None:
    """Each test process gets its share of the cores as torch threads, and so do the processes it starts:
    oversubscribed threads slow everything down many times over."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = max(1, (os.cpu_count() or 1) // workers)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def catalog():
    return load_catalog()


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory, catalog) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    for name in MODALITIES:
        write_dataset(root, catalog[name], SMALL)
    return root


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables made: MLflow makes a new store by running its schema migrations
    (1.6 s on 2 cores), here once per test process instead of once per run."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def protocol_file(
    folder: Path, synth_root: Path, template: Path | None, fresh_results: bool = False, **overrides
) -> Path:
    """``folder/protocol.yaml``: a small, valid protocol (overridable per key) whose results go to
    ``folder/results``. Its results folder starts with an empty MLflow store (``template``), unless
    ``fresh_results=True`` (tests that check that nothing is written)."""
    data = {
        "version": 1,
        "name": "t",
        "data_root": str(synth_root),
        "results_dir": str(folder / "results"),
        "datasets": ["SynthBrain", "SynthLiver"],
        "settings": [{"name": "few_normal", "shots": [2]}],
        "seeds": [0],
        "image_size": 32,
        "batch_size": 8,
        "backbone": {"model": "tiny-vit", "weights": "random-init", "seed": 0},
        "methods": {"winclip": {"scales": [2]}},
        "figure_samples": 2,
        "cell_figures": False,  # rendered by the tests that look at them (0.3 s a cell)
        "synthetic": dataclasses.asdict(SMALL),
    }
    data.update(overrides)
    for key in [k for k, v in data.items() if v is None]:
        del data[key]
    # tiny sizes everywhere: a method's native size (240 px and more) would win over the protocol's
    size = data.get("image_size", 32)
    data["methods"] = {m: {"image_size": size, **(raw or {})} for m, raw in data["methods"].items()}
    path = folder / "protocol.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    store = Path(data["results_dir"]) / "mlflow.db"
    if template is not None and not fresh_results and not store.exists():
        store.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, store)
    return path


@pytest.fixture
def write_protocol(tmp_path, synth_root, mlflow_template):
    """``protocol_file`` in the test's folder."""

    def write(**overrides) -> Path:
        return protocol_file(tmp_path, synth_root, mlflow_template, **overrides)

    return write


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def relabel_backbone(results_dir: Path, experiment: str, new: str, label: str) -> None:
    """A copy of ``experiment``'s records as experiment ``new`` with every backbone label set to ``label``: what
    a report reads of a run on that backbone (the real weights are not on this machine; the numbers stay the
    tiny backbone's, and only the report layer is under test)."""
    import json

    source = Path(results_dir) / experiment / "results.jsonl"
    target = Path(results_dir) / new / "results.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    target.write_text("".join(json.dumps({**r, "backbone": label} if "backbone" in r else r) + "\n" for r in lines))


class LocalHub:
    """A local stand-in for the Hugging Face Hub on 127.0.0.1 (the endpoints ``hf_hub_download`` and
    ``snapshot_download`` call), serving ``files[repo][name]``."""

    COMMIT = "c" * 40

    def __init__(self, files: dict[str, dict[str, bytes]]) -> None:
        import hashlib
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
                self.send_response(code)
                for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(key, value)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _file(self, head: bool) -> None:
                parts = self.path.split("?")[0].strip("/").split("/")  # REPO/resolve/REVISION/NAME
                data = files.get("/".join(parts[:2]), {}).get("/".join(parts[4:]))
                if data is None:
                    return self._send(404, headers={"X-Error-Code": "EntryNotFound"}, head=head)
                etag = '"' + hashlib.sha1(data).hexdigest() + '"'
                self._send(200, data, {"X-Repo-Commit": hub.COMMIT, "ETag": etag}, head)

            def do_HEAD(self) -> None:
                self._file(True)

            def do_GET(self) -> None:
                if not self.path.startswith("/api/models/"):
                    return self._file(False)
                parts = self.path.split("?")[0].split("/")
                repo = files.get("/".join(parts[3:5]), {})
                if "/tree/" in self.path:
                    body = [{"type": "file", "oid": hashlib.sha1(d).hexdigest(), "size": len(d), "path": n}
                            for n, d in repo.items()]  # fmt: skip
                else:
                    body = {"id": "/".join(parts[3:5]), "sha": hub.COMMIT, "siblings": [{"rfilename": n} for n in repo]}
                self._send(200 if repo else 404, json.dumps(body).encode(), {"Content-Type": "application/json"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def run(self, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
        """``args`` in a fresh process whose Hub is this one and whose cache is under ``tmp_path``."""
        env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{self.server.server_port}",
               "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home")}  # fmt: skip
        for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
            env.pop(name, None)
        return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
