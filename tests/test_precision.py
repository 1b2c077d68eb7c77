"""The precision policy: fp32 | tf32 | bf16 | fp16 per protocol or method entry, recorded per cell, hashed, cached
apart; bf16 runs every demo method on the CPU (autocast), and fp32 is the harness's numbers as before."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from benchmark import precision, training
from benchmark.cells import expand
from benchmark.cli import main
from benchmark.protocol import load_protocol
from benchmark.store import ResultStore

ROOT = Path(__file__).resolve().parents[1]
SHORT = {"epochs": 1, "meta_epochs": 1, "sub_epochs": 1}  # the demo's schedules, cut to one epoch


def _demo_methods() -> dict:
    """The README demo's method entries at the tests' size, each trained for one epoch."""
    methods = yaml.safe_load((ROOT / "protocols" / "demo.yaml").read_text())["methods"]
    # MCMIAD's 3x3 neighbourhood needs more than a 2x2 token grid: the demo's 64 px
    sizes = {name: 64 if name == "mcmiad" else 32 for name in methods}
    return {
        name: {k: SHORT.get(k, v) for k, v in raw.items()} | {"image_size": sizes[name]}
        for name, raw in methods.items()
    }


def _latest(results: Path) -> dict:
    return {r["cell_id"]: r for r in ResultStore(results, "t").latest().values()}


def test_bf16_runs_every_demo_method_on_the_cpu_and_the_cells_say_so(write_protocol, tmp_path, capsys):
    settings = [{"name": "few_shot", "shots": [2]}, {"name": "few_normal", "shots": [2]}]
    path = write_protocol(datasets=["SynthBrain"], settings=settings, methods=_demo_methods(), precision="bf16")
    assert main(["run", str(path)]) == 0
    latest = _latest(tmp_path / "results")
    assert {r["method"] for r in latest.values()} == set(_demo_methods())  # every method ran, none failed
    for cell_id, record in latest.items():
        assert record["status"] == "finished", record.get("error")
        assert cell_id.endswith("-bf16") and record["params"]["precision"] == "bf16"
        assert record["variant"].endswith("(bf16)")  # a row of its own, never averaged with fp32 seeds
    trained = {r["method"]: r["params"].get("training_precision") for r in latest.values()}
    assert trained["mvfa"] == "bf16" and trained["medsad_clip"] == "bf16"
    assert trained["medclipseg"] == "fp32"  # its published training runs without autocast: the method says so
    assert trained["winclip"] is None  # nothing trained
    recipes = [json.loads(p.read_text()) for p in (tmp_path / "results" / "cache").glob("*/recipe.json")]
    assert recipes and all(r["precision"] == "bf16" for r in recipes)  # never read by an fp32 cell
    capsys.readouterr()
    assert main(["tables", "t", "--results-dir", str(tmp_path / "results")]) == 0
    assert "Precision: bf16." in capsys.readouterr().out  # the caption names it


def test_fp32_is_the_default_and_changes_no_hash_no_id_and_no_number(write_protocol, tmp_path, catalog):
    grid = {"settings": [{"name": "few_shot", "shots": [2]}], "datasets": ["SynthBrain"]}
    layers = [1, 2, 3, 4]
    april_gan = {"layers": layers, "memory_layers": layers, "epochs": 1}
    grid["methods"] = {"winclip": {"scales": [2]}, "april_gan": april_gan}
    unset = load_protocol(write_protocol(**grid))
    cells = expand(unset, catalog)
    # no precision key: the config hashed as before the policy existed, and the ids of old stores
    assert all("precision" not in c.config(unset)["cell"] and not c.cell_id.endswith("fp32") for c in cells)
    assert main(["run", str(write_protocol(results_dir=str(tmp_path / "unset"), **grid))]) == 0
    grid["methods"]["april_gan"]["precision"] = "fp32"  # per method entry
    assert main(["run", str(write_protocol(results_dir=str(tmp_path / "fp32"), precision="fp32", **grid))]) == 0
    unset_records, fp32_records = _latest(tmp_path / "unset"), _latest(tmp_path / "fp32")
    assert list(unset_records) == list(fp32_records)
    for cell_id, record in unset_records.items():
        assert fp32_records[cell_id]["metrics"] == record["metrics"]  # bit for bit
        assert record["params"]["precision"] == "fp32" and "fp32" not in record["variant"]


@pytest.mark.parametrize(
    ("where", "key"), [({"precision": "half"}, "precision"), ({"methods": {"winclip": {"precision": 16}}}, "methods")]
)
def test_an_unknown_precision_is_one_line_naming_the_key(write_protocol, capsys, where, key):
    code = main(["run", str(write_protocol(**where))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "precision: expected one of fp32, tf32, bf16, fp16" in err
    assert (key == "precision" and ": precision:" in err) or "methods.winclip.precision" in err


def test_a_method_runs_its_published_precision_on_cuda_and_fp32_on_the_cpu():
    assert precision.resolve(None, "fp16", "cuda") == "fp16"  # MVFA's and April-GAN's autocast
    assert precision.resolve(None, "fp16", "cpu") == "fp32"  # their CPU path: autocast switches itself off
    assert precision.resolve("bf16", "fp16", "cpu") == "bf16"  # a protocol's choice wins


def test_training_follows_the_cell_precision_where_the_method_allows_it():
    layer = torch.nn.Linear(4, 1)
    seen = []

    def step(batch):
        out = layer(batch)
        seen.append(out.dtype)
        return out.float().pow(2).mean()

    for amp, expected, trained in ((True, torch.bfloat16, "bf16"), (False, torch.float32, "fp32")):
        config = training.TrainConfig(epochs=1, amp=amp, progress=False)
        with precision.running("bf16", "cpu") as policy:
            training.fit(layer.parameters(), step, lambda epoch: [torch.rand(2, 4)], config, torch.device("cpu"))
        assert seen[-1] == expected and policy.trained_in == trained
    with precision.running("fp16", "cpu") as policy:  # fp16 trains with loss scaling
        config = training.TrainConfig(epochs=1, progress=False)
        history = training.fit(layer.parameters(), step, lambda e: [torch.rand(2, 4)], config, torch.device("cpu"))
    assert seen[-1] == torch.float16 and policy.trained_in == "fp16" and torch.isfinite(layer.weight).all()
    assert len(history) == 1
