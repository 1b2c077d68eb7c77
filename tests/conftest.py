"""Shared fixtures: a small synthetic data root written once per session, and protocol writing."""

from __future__ import annotations

import dataclasses
import os
import shutil
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
