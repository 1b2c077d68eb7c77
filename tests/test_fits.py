"""Fits as files: stored once per key, reused by cells and invocations, checked, retrained on --refit."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmark import fits, precision
from benchmark.backbones.cache import FeatureCache
from benchmark.cells import Cell
from benchmark.cli import main
from benchmark.data.catalog import load_catalog
from benchmark.data.loading import iterate_batches
from benchmark.data.splits import make_split
from benchmark.data.synthetic import write_segmentation_dataset
from benchmark.job import CellResult, obtain_fit, seed_everything
from benchmark.method import METHODS, MethodContext, TrainSet
from benchmark.protocol import BackboneSpec
from benchmark.store import ResultStore
from tests.conftest import SMALL

TINY = {"model": "tiny-vit-bert", "weights": "random-init", "seed": 0}
FAST = {"layers": [1, 2], "adapter_dim": 16, "epochs": 1, "batch_size": 8, "samples": 2, "progress": False}
TARGETS = ["SynthBrainSeg", "SynthLiverSeg", "SynthBrain"]  # the source itself (in-domain) and two others


@pytest.fixture(scope="module")
def dg_root(tmp_path_factory, catalog, synth_root):
    """The segmentation sets beside the session's synthetic sets (a third target in another layout)."""
    for name in ("SynthBrainSeg", "SynthLiverSeg"):
        write_segmentation_dataset(synth_root, catalog[name], SMALL)
    return synth_root


def _dg(write_protocol, root, **kw):
    return write_protocol(
        data_root=str(root), datasets=TARGETS, backbone=TINY, methods={"medclipseg": FAST},
        settings=[{"name": "domain_generalization", "source": "SynthBrainSeg"}], **kw,
    )  # fmt: skip


def _records(results, name="t"):
    return sorted(ResultStore(results, name).latest().values(), key=lambda r: r["cell_id"])


@pytest.mark.parametrize("workers", ["1", "2", "ray"])
def test_one_source_three_targets_train_once_and_a_rerun_reuses_it_bit_for_bit(
    write_protocol, dg_root, tmp_path, workers, capsys
):
    results = tmp_path / "results"
    capsys.readouterr()
    if workers == "ray":
        ray = pytest.importorskip("ray", reason="the dev extra installs ray")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            assert main(["run", str(_dg(write_protocol, dg_root)), "--executor", "ray"]) == 0
        finally:
            ray.shutdown()
    else:
        assert main(["run", str(_dg(write_protocol, dg_root)), "--workers", workers]) == 0
    records = _records(results)
    assert len(records) == 3 and all(r["status"] == "finished" for r in records)
    stored = sorted((results / "fits").glob("*.safetensors"))
    assert len(stored) == 1  # one training for the three targets
    key = stored[0].stem
    hows = sorted(r["params"]["fit"] for r in records)
    assert hows == [f"reused {key}", f"reused {key}", f"trained {key}"]
    trainer = next(r for r in records if r["params"]["fit"].startswith("trained"))
    assert capsys.readouterr().out.count(f"[fit reused from {trainer['cell_id']}]") == 2  # on the cells' lines
    assert all(r["params"]["fit_cell"] == trainer["cell_id"] for r in records if r is not trainer)
    assert {r["efficiency"]["fit_s"] for r in records} == {trainer["efficiency"]["fit_s"]}  # the fit's own time
    if workers != "1":
        return
    # the fit file: tensors only (no backbone), metadata that names what it is
    meta = json.loads(stored[0].with_suffix(".json").read_text())
    assert meta["method"] == "medclipseg" and meta["key"] == key and meta["cell"] == trainer["cell_id"]
    assert meta["backbone"].startswith("tiny-vit-bert") and meta["image_size"] == 32
    tensors = load_file(stored[0])
    assert tensors and not any("backbone" in k or k.startswith("model.backbone") for k in tensors)
    assert trainer["params"]["fit_file_bytes"] == stored[0].stat().st_size
    # a second experiment loads the fit and gives the very same numbers
    assert main(["run", str(_dg(write_protocol, dg_root, name="again"))]) == 0
    second = _records(results, "again")
    assert all(r["params"]["fit"] == f"reused {key}" for r in second)
    assert [r["metrics"] for r in second] == [r["metrics"] for r in records]
    # --refit trains the key again (once), a stored fit cut short is reported and trained again
    assert main(["run", str(_dg(write_protocol, dg_root, name="refit")), "--refit"]) == 0
    assert sorted(r["params"]["fit"].split()[0] for r in _records(results, "refit")) == ["reused", "reused", "trained"]
    stored[0].write_bytes(stored[0].read_bytes()[:100])
    capsys.readouterr()
    assert main(["run", str(_dg(write_protocol, dg_root, name="cut"))]) == 0
    warned = [line for line in capsys.readouterr().out.splitlines() if "is corrupt or truncated" in line]
    assert len(warned) == 1 and "training it again" in warned[0]
    assert [r["metrics"] for r in _records(results, "cut")] == [r["metrics"] for r in records]


def test_a_cell_killed_after_its_fit_resumes_without_training(write_protocol, dg_root, tmp_path):
    path = write_protocol(methods={"mvfa": MVFA_FAST}, **FEW)
    env = {**os.environ, "MEDAD_BENCH_TEST_KILL_AT": "fit_saved"}
    killed = subprocess.run([sys.executable, "-m", "benchmark", "run", str(path)], capture_output=True, env=env)
    assert killed.returncode == 137
    results = tmp_path / "results"
    assert ResultStore(results, "t").latest() == {}  # nothing recorded, the fit stored
    assert len(list((results / "fits").glob("*.json"))) == 1
    assert main(["run", str(path), "--resume"]) == 0
    (record,) = ResultStore(results, "t").latest().values()
    assert record["status"] == "finished" and record["params"]["fit"].startswith("reused ")


VIT = BackboneSpec("tiny-vit", "random-init", 0)
CNN = BackboneSpec("mobilenetv3_small_050", "random-init", 0)
RESNET = BackboneSpec("resnet18", "random-init", 0)
NONE = BackboneSpec("none", "none")
ROUND_TRIPS = {  # method: (params, backbone, setting, shots, image size), tiny and one epoch
    "mvfa": ({"mode": "official", "layers": [1, 2, 3, 4], "epochs": 1}, VIT, "few_shot", 2, 32),
    "april_gan": ({"layers": [1, 2, 3, 4], "memory_layers": [2, 4], "epochs": 1}, VIT, "few_normal", 2, 32),
    "anomalyclip": ({"layers": [1, 2, 3, 4], "dpam_blocks": 3, "deep_depth": 2, "epochs": 1}, VIT, "few_shot", 2, 32),
    "adaclip": ({"layers": [2, 4], "prompt_depth": 2, "k_clusters": 3, "epochs": 1, "batch_size": 4}, VIT, "few_shot",
                2, 32),
    "aaclip": ({"levels": [2, 4], "image_adapt_until": 2, "text_adapt_until": 1, "vv_blocks": 3, "text_epochs": 1,
                "image_epochs": 1, "blur_kernel": 3}, VIT, "few_shot", 2, 32),
    "madclip": ({"layers": [2, 4], "context_length": 4, "epochs": 1, "augment": False}, VIT, "few_shot", 2, 32),
    "medclipseg": (FAST, BackboneSpec(**TINY), "supervised", None, 32),
    "medsad_clip": ({"layers": [1, 2, 3, 4], "heads": 4, "decoder_hidden": 16, "epochs": 1}, VIT, "supervised", None,
                    32),
    "mcmiad": (
        {"text_model": "tiny-vit", "text_weights": "random-init", "dim": 32, "heads": 4, "ffn": 64, "neighbourhood": 3,
         "epochs": 1}, CNN, "few_normal", 2, 64,
    ),
    "bgad": ({"meta_epochs": 1, "sub_epochs": 1, "n_batch": 256, "coupling_blocks": 2, "pos_embed_dim": 16}, CNN,
             "few_shot", 2, 64),
    "dra": ({"batch_size": 6, "steps_per_epoch": 2, "epochs": 1, "references": 2}, RESNET, "few_shot", 2, 32),
    "uniad": ({"stride": 8, "dim": 32, "heads": 4, "ffn": 64, "encoder_blocks": 1, "decoder_blocks": 1,
               "neighbourhood": 3, "epochs": 1}, CNN, "few_normal", 2, 32),
    "simplenet": ({"pretrain_dim": 64, "target_dim": 64, "dsc_hidden": 32, "epochs": 1}, RESNET, "few_normal", 2, 32),
    "mkd": ({"cloner": [8, 0, 8, 0, 8, 64, 0, 8, 128, 0, 8, 256, 0, 8, 512, 0], "epochs": 1}, RESNET, "few_normal",
            2, 64),
    "unet": ({"encoder_depth": 3, "decoder_channels": [16, 8, 4], "epochs": 1, "batch_size": 4}, RESNET, "supervised",
             None, 32),
    "attention_unet": ({"channels": [4, 8, 16], "strides": [2, 2], "epochs": 1, "batch_size": 4}, NONE, "supervised",
                       None, 32),
    "rolling_unet": ({"widths": [4, 8, 8, 16, 16], "epochs": 1, "batch_size": 4}, NONE, "supervised", None, 32),
    "nnunet": ({"epochs": 1, "iterations_per_epoch": 2, "val_iterations": 1}, NONE, "supervised", None, 32),
    "anomalib:Patchcore": ({"batch_size": 4, "coreset_sampling_ratio": 0.5}, RESNET, "few_normal", 2, 64),
    "anomalib:Fastflow": ({"batch_size": 4, "epochs": 1}, RESNET, "few_normal", 2, 64),
}  # fmt: skip


def fit_and_predict(name: str, root: str, fits: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Method ``name`` of ``ROUND_TRIPS`` fitted through the fit store ``fits`` (trained, or loaded where stored)
    on the synthetic sets under ``root``, and its prediction of the first test batch."""
    catalog = load_catalog()
    params, spec, setting, shots, size = ROUND_TRIPS[name]
    cls = METHODS.get(name)
    loo = ("SynthLiver", "SynthRetina") if setting in cls.auxiliary_settings else ()
    quiet = {"progress": False} if "progress" in {f.name for f in dataclasses.fields(cls.Params)} else {}
    parsed = dataclasses.asdict(cls.parse_params({**params, **quiet}, name))
    cell = Cell(name, "SynthBrain", setting, shots, 0, 0, parsed, spec, size, loo)
    split = make_split(Path(root), catalog, "SynthBrain", setting, shots, 0, loo)
    specs = {n: catalog[n] for n in {s.dataset for s in (*split.train, *split.auxiliary)} | {"SynthBrain"}}
    train = TrainSet(split.train, setting, shots, size, specs, split.valid, None, split.auxiliary)
    seed_everything(0)
    context = MethodContext(
        catalog["SynthBrain"], setting, shots, 0, size, torch.device("cpu"), spec, FeatureCache(None)
    )
    method = cls.build(cls.Params(**parsed), context)
    method, _, info = obtain_fit(method, cell, train, fits, 0.0, precision.Policy(), CellResult(cell.cell_id, ""))
    seed_everything(0)
    with torch.no_grad():
        pred = method.predict(next(iterate_batches(split.test, size, 8)).unlabelled())
    out = {"scores": pred.image_scores, "maps": pred.maps}
    return info, out | ({"uncertainty": pred.uncertainty} if pred.uncertainty is not None else {})


def test_every_trained_method_round_trips_its_fit_bit_for_bit_in_a_fresh_process(synth_root, tmp_path):
    """Each method's fit stored here and loaded by a fresh process: the same scores, maps and uncertainty, bit for
    bit; no file holds a frozen backbone."""
    fits = tmp_path / "fits"
    here = {name: fit_and_predict(name, str(synth_root), str(fits)) for name in ROUND_TRIPS}
    assert all(info["fit"].startswith("trained ") for info, _ in here.values())
    code = (
        "import sys, torch\nfrom tests.test_fits import ROUND_TRIPS, fit_and_predict\n"
        "torch.save({n: fit_and_predict(n, sys.argv[1], sys.argv[2]) for n in ROUND_TRIPS}, sys.argv[3])"
    )
    done = subprocess.run([sys.executable, "-c", code, str(synth_root), str(fits), str(tmp_path / "fresh.pt")],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=True)
    for name, (info, ours) in here.items():
        again, theirs = fresh[name]
        assert again["fit"] == info["fit"].replace("trained", "reused"), name
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
        stored = load_file(fits / f"{info['fit_key']}.safetensors")
        # a frozen backbone is never stored (DRA's feature extractor trains: stored, under ``model.extractor.``)
        frozen = [k for k in stored if any(p in k for p in ("backbone.", "feature_extractor.", "teacher_model."))]
        assert stored and not frozen, name


MVFA_FAST = {"mode": "official", "layers": [2, 4], "epochs": 1, "progress": False}
FEW = {"datasets": ["SynthBrain"], "settings": [{"name": "few_shot", "shots": [2]}]}
OFFICIAL = Path(__file__).parent / "data" / "official"


def test_a_trained_fit_is_an_mlflow_artifact_a_checkpoint_and_bad_checkpoints_are_one_line_errors(
    write_protocol, tmp_path, capsys
):
    from mlflow.tracking import MlflowClient

    results = tmp_path / "results"
    assert main(["run", str(write_protocol(name="fit", methods={"mvfa": MVFA_FAST}, **FEW))]) == 0
    (trained,) = ResultStore(results, "fit").latest().values()
    (fit,) = (results / "fits").glob("*.safetensors")
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    run = client.get_run(trained["mlflow_run_id"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "fit")} == {f"fit/{fit.name}",
                                                                               f"fit/{fit.stem}.json"}  # fmt: skip
    assert run.data.params["fit_file_bytes"] == str(fit.stat().st_size)
    # --save-fits none: trained again (--refit), nothing logged
    path = write_protocol(name="quiet", methods={"mvfa": MVFA_FAST}, **FEW)
    assert main(["run", str(path), "--refit", "--save-fits", "none"]) == 0
    (quiet,) = ResultStore(results, "quiet").latest().values()
    assert quiet["params"]["fit"].startswith("trained ") and not client.list_artifacts(quiet["mlflow_run_id"], "fit")
    # the fit file given as a checkpoint: its own row, the same numbers as the cell that trained it
    given = write_protocol(name="given", methods={"mvfa": {"checkpoint": str(fit)}}, **FEW)  # its params: the fit's
    assert main(["run", str(given)]) == 0
    (record,) = ResultStore(results, "given").latest().values()
    assert record["fit_source"] == "checkpoint" and record["variant"] == "MVFA (official) (checkpoint)"
    assert record["metrics"] == trained["metrics"]

    # bad checkpoints: one line each, exit 2, nothing recorded finished
    other = {"model": "tiny-vit-8l", "weights": "random-init", "seed": 0}
    before = [  # refused before anything runs: nothing recorded
        ({"mvfa": {**MVFA_FAST, "checkpoint": str(tmp_path / "none.safetensors")}}, "does not exist"),
        ({"april_gan": {"checkpoint": str(fit)}}, "method 'mvfa' in the fit, 'april_gan' here"),
        ({"mvfa": {**MVFA_FAST, "checkpoint": str(fit), "backbone": other}},
         "backbone 'tiny-vit / random-init (random-init, seed 0)' in the fit"),
        ({"mvfa": {**MVFA_FAST, "checkpoint": str(fit), "image_size": 48}}, "image_size 32 in the fit, 48 here"),
        ({"mvfa": {**MVFA_FAST, "checkpoint": str(fit), "layers": [1, 2]}},
         "parameter layers [2, 4] in the fit, [1, 2] here"),
        ({"winclip": {"checkpoint": str(fit)}}, "method 'winclip' learns no fit state"),
        ({"mvfa": {**MVFA_FAST, "checkpoint": {"SynthLiver": str(fit)}}},
         "checkpoint: no file for dataset 'SynthBrain' (it names SynthLiver)"),
        ({"bgad": {"checkpoint": str(fit), "checkpoint_format": "official"}},
         "'bgad' has no importer of its authors' checkpoints"),
        ({"mvfa": {**MVFA_FAST, "checkpoint": str(OFFICIAL / "mvfa_official_tiny.pth")}}, "has no metadata"),
        ({"mvfa": {**MVFA_FAST, "checkpoint": str(fit), "checkpoint_format": "theirs"}},
         "expected one of ours, official"),
    ]  # fmt: skip
    for i, (methods, message) in enumerate(before):
        capsys.readouterr()
        assert main(["run", str(write_protocol(name=f"b{i}", methods=methods, **FEW))]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not ResultStore(results, f"b{i}").path.exists()
    cut = tmp_path / "cut" / fit.name
    cut.parent.mkdir()
    cut.write_bytes(fit.read_bytes()[:-64])
    cut.with_suffix(".json").write_bytes(fit.with_suffix(".json").read_bytes())
    during = [  # found by the cell: it fails, exit 2
        ({"mvfa": {**MVFA_FAST, "checkpoint": str(cut)}}, "is corrupt or truncated"),
        ({"mvfa": {**MVFA_FAST, "checkpoint": str(OFFICIAL / "april_gan_official_tiny.pth"),
                   "checkpoint_format": "official"}}, "expected a state dict under 'seg_adapters'"),
    ]  # fmt: skip
    for i, (methods, message) in enumerate(during):
        capsys.readouterr()
        assert main(["run", str(write_protocol(name=f"d{i}", methods=methods, **FEW))]) == 2
        assert message in capsys.readouterr().out
        assert [r["status"] for r in ResultStore(results, f"d{i}").latest().values()] == ["failed"]


def test_a_timm_network_that_trains_is_kept_in_the_fit_a_frozen_one_is_not():
    """STFPM's student is a ``TimmFeatureExtractor`` that trains: part of the fit; its teacher is frozen: not."""
    from types import SimpleNamespace

    from anomalib.models.components import TimmFeatureExtractor

    module = torch.nn.Module()
    module.teacher = TimmFeatureExtractor("resnet18", ["layer1"], pre_trained=False)
    module.student = TimmFeatureExtractor("resnet18", ["layer1"], pre_trained=False, requires_grad=True)
    tensors, _ = fits.state_of(SimpleNamespace(fit_state=("module",), module=module))
    assert any(k.startswith("module.student.") for k in tensors)
    assert not any(k.startswith("module.teacher.") for k in tensors)
