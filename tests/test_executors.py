"""Cells on worker processes and on Ray give the serial run's records, cell for cell; a dead worker fails
only its cell."""

import multiprocessing
from pathlib import Path

import pytest
import torch
from conftest import protocol_file
from mlflow.tracking import MlflowClient

from benchmark.cli import main
from benchmark.data.loading import LoaderConfig, iterate_batches
from benchmark.executors import default_workers, usable_cores
from benchmark.store import ResultStore

GRID = {
    "datasets": ["SynthBrain", "SynthLiver"],
    "settings": ["zero_shot_loo", {"name": "few_shot", "shots": [2]}],
    "methods": {
        "winclip": {"scales": [2]},
        "mvfa": {"layers": [1, 2, 3, 4], "epochs": 1, "progress": False},  # trained: one epoch is enough
    },
}


def _records(results):
    return list(ResultStore(results, "t").records())


def _metrics(results) -> dict:
    return {
        r["cell_id"]: r["metrics"] for r in ResultStore(results, "t").latest().values() if r["status"] == "finished"
    }


@pytest.fixture(scope="module")
def serial(tmp_path_factory, synth_root, mlflow_template):
    """The grid run serially with one torch thread, as each of two workers on two cores has: reductions run
    in the same order, so metrics agree bit for bit (across thread counts they differ in the 8th digit). Once
    per test process."""
    folder = tmp_path_factory.mktemp("serial")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", str(protocol_file(folder, synth_root, mlflow_template, **GRID))]) == 0
    finally:
        torch.set_num_threads(threads)
    return _metrics(folder / "results")


def _check_like_serial(results, serial):
    assert _metrics(results) == serial and len(serial) == 8
    lines = _records(results)
    assert len(lines) == len(serial) and all(r["status"] == "finished" for r in lines)
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.tags["mlflow.runName"] for r in children) == sorted(serial)
    assert all(r.info.status == "FINISHED" for r in runs)


def test_by_default_workers_use_every_core_and_give_the_serial_records(serial, write_protocol, tmp_path, monkeypatch,
                                                                       capsys):  # fmt: skip
    cores = usable_cores()
    if cores < 2:
        pytest.skip("one core: the default runs one cell after another")
    monkeypatch.delenv("MEDAD_BENCH_WORKERS")  # the test suite's own setting (conftest)
    path = write_protocol(results_dir=str(tmp_path / "local"), **GRID)
    capsys.readouterr()
    assert main(["run", str(path)]) == 0
    workers = default_workers([])  # one per core, unless memory is short
    if workers > 1:
        said = f"cells run on: {workers} local worker processes of {cores // workers} torch thread(s)"
    else:  # too little memory for a second worker
        said = "cells run on: one cell after another in this process"
    assert said in capsys.readouterr().out
    _check_like_serial(tmp_path / "local", serial)


def test_the_default_follows_the_environment_and_refuses_a_bad_value(write_protocol, monkeypatch, capsys):
    monkeypatch.setenv("MEDAD_BENCH_WORKERS", "0")
    assert main(["run", str(write_protocol())]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: MEDAD_BENCH_WORKERS: expected a number of processes >= 1, got '0'"
    monkeypatch.setenv("MEDAD_BENCH_WORKERS", "3")
    assert default_workers([]) == 3 and default_workers(["cuda:0", "cuda:1"]) == 3  # the environment wins
    monkeypatch.delenv("MEDAD_BENCH_WORKERS")
    assert default_workers(["cuda:0", "cuda:1"]) == 2  # one per GPU


def test_ray_gives_the_serial_records(serial, write_protocol, tmp_path):
    ray = pytest.importorskip("ray", reason="the dev extra installs ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        path = write_protocol(results_dir=str(tmp_path / "ray"), **GRID)
        assert main(["run", str(path), "--executor", "ray"]) == 0
    finally:
        ray.shutdown()
    _check_like_serial(tmp_path / "ray", serial)


def test_a_killed_worker_fails_its_cell_and_the_grid_goes_on(write_protocol, tmp_path, capsys):
    victim = "mvfa-SynthLiver-few_shot-k2-seed0"
    path = write_protocol(**GRID)
    # SIGKILL, in the worker running it; a process of its own, whose resource tracker speaks at its exit
    killed = _run_cli("run", str(path), "--workers", "2", env={"MEDAD_BENCH_TEST_KILL_AT": f"job@{victim}:1:KILL"})
    assert killed.returncode == 1, killed.stderr
    assert "leaked semaphore" not in killed.stderr  # tqdm's multiprocessing lock in the killed worker
    latest = {r["cell_id"]: r for r in ResultStore(tmp_path / "results", "t").latest().values()}
    assert latest[victim]["status"] == "failed"
    assert "worker process died (signal SIGKILL)" in latest[victim]["error"]
    assert sum(r["status"] == "finished" for r in latest.values()) == 7
    assert main(["run", str(path), "--resume", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == 7 and "finished 1, skipped 7, failed 0" in out


def test_loader_workers_never_change_the_batches(synth_root, catalog):
    from benchmark.data.layout import read_split

    samples = read_split(synth_root, catalog["SynthBrain"], "test")
    plain = list(iterate_batches(samples, 32, 3))
    for workers in (1, 2):
        loaded = list(iterate_batches(samples, 32, 3, LoaderConfig(workers)))
        assert [b.keys for b in loaded] == [b.keys for b in plain]
        assert all(
            torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
            for a, b in zip(loaded, plain, strict=True)
        )


def _write_same_key(root: str, rounds: int) -> None:
    from benchmark.backbones.cache import FeatureCache

    for i in range(rounds):
        entry = next(iter(Path(root).rglob("*.pt")), None)
        if entry is not None and i % 2:
            entry.unlink(missing_ok=True)  # both processes keep rewriting the one key
        out = FeatureCache(root).cached({"r": 1}, ["k" * 40], torch.zeros(1, 3, 4, 4),
                                        lambda x: {"f": torch.arange(4096.0)[None]})  # fmt: skip
        assert torch.equal(out["f"][0], torch.arange(4096.0)), i


def test_concurrent_writers_of_one_cache_key_never_tear_it(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_same_key, args=(str(tmp_path), 30)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    entries = list(tmp_path.rglob("*.pt"))
    assert len(entries) == 1 and not list(tmp_path.rglob("*.tmp*"))
    assert torch.equal(torch.load(entries[0])["f"], torch.arange(4096.0))


def test_without_ray_the_executor_is_a_one_line_error(write_protocol, monkeypatch, capsys, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    assert main(["run", str(write_protocol(datasets=["SynthBrain"], fresh_results=True)), "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install -e '.[ray]'" in err
    assert not (tmp_path / "results").exists()  # refused before anything was recorded


@pytest.mark.parametrize(
    ("resources", "expected"),
    [({"gpu": 1}, "resources.gpu: unknown key"), ({"cpus": 0}, "resources.cpus: expected a number > 0")],
)
def test_resources_are_validated(write_protocol, capsys, resources, expected):
    assert main(["run", str(write_protocol(resources=resources)), "--dry-run"]) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("resources", [{"gpus": 1}, {"cpus": 1}, {"gpus": 1, "cpus": 4}])
def test_the_documented_top_level_resources_key_is_read(write_protocol, catalog, resources):
    # the reader finished before 'resources' was marked used: every top-level resources key was refused
    from benchmark.cells import cell_resources, expand
    from benchmark.protocol import load_protocol

    protocol = load_protocol(write_protocol(resources=resources))
    cells = expand(protocol, catalog)
    assert protocol.resources == {k: float(v) for k, v in resources.items()}
    assert cell_resources(protocol, cells[0]) == protocol.resources


def test_workers_with_another_executor_is_a_one_line_error(write_protocol, capsys, tmp_path):
    assert main(["run", str(write_protocol(fresh_results=True)), "--workers", "2", "--executor", "serial"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--workers" in err and "serial" in err
    assert not (tmp_path / "results").exists()


def _processes_with(marker: str) -> list[int]:
    """Pids of live processes whose environment holds ``marker`` (read from /proc)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="processes are found through /proc")
def test_workers_end_with_a_sigkilled_driver(write_protocol, tmp_path):
    # they computed on for ~17 s, then each printed a BrokenPipeError traceback (on a GPU node holding GPUs)
    import os
    import subprocess
    import sys
    import uuid

    marker = f"MEDAD_TEST_DRIVER={uuid.uuid4().hex}"
    env = {**os.environ, "MEDAD_BENCH_TEST_KILL_AT": "cell_started:2:KILL", marker.split("=")[0]: marker.split("=")[1]}
    env.pop("MLFLOW_TRACKING_URI", None)
    path = write_protocol(**GRID)
    # stderr is a pipe every worker inherits: run() returns once the driver and all its workers are gone
    proc = subprocess.run([sys.executable, "-m", "benchmark", "run", str(path), "--workers", "2"],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == -9
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert _processes_with(marker) == []


def _run_cli(*args: str, env: dict | None = None):
    import os
    import subprocess
    import sys

    full = {**os.environ, **(env or {})}
    full.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "benchmark", *args], capture_output=True, text=True, env=full,
                          timeout=300)  # fmt: skip


def test_ray_refuses_resources_no_node_has_and_an_address_that_does_not_answer(write_protocol, tmp_path):
    # both waited: the task forever after 'Started a local Ray instance', the address for minutes
    pytest.importorskip("ray", reason="the dev extra installs ray")
    methods = {"winclip": {"scales": [2], "resources": {"gpus": 64}}}
    refused = _run_cli("run", str(write_protocol(methods=methods, fresh_results=True)), "--executor", "ray")
    assert refused.returncode == 2, refused.stderr
    err = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "resources of 'winclip'" in err[0] and "64 GPUs" in err[0] and "no node" in err[0]
    assert "Traceback" not in refused.stderr and not ResultStore(tmp_path / "results", "t").path.exists()
    assert not (tmp_path / "results" / "mlflow.db").exists()  # refused before any run was started
    nowhere = _run_cli("run", str(write_protocol()), "--executor", "ray", "--address", "127.0.0.1:1")
    assert nowhere.returncode == 2 and nowhere.stderr.count("\n") == 1
    assert "--address 127.0.0.1:1: no Ray cluster answers there" in nowhere.stderr


def test_sigterm_under_ray_ends_runs_killed_with_the_resume_line(write_protocol, tmp_path):
    # ray.init replaced our SIGTERM handler: the driver aborted with exit 134 and a stack dump
    pytest.importorskip("ray", reason="the dev extra installs ray")
    stopped = _run_cli("run", str(write_protocol(**GRID)), "--executor", "ray",
                       env={"MEDAD_BENCH_TEST_KILL_AT": "cell_started:2:TERM"})  # fmt: skip
    assert stopped.returncode == 143, stopped.stderr
    assert any(line.startswith("interrupted (SIGTERM)") for line in stopped.stderr.splitlines())
    assert "--resume" in stopped.stderr and "Traceback" not in stopped.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
