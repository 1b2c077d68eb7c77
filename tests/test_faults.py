"""Faults a lab meets in its first week: interrupts and kills, corrupt caches, unwritable folders, races."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import protocol_file
from mlflow.tracking import MlflowClient

from benchmark.cli import main
from benchmark.store import ResultStore

TWO_CELLS = {"datasets": ["SynthBrain", "SynthLiver"]}


def _cli(*args, env=None, **kw) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    full.pop("MLFLOW_TRACKING_URI", None)
    # SIGINT as a terminal gives it: a test process started in the background (pytest-xdist's workers, `&` in a
    # script) ignores it, and its children inherit that
    return subprocess.run(
        [sys.executable, "-m", "benchmark", *map(str, args)], capture_output=True, text=True, env=full,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw,
    )  # fmt: skip


def _runs(results: Path, experiment: str = "t"):
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id]) if exp else []


def _children(runs):
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def _metrics(results: Path) -> dict:
    return {
        r["cell_id"]: r["metrics"] for r in ResultStore(results, "t").latest().values() if r["status"] == "finished"
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synth_root, mlflow_template) -> dict:
    """The metrics of the two cells run without interruption (once per test process)."""
    folder = tmp_path_factory.mktemp("reference")
    assert main(["run", str(protocol_file(folder, synth_root, mlflow_template, **TWO_CELLS))]) == 0
    return _metrics(folder / "results")


@pytest.mark.parametrize("point", ["cell_started", "cell_computed", "local_recorded", "mlflow_logged", "cell_ended"])
def test_sigkill_at_any_stage_then_resume_gives_one_finished_run_per_cell(write_protocol, tmp_path, point,
                                                                          uninterrupted):  # fmt: skip
    expected = uninterrupted
    path = write_protocol(**TWO_CELLS)
    killed = _cli("run", path, env={"MEDAD_BENCH_TEST_KILL_AT": f"{point}:2"})
    assert killed.returncode == 137, killed.stderr
    results = tmp_path / "results"
    _, runs = _runs(results)
    assert any(r.info.status == "RUNNING" for r in runs)  # the dead invocation's parent at least
    assert main(["run", str(path), "--resume"]) == 0  # in this process: the killed one is gone
    _, runs = _runs(results)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    finished = [r.data.tags["mlflow.runName"] for r in _children(runs) if r.info.status == "FINISHED"]
    assert sorted(finished) == sorted(expected)  # exactly one FINISHED child run per cell
    assert _metrics(results) == expected
    assert main(["tables", "t", "--results-dir", str(results)]) == 0


@pytest.mark.parametrize(("signal_name", "code"), [("TERM", 143), ("INT", 130)])
def test_interrupt_ends_runs_killed_and_resume_goes_on(write_protocol, tmp_path, signal_name, code):
    path = write_protocol(**TWO_CELLS)
    stopped = _cli("run", path, env={"MEDAD_BENCH_TEST_KILL_AT": f"cell_started:2:{signal_name}"})
    assert stopped.returncode == code
    assert stopped.stderr.strip().splitlines()[-1].startswith(f"interrupted (SIG{signal_name})")
    assert "--resume" in stopped.stderr and "Traceback" not in stopped.stderr
    results = tmp_path / "results"
    _, runs = _runs(results)
    status = {r.data.tags["mlflow.runName"]: r.info.status for r in runs}
    assert sorted(status.values()) == ["FINISHED", "KILLED", "KILLED"]  # cell 1, cell 2 and the parent
    assert [r["status"] for r in ResultStore(results, "t").records()] == ["finished"]  # nothing half-recorded
    assert main(["run", str(path), "--resume"]) == 0
    _, runs = _runs(results)
    assert sorted(r.info.status for r in _children(runs)) == ["FINISHED", "FINISHED", "KILLED"]
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_corrupt_cache_entries_are_removed_and_recomputed(write_protocol, tmp_path, capfd):
    path = write_protocol(datasets=["SynthBrain"])
    assert main(["run", str(path)]) == 0
    first = _metrics(tmp_path / "results")
    entries = sorted((tmp_path / "results" / "cache").rglob("*.pt"))
    entries[0].write_bytes(entries[0].read_bytes()[:40])  # cut short
    entries[1].write_bytes(b"")  # empty
    capfd.readouterr()
    assert main(["run", str(path)]) == 0
    warnings = [line for line in capfd.readouterr().err.splitlines() if "feature cache entry" in line]
    assert len(warnings) == 2 and all("corrupt" in w and "recomputed" in w for w in warnings)
    assert _metrics(tmp_path / "results") == first
    assert entries[0].stat().st_size > 40 and entries[1].stat().st_size > 0


@pytest.mark.parametrize("where", ["results", "experiment", "tracking"])
def test_unwritable_folders_fail_fast_in_one_line(write_protocol, tmp_path, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    overrides = {
        "results": {"results_dir": str(blocker / "results")},
        "tracking": {"tracking": {"uri": "sqlite:////proc/x/mlflow.db"}},
    }
    if where == "experiment":
        (tmp_path / "results").mkdir()
        (tmp_path / "results" / "t").write_text("a file where the experiment folder goes")
    proc = _cli("run", write_protocol(fresh_results=True, **overrides.get(where, {})))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert {"results": "results folder", "experiment": "experiment folder", "tracking": "tracking store folder"}[
        where
    ] in proc.stderr


def test_a_record_that_cannot_be_written_stops_the_grid_cleanly(write_protocol, tmp_path, capsys):
    path = write_protocol(**TWO_CELLS)
    cell_dir = tmp_path / "results" / "t" / "winclip-SynthLiver-few_normal-k2-seed0"
    cell_dir.parent.mkdir(parents=True)
    cell_dir.write_text("a file where the cell's folder goes")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the record of 'winclip-SynthLiver" in err
    _, runs = _runs(tmp_path / "results")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED", "KILLED"]


def test_two_first_runs_at_once_both_succeed(write_protocol, tmp_path):
    path = write_protocol(datasets=["SynthBrain"])
    procs = [subprocess.Popen([sys.executable, "-m", "benchmark", "run", str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    _, runs = _runs(tmp_path / "results")
    assert all(r.info.status == "FINISHED" for r in runs) and len(runs) - len(_children(runs)) == 2
    # the cell is computed once if the second invocation claimed while the first ran it, else once by each
    assert len(_children(runs)) == len(ResultStore(tmp_path / "results", "t").records()) in (1, 2)


def test_a_torn_last_line_never_swallows_the_next_record(write_protocol, tmp_path, capfd):
    path = write_protocol(datasets=["SynthBrain"])
    store = ResultStore(tmp_path / "results", "t")
    store.dir.mkdir(parents=True)
    store.path.write_text('{"config_hash": "x", "status": "finished", "metr')  # a write cut short
    assert main(["run", str(path)]) == 0
    assert len(store.records()) == 1 and store.records()[0]["status"] == "finished"
    assert "line 1 is not a whole record" in capfd.readouterr().err
    assert store.path.read_text().splitlines()[0].endswith('"metr')


def test_metrics_carry_the_time_of_logging(write_protocol, tmp_path):
    before = int(time.time() * 1000)
    assert main(["run", str(write_protocol(datasets=["SynthBrain"]))]) == 0
    client, runs = _runs(tmp_path / "results")
    (child,) = _children(runs)
    history = client.get_metric_history(child.info.run_id, "image_auroc")
    assert before <= history[0].timestamp <= int(time.time() * 1000)


def test_light_commands_import_no_torch_mlflow_or_open_clip(write_protocol, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(write_protocol(methods={"winclp": {}}).read_text())
    good = write_protocol(datasets=["SynthBrain"])
    probe = (
        "import sys\nfrom benchmark.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'open_clip', 'mlflow', 'timm') if m in sys.modules))"
    )
    for args in (["--help"], ["list"], ["run", str(good), "--dry-run"], ["run", str(bad)]):
        out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True).stdout
        assert out.strip().splitlines()[-1] == "[]", (args, out)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs (root mounts it, as CI runs); skipped where mounting is not allowed."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("a tmpfs cannot be mounted here")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_stops_cleanly_in_one_line(write_protocol, small_disk):
    # MLflow logged 2-5 SQLAlchemy tracebacks (219 lines) and a '.evidence.npz.partial' was left behind
    grid = {"datasets": ["SynthBrain", "SynthLiver", "SynthRetina"], "settings": ["zero_shot_loo"]}
    proc = _cli("run", write_protocol(results_dir=str(small_disk), **grid, figure_samples=4))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "SQLAlchemy" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0]
    assert not [p for p in small_disk.rglob("*") if p.name.endswith(".partial") or ".tmp" in p.name]
    assert all(r["status"] in ("finished", "failed") for r in ResultStore(small_disk, "t").records())


def test_a_feature_cache_write_on_a_full_disk_says_so(small_disk):
    # torch's writer failed with '[enforce fail at inline_container.cc:672] unexpected pos ...'
    import torch

    from benchmark.backbones.cache import FeatureCache

    big = {"f": torch.zeros(1, 512, 1024)}  # 2 MB: more than the disk holds
    with pytest.raises(OSError, match="No space left on device"):
        FeatureCache(small_disk).cached({"r": 1}, ["k" * 40], torch.zeros(1, 3, 4, 4), lambda x: big)
    assert not [p for p in small_disk.rglob("*") if p.is_file() and p.suffix != ".json"]


def test_a_second_invocation_skips_the_cells_a_live_one_is_running(write_protocol, tmp_path, capsys):
    # both computed every cell, and each cell got two FINISHED MLflow runs under two parents
    path = write_protocol(**TWO_CELLS)
    first = subprocess.Popen(
        [sys.executable, "-m", "benchmark", "run", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "MEDAD_BENCH_TEST_KILL_AT": "cell_started:1:STOP"},
    )  # fmt: skip
    deadline = time.time() + 120
    while Path(f"/proc/{first.pid}/stat").read_text().split()[2] != "T":  # stopped once it took its cells
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.2)
    try:
        assert main(["run", str(path)]) == 0
        out = capsys.readouterr().out
        assert out.count("being run by another invocation (") == 2 and "finished 0, skipped 2, failed 0" in out
        assert "2 cells were being run by another invocation" in out
    finally:
        first.send_signal(__import__("signal").SIGCONT)
    assert first.wait(timeout=300) == 0
    records = ResultStore(tmp_path / "results", "t").records()
    assert sorted(r["cell_id"] for r in records) == sorted(_metrics(tmp_path / "results"))  # each cell once
    _, runs = _runs(tmp_path / "results")
    assert len([r for r in _children(runs) if r.info.status == "FINISHED"]) == 2
    assert not (tmp_path / "results" / "t" / "running.json").exists()  # claims released at the end


def test_claims_of_other_hosts_hold_while_fresh_and_lapse_when_stale(tmp_path):
    # a claim of an invocation killed on another host (a container that came back under a new name) held
    # its cells for ever
    import json

    from benchmark.claims import STALE_S, Claims

    store = ResultStore(tmp_path, "t")
    store.dir.mkdir(parents=True)
    now = time.time()
    (store.dir / "running.json").write_text(json.dumps({
        "fresh": {"driver": "another-host:4242", "at": now - 60},
        "stale": {"driver": "another-host:4242", "at": now - STALE_S - 60},
        "dead": {"driver": f"{__import__('socket').gethostname()}:999999999", "at": now},
    }))  # fmt: skip
    claims = Claims(store)
    assert claims.take(["fresh", "stale", "dead", "new"]) == {"fresh": "another-host:4242"}
    held = json.loads((store.dir / "running.json").read_text())
    assert {h for h, c in held.items() if c["driver"] == claims.me} == {"stale", "dead", "new"}
    claims.touch()
    assert all(json.loads((store.dir / "running.json").read_text())[h]["at"] >= now for h in ("stale", "new"))
    claims.release()
    assert set(json.loads((store.dir / "running.json").read_text())) == {"fresh"}
    assert not list(store.dir.glob(".running.json.*"))


def test_ray_addresses_that_ray_resolves_are_not_probed():
    from benchmark.executors import _answers

    assert _answers("auto") is None and _answers("ray://localhost:10001") is None
    assert _answers("[::1]:1") is not None and _answers("127.0.0.1:1") is not None  # nothing listens on port 1
