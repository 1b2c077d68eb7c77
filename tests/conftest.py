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
def seg_root(tmp_path_factory, catalog) -> Path:
    """Two segmentation-only sets (MedCLIPSeg's layout: lesion images and masks, no normal images)."""
    from benchmark.data.synthetic import write_segmentation_dataset

    root = tmp_path_factory.mktemp("segmentation")
    for name in ("SynthBrainSeg", "SynthLiverSeg"):
        write_segmentation_dataset(root, catalog[name], SMALL)
    return root


@pytest.fixture(scope="session")
def synth_train(catalog, synth_root):
    """``make(setting, shots=None) -> (TrainSet, Split)``: a SynthBrain cell's training set at 32 px, its zero-shot
    sources the two other synthetic sets, and the split (its test images)."""
    from benchmark.data.splits import make_split
    from benchmark.method import TrainSet

    def make(setting: str, shots: int | None = None):
        split = make_split(synth_root, catalog, "SynthBrain", setting, shots, 0, ("SynthLiver", "SynthRetina"))
        specs = {name: catalog[name] for name in {s.dataset for s in split.train} | {"SynthBrain"}}
        return TrainSet(split.train, setting, shots, 32, specs, split.valid), split

    return make


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


LFS_SUFFIXES = (".zip", ".tar", ".gz", ".bin", ".pt", ".pth", ".safetensors", ".npz")  # the Hub's LFS defaults


class LocalHub:
    """A local stand-in for the Hugging Face Hub on 127.0.0.1, serving ``files[repo][name]``: ``repo`` is
    ``owner/name`` for a model repository, ``datasets/owner/name`` for a dataset repository. What
    ``huggingface_hub`` asks of it: ``HEAD|GET /{repo}/resolve/{rev}/{name}`` (a regular file: its bytes with
    ``X-Repo-Commit`` and ``ETag``; an LFS file, by suffix: as the Hub, a 302 to a CDN on another port with
    ``X-Linked-Etag``, the SHA-256 it records, and ``X-Linked-Size``; the CDN answers ``Range`` requests with 206),
    the repository's info and tree (``snapshot_download``) and ``paths-info``.

    Switches: ``corrupt``, names whose served bytes differ from the recorded SHA-256 (same length); ``hang_first``,
    ``{name: n}``: the first GET of its bytes sends ``n`` of them and stalls (a download a test then kills).
    ``requests`` records every request as ``(method, path, {lower-case header: value})``."""

    COMMIT = "c" * 40

    def __init__(self, files: dict[str, dict[str, bytes]], corrupt=(), hang_first: dict[str, int] | None = None):
        import hashlib
        import re
        import threading
        import urllib.parse
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hub = self
        self.files, self.corrupt, self.hang_first = files, set(corrupt), dict(hang_first or {})
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._release = threading.Event()

        def git_sha1(data: bytes) -> str:
            return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

        def entry(name: str, data: bytes) -> dict:
            if not name.lower().endswith(LFS_SUFFIXES):
                return {"type": "file", "oid": git_sha1(data), "size": len(data), "path": name}
            lfs = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            return {"type": "file", "oid": git_sha1(name.encode()), "size": len(data), "path": name, "lfs": lfs}

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

            def _json(self, body) -> None:
                self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

            def _resolve(self, head: bool) -> None:
                path = urllib.parse.unquote(self.path.split("?")[0]).strip("/")
                match = re.fullmatch(r"((?:datasets/)?[^/]+/[^/]+)/resolve/[^/]+/(.+)", path)
                data = hub.files.get(match[1], {}).get(match[2]) if match else None
                if data is None:
                    return self._send(404, headers={"X-Error-Code": "EntryNotFound", "X-Repo-Commit": hub.COMMIT},
                                      head=head)  # fmt: skip
                if "lfs" not in entry(match[2], data):
                    etag = f'"{git_sha1(data)}"'
                    return self._send(200, data, {"X-Repo-Commit": hub.COMMIT, "ETag": etag}, head)
                sha256 = hashlib.sha256(data).hexdigest()
                location = f"{hub.cdn_url}/cdn/{sha256}?" + urllib.parse.urlencode({"repo": match[1], "name": match[2]})
                headers = {"X-Repo-Commit": hub.COMMIT, "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data)),
                           "ETag": f'"{git_sha1(match[2].encode())}"', "Location": location}  # fmt: skip
                self._send(302, b"", headers, head)

            def _cdn(self, head: bool) -> None:
                query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
                name, data = query["name"], hub.files[query["repo"]][query["name"]]
                if name in hub.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                start, code, headers = 0, 200, {"Accept-Ranges": "bytes"}
                asked = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if asked and not head:
                    start, code = int(asked[1]), 206
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                body = data[start:]
                hang = None if head else hub.hang_first.pop(name, None)
                if hang is None:
                    return self._send(code, body, headers, head)
                self.send_response(code)  # announces every byte, sends ``hang`` of them, and stalls
                for key, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body[:hang])
                self.wfile.flush()
                hub._release.wait(120)
                self.close_connection = True

            def _api(self) -> None:
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                match = re.fullmatch(
                    r"/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree|paths-info)/[^/]+)?.*", path
                )
                repo = (match[2] if match[1] == "models" else f"datasets/{match[2]}") if match else ""
                if repo not in hub.files:
                    return self._send(404 if path != "/api/agent-harnesses" else 200, b"{}",
                                      {"X-Error-Code": "RepoNotFound"})  # fmt: skip
                content = hub.files[repo]
                if match[3] in ("tree", "paths-info"):
                    if match[3] == "paths-info":
                        form = urllib.parse.parse_qs(
                            self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                        )
                        content = {n: content[n] for n in form.get("paths", []) if n in content}
                    return self._json([entry(n, d) for n, d in content.items()])
                self._json({"id": match[2], "sha": hub.COMMIT, "siblings": [{"rfilename": n} for n in content]})

            def _record(self) -> None:
                hub.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))

            def do_HEAD(self) -> None:
                self._record()
                self._cdn(True) if self.path.startswith("/cdn/") else self._resolve(True)

            def do_GET(self) -> None:
                self._record()
                if self.path.startswith("/cdn/"):
                    return self._cdn(False)
                self._api() if self.path.startswith("/api/") else self._resolve(False)

            def do_POST(self) -> None:
                self._record()
                self._api()

        self.server, self.cdn = (ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2))
        for server in (self.server, self.cdn):
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_port}"  # another origin, as the Hub's CDN

    def release(self) -> None:
        """Ends the stalled (``hang_first``) replies."""
        self._release.set()

    def env(self, tmp_path: Path) -> dict[str, str]:
        """The environment of a process whose Hub is this one and whose caches are under ``tmp_path``."""
        env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{self.server.server_port}",
               "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home"),
               "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip
        for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "HF_TOKEN"):
            env.pop(name, None)
        return env

    def run(self, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
        """``args`` in a fresh process whose Hub is this one and whose cache is under ``tmp_path``."""
        return subprocess.run([sys.executable, *args], env=self.env(tmp_path), capture_output=True, text=True,
                              timeout=300)  # fmt: skip
