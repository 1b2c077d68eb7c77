"""Every finished cell measures what it cost (times, memory, parameters, FLOPs of the whole forward pass with the
feature cache bypassed), records it and logs it to MLflow; ``tables --efficiency`` shows it per method."""

import math

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.utils.flop_counter import FlopCounterMode

from benchmark.backbones.clip import load_clip
from benchmark.cli import main
from benchmark.protocol import BackboneSpec
from benchmark.store import ResultStore

GRID = {
    "datasets": ["SynthBrain"],
    "settings": [{"name": "few_shot", "shots": [2]}],
    "methods": {"winclip": {"scales": [2]}, "mvfa": {"layers": [1, 2, 3, 4], "epochs": 1, "progress": False}},
}
FIGURES = {
    "fit_s", "batch_images", "model_ms_per_image", "ms_per_image", "images_per_s", "peak_memory_mb",
    "trainable_params", "params", "gflops_per_image",
}  # fmt: skip


def _finished(results) -> list[dict]:
    return [r for r in ResultStore(results, "t").records() if r["status"] == "finished"]


def test_every_finished_cell_records_and_logs_its_efficiency(write_protocol, tmp_path, capsys):
    path = write_protocol(cell_figures=False, **GRID)
    assert main(["run", str(path)]) == 0
    assert main(["run", str(path)]) == 0  # again, every feature now read from the cache
    results = tmp_path / "results"
    records = _finished(results)
    assert len(records) == 4
    assert not list(results.glob("t/*/*.png")) and len(list(results.glob("t/*/evidence.npz"))) == 2  # no PNGs
    for record in records:
        figures = record["efficiency"]
        assert set(figures) == FIGURES and all(math.isfinite(v) for v in figures.values())
        assert figures["ms_per_image"] >= figures["model_ms_per_image"] > 0 and figures["peak_memory_mb"] > 100
        assert figures["params"] > figures["trainable_params"] and figures["batch_images"] == 8
    by_cell = {}
    for record in records:
        by_cell.setdefault(record["cell_id"], []).append(record["efficiency"])
    # the forward pass is counted with the cache bypassed: a warm cache hides no FLOP
    assert all(cold["gflops_per_image"] == warm["gflops_per_image"] for cold, warm in by_cell.values())
    winclip, mvfa = (by_cell[f"{m}-SynthBrain-few_shot-k2-seed0"][0] for m in ("winclip", "mvfa"))
    assert winclip["trainable_params"] == 0 and winclip["fit_s"] >= 0
    mvfa_record = next(r for r in records if r["method"] == "mvfa")
    assert mvfa["trainable_params"] == mvfa_record["params"]["trainable_params"]  # the adapters: MVFA's own count
    # WinCLIP encodes the whole image and its windows: at least the backbone's own forward pass
    backbone = load_clip(BackboneSpec("tiny-vit", "random-init", 0), 32)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        backbone.model.encode_image(torch.rand(1, 3, 32, 32))
    assert winclip["gflops_per_image"] >= counter.get_total_flops() / 1e9 > 0

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    logged = client.get_run(records[-1]["mlflow_run_id"]).data.metrics
    assert logged["efficiency/gflops_per_image"] == pytest.approx(records[-1]["efficiency"]["gflops_per_image"])

    capsys.readouterr()
    assert main(["tables", "t", "--results-dir", str(results), "--efficiency"]) == 0
    out = capsys.readouterr().out
    assert "GFLOPs / image" in out and "ms / image (model)" in out and "Device: cpu" in out
    rows = [line for line in out.splitlines() if line.startswith(("| WinCLIP+", "| MVFA"))]
    assert len(rows) == 2 and all("| fp32 " in row for row in rows)
