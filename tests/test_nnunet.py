"""nnU-Net through nnunetv2: its real planning, preprocessing, training (a short trainer) and prediction in every
declared setting, in each cell's own folders; what enters them; the errors a user meets."""

import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.cli import main
from benchmark.data.loading import load_batch
from benchmark.data.splits import make_split
from benchmark.errors import BenchmarkError
from benchmark.method import TrainSet
from benchmark.store import ResultStore
from methods.models.nnunet import nnunet_package, trainer_class, write_raw_dataset
from methods.nnunet import NnUNet

SHORT = {"epochs": 2, "iterations_per_epoch": 2, "val_iterations": 1}


def test_nnunet_plans_trains_and_predicts_in_every_declared_setting(write_protocol, seg_root, tmp_path):
    """nnU-Net's own cycle in each setting: records finish with nnU-Net's epochs, its 2d plans' patch size and a
    map in [0, 1]; no nnU-Net folder variable leaks into this process; the cells' scratch folders are gone."""
    before = {k for k in os.environ if k.startswith("nnUNet")}
    scratch = set(Path(tempfile.gettempdir()).glob("nnunet-*"))
    detection = write_protocol(name="detection", datasets=["SynthBrain"], backbone=None, methods={"nnunet": SHORT},
                               settings=["supervised", {"name": "few_shot", "shots": [2]}])  # fmt: skip
    assert main(["run", str(detection), "--save-predictions"]) == 0
    segmentation = write_protocol(
        name="segmentation", data_root=str(seg_root), datasets=["SynthBrainSeg", "SynthLiverSeg"], backbone=None,
        methods={"nnunet": SHORT}, settings=[{"name": "data_fraction", "fractions": [100]},
                                             {"name": "domain_generalization", "source": "SynthBrainSeg"}],
    )  # fmt: skip
    assert main(["run", str(segmentation)]) == 0
    assert {k for k in os.environ if k.startswith("nnUNet")} == before
    assert set(Path(tempfile.gettempdir()).glob("nnunet-*")) == scratch
    store = ResultStore(tmp_path / "results", "detection")
    latest = [*store.latest().values(), *ResultStore(tmp_path / "results", "segmentation").latest().values()]
    assert len(latest) == 2 + 4 and all(r["status"] == "finished" for r in latest)
    for rec in latest:
        assert rec["published_as"] == "nnU-Net" and rec["backbone"] == "none / none (no backbone)"
        assert rec["backbone_weights"] == "none"
        assert rec["params"]["param_epochs"] == 2 and 0 <= rec["metrics"]["dice_per_image"] <= 1
    few = next(r for r in store.latest().values() if r["setting"] == "few_shot")
    pred = np.load(store.dir / few["cell_id"] / "predictions.npz")
    assert pred["maps"].shape == (10, 32, 32) and pred["maps"].min() >= 0 and pred["maps"].max() <= 1
    assert np.array_equal(pred["image_scores"], pred["maps"].reshape(10, -1).max(1))
    # the in-domain generalisation cell reads the data of the 100 % cell: one fit, trained once
    fits = [json.loads(p.read_text()) for p in (tmp_path / "results" / "fits").rglob("*.json")]
    assert len(fits) == 4  # supervised, few-shot, and one per segmentation set


def test_the_raw_dataset_holds_the_training_images_and_masks_alone(catalog, synth_root, tmp_path):
    """What nnU-Net's raw folder receives: each training image (at the cell's size) and its 0/1 mask, no test image;
    its ``dataset.json`` names R, G, B channels, the lesion label and the files."""
    split = make_split(synth_root, catalog, "SynthBrain", "few_shot", 2, 0, ())
    train = TrainSet(split.train, "few_shot", 2, 32, {"SynthBrain": catalog["SynthBrain"]})
    folder = tmp_path / "Dataset001_cell"
    write_raw_dataset(train, folder)
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "R", "1": "G", "2": "B"} and dataset["labels"]["lesion"] == 1
    assert dataset["numTraining"] == len(split.train) == len(list((folder / "imagesTr").iterdir()))
    cases = sorted(p.name.removesuffix("_0000.png") for p in (folder / "imagesTr").iterdir())
    written = {
        (np.asarray(Image.open(folder / "imagesTr" / f"{c}_0000.png")).tobytes(),
         np.asarray(Image.open(folder / "labelsTr" / f"{c}.png")).tobytes())
        for c in cases
    }  # fmt: skip
    expected = load_batch(split.train, 32, "bicubic")
    as_png = (expected.images * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    masks = expected.masks.numpy().astype(np.uint8)
    assert written == {(image.tobytes(), mask.tobytes()) for image, mask in zip(as_png, masks, strict=True)}
    assert masks.max() == 1  # labels 0 and 1, the lesions there
    tests = (load_batch(split.test, 32, "bicubic").images * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1)
    assert not {image for image, _ in written} & {image.tobytes() for image in tests.numpy()}


def test_an_unknown_trainer_is_one_line_before_anything_is_recorded(write_protocol, seg_root, tmp_path, capsys):
    short = {**SHORT, "trainer": "nnUNetTrainer_5epoch"}
    path = write_protocol(data_root=str(seg_root), datasets=["SynthBrainSeg"], backbone=None, fresh_results=True,
                          settings=["supervised"], methods={"nnunet": short})  # fmt: skip
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("trainer: no trainer class 'nnUNetTrainer_5epoch' in nnunetv2.training.nnUNetTrainer")
    assert not (tmp_path / "results").exists()
    assert trainer_class("nnUNetTrainer_5epochs").__name__ == "nnUNetTrainer_5epochs"  # nnU-Net's own variant
    with pytest.raises(BenchmarkError, match="no trainer class 'nnUNetTrainer_5epoch'"):
        trainer_class("nnUNetTrainer_5epoch")


def test_without_the_extra_nnunet_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # as if it were not installed
    message = 'nnunet: needs nnunetv2, which the segmentation extra installs: pip install -e ".[segmentation]"'
    with pytest.raises(BenchmarkError, match=f"^{re.escape(message)}$"):
        nnunet_package()
    assert NnUNet.requirements({}) == [message]
