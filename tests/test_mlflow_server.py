"""A lab's tracking server: a real ``mlflow server`` subprocess on a free loopback port, no mocks."""

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from benchmark.cli import main
from benchmark.store import ResultStore

GRID = {"datasets": ["SynthBrain", "SynthLiver", "SynthRetina"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlflow server`` with a sqlite backend and its own artifact destination, on loopback."""

    def __init__(self, folder: Path, port: int | None = None, backend: Path | None = None) -> None:
        self.folder, self.port = folder, port or _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts = folder / "artifacts"
        self.backend = backend or folder / "backend.db"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        cmd = [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", f"sqlite:///{self.backend}",
            "--artifacts-destination", str(self.artifacts), "--workers", "1",
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:  # its health endpoint: MlflowClient would retry with backoff for seconds
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("mlflow server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:  # uvicorn waits for open keep-alive connections; a server that goes down need not
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path / "server").start()
    yield srv
    srv.stop()


def _cli(*args, uri: str, env=None, **kw):
    full = {**os.environ, "MLFLOW_TRACKING_URI": uri, **(env or {})}
    return subprocess.run([sys.executable, "-m", "benchmark", *map(str, args)], capture_output=True, text=True,
                          env=full, **kw)  # fmt: skip


def _runs(uri: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("t")
    return client, client.search_runs([exp.experiment_id])


def test_artifacts_travel_through_the_server(server, write_protocol, tmp_path):
    proc = _cli("run", write_protocol(cell_figures=True, **GRID), uri=server.uri)
    assert proc.returncode == 0, proc.stderr
    assert "View run" not in proc.stdout and "View experiment" not in proc.stdout  # MLflow's lines, two a cell
    client, runs = _runs(server.uri)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in runs)
    for child in children:
        listed = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.json", "manifest.json", "samples.png", "sweep.csv"} <= listed
        stored = server.artifacts / child.info.experiment_id / child.info.run_id / "artifacts"
        assert (stored / "samples.png").stat().st_size > 0 and (stored / "manifest.json").is_file()
    assert not (tmp_path / "results" / "mlartifacts").exists()  # nothing went to a local folder instead


def test_a_dead_server_fails_fast_in_one_line(write_protocol, tmp_path):
    proc = _cli("run", write_protocol(**GRID), uri=f"http://127.0.0.1:{_free_port()}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "connection refused" in proc.stderr
    assert not (tmp_path / "results" / "t" / "results.jsonl").exists()


def test_refused_credentials_are_one_line(write_protocol):
    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        proc = _cli("run", write_protocol(**GRID), uri=f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "refused the credentials" in proc.stderr


def test_server_down_mid_grid_then_the_printed_sync_gives_one_finished_run_per_cell(server, write_protocol, tmp_path,
                                                                                   monkeypatch, capsys):  # fmt: skip
    # every cell is recorded locally while the server is down. The hint lacked the run's --results-dir: run as
    # printed, sync read another folder, said "up to date" and marked the runs of finished cells KILLED; the
    # hint's reason was cut mid-sentence
    path = write_protocol(**GRID)
    elsewhere = tmp_path / "elsewhere"
    grid = subprocess.Popen(
        [sys.executable, "-m", "benchmark", "run", str(path), "--results-dir", str(elsewhere)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": server.uri, "MEDAD_BENCH_TEST_KILL_AT": "cell_started:2:STOP",
             "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"},  # the harness's retries, without seconds of backoff
    )  # fmt: skip
    deadline = time.time() + 120
    while Path(f"/proc/{grid.pid}/stat").read_text().split()[2] != "T":
        assert time.time() < deadline and grid.poll() is None
        time.sleep(0.2)
    server.stop()
    grid.send_signal(signal.SIGCONT)
    out, err = grid.communicate(timeout=300)
    assert grid.returncode == 0, err
    assert [r["status"] for r in ResultStore(elsewhere, "t").latest().values()] == ["finished"] * 3
    behind = next(line for line in out.splitlines() if "MLflow is behind" in line)
    assert "(connection refused: is the server up?)" in behind
    hint = behind.split("catch it up with: ")[1]
    assert hint == f"python -m benchmark sync {path} --results-dir {elsewhere}"

    server.start()
    _, before = _runs(server.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    capsys.readouterr()
    assert main(["sync", str(path)]) == 2  # the protocol's own folder holds no record of this run
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no records" in err
    _, after = _runs(server.uri)
    assert {r.info.run_id: r.info.status for r in after} == {r.info.run_id: r.info.status for r in before}
    command = hint.split()
    assert command[:4] == ["python", "-m", "benchmark", "sync"]
    synced = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": server.uri})  # fmt: skip
    assert synced.returncode == 0, synced.stderr
    _, runs = _runs(server.uri)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    finished = sorted(r.data.tags["mlflow.runName"] for r in children if r.info.status == "FINISHED")
    assert finished == sorted(r["cell_id"] for r in ResultStore(elsewhere, "t").latest().values())  # one per cell
    assert not [r for r in runs if r.info.status == "RUNNING"]
    for child in children:
        if child.info.status == "FINISHED":
            assert "image_auroc" in child.data.metrics


def test_a_refused_connection_is_not_read_as_refused_credentials():
    """The message of a refused connection names the address: a port such as 34011 holds "401"."""
    from benchmark.tracking import _server_reason

    dead = ConnectionError(
        "HTTPConnectionPool(host='127.0.0.1', port=34011): Max retries exceeded with url: "
        "/api/2.0/mlflow/experiments/search (Caused by NewConnectionError('Failed to establish a new "
        "connection: [Errno 111] Connection refused'))"
    )
    assert _server_reason(dead, 5) == "connection refused: is the server up?"
    denied = RuntimeError("API request to endpoint /api/2.0/mlflow/experiments/search failed with error code 401")
    assert _server_reason(denied, 5).startswith("it refused the credentials")
    assert not _server_reason(RuntimeError("error code 4011 at port 1401"), 5).startswith("it refused")


def test_the_address_a_run_prints_shows_every_cell_in_mlflows_runs_table(write_protocol, tmp_path, capsys):
    """The MLflow UI as installed, in headless Chromium: from MLflow 3.10 an experiment opens on GenAI pages
    (traces, token usage) whatever its tags, and the runs table nests a run's cells under one collapsed row;
    the address printed after a run opens the model-training view with every cell a row. Its screenshot is the
    README's (``MEDAD_SCREENSHOTS=DIR`` keeps a copy)."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (.ci/run installs it)")
    path = write_protocol(
        methods={"winclip": {"scales": [2]}},
        settings=[{"name": "few_normal", "shots": [2]}, {"name": "few_shot", "shots": [2]}],
        datasets=["SynthBrain", "SynthLiver"],
    )
    assert main(["run", str(path)]) == 0
    printed = next(line for line in capsys.readouterr().out.splitlines() if "mlflow ui --backend-store-uri" in line)
    address = printed.split("# then open ")[1].split()[0]
    results = tmp_path / "results"
    cells = [r["cell_id"] for r in ResultStore(results, "t").latest().values()]
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert len(runs) == len(cells) + 1  # the invocation's run and a run per cell
    srv = Server(tmp_path / "ui", backend=results / "mlflow.db").start()
    try:
        shot = tmp_path / "mlflow-runs.png"
        page = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1600,900", "--virtual-time-budget=30000",
             f"--screenshot={shot}", "--dump-dom", address.replace("http://127.0.0.1:5000", srv.uri)],
            capture_output=True, text=True, timeout=240,
        ).stdout  # fmt: skip
    finally:
        srv.stop()
    assert "Run Name" in page and "Token Usage" not in page  # the runs table, not the GenAI overview
    assert f"<strong>{len(runs)}</strong> matching runs" in page  # every run listed (fewer than a page of 100)
    assert all(cell in page for cell in cells)  # each cell a row of its own, not nested under its invocation
    assert shot.stat().st_size > 20_000
    if os.environ.get("MEDAD_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["MEDAD_SCREENSHOTS"]) / shot.name)
