"""Unusual and bad input gives right numbers or a one-line error, never a wrong number recorded finished."""

import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from benchmark.cli import main
from benchmark.data.layout import Sample
from benchmark.data.loading import load_image, load_sample
from benchmark.errors import BenchmarkError
from benchmark.reports.tables import caption_for, render_markdown
from benchmark.store import ResultStore


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return str(path)


def _lesion(size=32):
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[8:20, 10:24] = 1
    return mask


@pytest.fixture
def data(tmp_path, synth_root):
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    return root


def _masks(root, dataset="SynthBrain"):
    return sorted((root / f"{dataset}_AD").glob("*/Ungood/anomaly_mask/*.png"))


def _records(tmp_path):
    return list(ResultStore(tmp_path / "results", "t").latest().values())


# ----- masks -----


def test_masks_stored_as_0_1_read_like_0_255(tmp_path):
    mask = _lesion()
    image = _save(tmp_path / "img.png", (np.arange(32 * 32).reshape(32, 32) % 251).astype(np.uint8))
    one = load_sample(Sample(image, 1, _save(tmp_path / "m01.png", mask)), 16)[2]
    full = load_sample(Sample(image, 1, _save(tmp_path / "m255.png", mask * 255)), 16)[2]
    assert one.any() and bool((one == full).all())


def test_run_with_0_1_masks_equals_run_with_0_255_masks(write_protocol, data, tmp_path):
    assert main(["run", str(write_protocol(datasets=["SynthBrain"]))]) == 0
    before = {r["cell_id"]: r["metrics"] for r in _records(tmp_path)}
    for path in _masks(data):
        Image.fromarray((np.asarray(Image.open(path)) > 0).astype(np.uint8)).save(path)
    path = write_protocol(datasets=["SynthBrain"], data_root=str(data), results_dir=str(tmp_path / "r01"))
    assert main(["run", str(path)]) == 0
    after = {r["cell_id"]: r["metrics"] for r in ResultStore(tmp_path / "r01", "t").latest().values()}
    assert after == before and all(math.isfinite(m["pixel_auroc"]) for m in after.values())


def test_non_binary_mask_is_an_error_naming_the_file(tmp_path):
    image = _save(tmp_path / "img.png", np.zeros((32, 32), np.uint8))
    gradient = _save(tmp_path / "grad.png", np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1)))
    with pytest.raises(BenchmarkError, match=r"mask '.*grad\.png': values \{0, 8, 16, 24, 32, 40, \.\.\.\} are not"):
        load_sample(Sample(image, 1, gradient), 16)
    # an explicit threshold in the dataset card reads it as mask > threshold
    mask = load_sample(Sample(image, 1, gradient, mask_threshold=127), 32)[2]
    assert mask[:, :16].sum() == 0 and bool(mask[:, 16:].all())


def test_non_binary_mask_fails_the_cell(write_protocol, data, tmp_path, capsys):
    path = _masks(data)[0]  # a test mask
    assert "/test/" in str(path)
    Image.fromarray(np.tile(np.arange(0, 48 * 5, 5, dtype=np.uint8), (48, 1))).save(path)
    assert main(["run", str(write_protocol(datasets=["SynthBrain"], data_root=str(data)))]) == 2
    (rec,) = _records(tmp_path)
    assert rec["status"] == "failed" and path.name in rec["error"] and "not binary" in rec["error"]


def test_mask_of_another_size_is_an_error_naming_both_sizes(tmp_path):
    image = _save(tmp_path / "img.png", np.zeros((256, 256), np.uint8))
    mask = _save(tmp_path / "mask.png", np.pad(_lesion(60), ((0, 0), (0, 40))) * 255)
    with pytest.raises(BenchmarkError, match=r"mask '.*mask\.png' is 100x60 but its image '.*img\.png' is 256x256"):
        load_sample(Sample(image, 1, mask), 64)


def test_empty_mask_of_an_anomalous_image_is_an_error(tmp_path):
    image = _save(tmp_path / "img.png", np.zeros((32, 32), np.uint8))
    empty = _save(tmp_path / "empty.png", np.zeros((32, 32), np.uint8))
    with pytest.raises(BenchmarkError, match=r"mask '.*empty\.png' of the anomalous image .* is empty"):
        load_sample(Sample(image, 1, empty), 16)


# ----- images -----


def test_16_bit_png_equals_its_8_bit_twin_within_quantisation(tmp_path):
    rng = np.random.default_rng(0)
    deep = (rng.random((40, 40)) * 65535).astype(np.uint16)
    shallow = np.round(deep / 257.0).astype(np.uint8)
    a, _ = load_image(_save(tmp_path / "deep.png", deep), 24)
    b, _ = load_image(_save(tmp_path / "shallow.png", shallow), 24)
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert float(a.max()) > 0.9  # not clipped at 255 (which would turn almost every pixel white)
    assert float((a - b).abs().max()) < 2.5 / 255  # 8-bit quantisation and rounding of the 8-bit resize


def test_32_bit_and_float_tiffs_are_scaled_by_their_range(tmp_path):
    values = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    ints, _ = load_image(_save(tmp_path / "i32.tif", (values * (2**31 - 1)).astype(np.int32)), 32)
    floats, _ = load_image(_save(tmp_path / "f.tif", values.astype(np.float32)), 32)
    assert float((floats[0] - torch_tensor(values)).abs().max()) < 1e-5
    assert float((ints - floats).abs().max()) < 1e-3
    _save(tmp_path / "bad.tif", (values * 4000).astype(np.float32))
    with pytest.raises(BenchmarkError, match=r"bad\.tif': a float image must hold values in \[0, 1\]"):
        load_image(str(tmp_path / "bad.tif"), 8)


def torch_tensor(array):
    import torch

    return torch.from_numpy(array.astype(np.float32))


def test_rgba_and_upper_case_extensions_still_work(tmp_path, write_protocol, data):
    for path in sorted((data / "SynthBrain_AD" / "test" / "good" / "img").glob("*.png"))[:2]:
        rgba = Image.open(path).convert("RGBA")
        path.unlink()
        rgba.save(path.with_suffix(".PNG"))
    assert main(["run", str(write_protocol(datasets=["SynthBrain"], data_root=str(data)))]) == 0


# ----- test sets without both classes: stopped before anything is recorded -----


@pytest.mark.parametrize("emptied", ["good", "Ungood"])
def test_one_class_test_set_stops_the_run(write_protocol, data, tmp_path, capsys, emptied):
    folder = data / "SynthBrain_AD" / "test" / emptied
    for path in folder.rglob("*.png"):
        path.unlink()
    path = write_protocol(datasets=["SynthBrain", "SynthLiver"], data_root=str(data), fresh_results=True)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "a test set needs both" in err and err.count("\n") == 1
    assert not (tmp_path / "results" / "t" / "results.jsonl").exists()
    assert not (tmp_path / "results" / "mlflow.db").exists()


def test_every_data_fault_of_a_grid_is_reported_at_once(write_protocol, data, tmp_path, capsys):
    orphan = data / "SynthBrain_AD" / "test" / "Ungood" / "anomaly_mask" / "orphan.png"
    shutil.copy(_masks(data)[0], orphan)  # a mask without an image
    shutil.rmtree(data / "SynthLiver_AD" / "test")  # no test/
    path = write_protocol(
        datasets=["SynthBrain", "SynthLiver", "SynthRetina"],
        settings=[{"name": "few_normal", "shots": [8]}],  # K above the normal pool of 6
        data_root=str(data),
        fresh_results=True,
    )
    assert main(["run", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert all(line.startswith("error: ") for line in lines)
    text = "\n".join(lines)
    for expected in ("(e.g. 'orphan.png')", "SynthLiver_AD/test' not found", "'SynthRetina': 8-shot needs 8 normal"):
        assert expected in text
    assert len(lines) == 3  # one line per fault
    assert not (tmp_path / "results").exists()


# ----- records and tables -----


def test_results_are_strict_json(tmp_path):
    store = ResultStore(tmp_path, "x")
    store.append({"config_hash": "a", "status": "finished", "metrics": {"m": float("nan"), "n": [float("inf"), 1.0]}})

    def refuse(token):
        raise AssertionError(f"non-strict JSON token {token}")

    line = store.path.read_text().strip()
    assert json.loads(line, parse_constant=refuse)["metrics"] == {"m": None, "n": [None, 1.0]}


def test_tables_say_how_many_seeds_make_a_mean(tmp_path):
    store = ResultStore(tmp_path, "t")
    base = {"method": "a", "variant": "A", "setting": "few_shot", "shots": 2, "backbone": "bb", "threshold": 0.5}
    for seed, value in ((0, 0.7428), (1, None)):
        store.append(
            {
                **base,
                "config_hash": f"a{seed}",
                "status": "finished" if value is not None else "failed",
                "seed": seed,
                "dataset": "D",
                **({"metrics": {"image_auroc": value}} if value is not None else {"error": "boom"}),
            }
        )
    store.append({**base, "config_hash": "b", "status": "finished", "seed": 0, "dataset": "E", "metrics": {}})
    frame = store.frame()
    table = render_markdown(frame, ("image_auroc",), "cap")
    assert "74.28 (1/2 seeds)" in table and "±" not in table
    assert "(n/m seeds)" in caption_for(frame, "t", ("image_auroc",))
    full = ResultStore(tmp_path, "full")
    for seed in (0, 1):
        full.append({**base, "config_hash": f"f{seed}", "status": "finished", "seed": seed, "dataset": "D",
                     "metrics": {"image_auroc": 0.5 + seed / 10}})  # fmt: skip
    assert "seeds)" not in render_markdown(full.frame(), ("image_auroc",), "cap")
    assert "(n/m seeds)" not in caption_for(full.frame(), "full", ("image_auroc",))


def test_nan_is_never_marked_best(tmp_path):
    store = ResultStore(tmp_path, "t")
    for name, value in (("a", float("nan")), ("b", 0.6), ("c", 0.5)):
        store.append(
            {
                "config_hash": name, "status": "finished", "method": name, "variant": name, "setting": "few_shot",
                "shots": 2, "seed": 0, "dataset": "D", "backbone": "bb", "threshold": 0.5,
                "metrics": {"image_auroc": value},
            }
        )  # fmt: skip
    table = render_markdown(store.frame(), ("image_auroc",), "c")
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["a (few-shot, K=2)"].split("|")[2].strip() == "-- (0/1 seeds)"
    assert "**60.00**" in rows["b (few-shot, K=2)"] and "<u>50.00</u>" in rows["c (few-shot, K=2)"]


def test_lesions_lost_by_resizing_fail_the_cell_instead_of_nan(write_protocol, data, tmp_path):
    for path in _masks(data):
        tiny = np.zeros((48, 48), np.uint8)
        tiny[1, 1] = 255  # 48 -> 32 px by nearest neighbour samples rows and columns 0, 2, 3, ...: never 1
        Image.fromarray(tiny).save(path)
    assert main(["run", str(write_protocol(datasets=["SynthBrain"], data_root=str(data)))]) == 2
    (rec,) = _records(tmp_path)
    assert rec["status"] == "failed" and "no anomalous pixel is left in the test masks at 32x32" in rec["error"]
    assert "metrics" not in rec


def test_segmentation_layout_inputs_fail_in_one_line(tmp_path, catalog):
    """A MedCLIPSeg-layout card must declare a segmentation set; a prompt table must have its columns and
    list files that exist; a data fraction or prompt design needs its prompt file."""
    import pandas as pd
    from conftest import SMALL

    from benchmark.data.catalog import read_card
    from benchmark.data.splits import make_split
    from benchmark.data.synthetic import write_segmentation_dataset

    card = tmp_path / "Seg.md"
    card.write_text("---\nname: Seg\nfolder: Seg\nmodality: x\norgan: skin\nmasks: true\nlayout: medclipseg\n---\n")
    with pytest.raises(BenchmarkError, match=r"Seg\.md: the medclipseg layout holds segmentation sets"):
        read_card(card)
    root = tmp_path / "data"
    write_segmentation_dataset(root, catalog["SynthBrainSeg"], SMALL)
    prompts = root / "SynthBrainSeg" / "Prompts_Folder"
    (prompts / "Train_text_10.xlsx").unlink()
    with pytest.raises(BenchmarkError, match=r"data fraction 10 % needs '.*Train_text_10.xlsx', which is not there"):
        make_split(root, catalog, "SynthBrainSeg", "data_fraction", 10, 0)
    table = pd.read_excel(prompts / "Train_text.xlsx")
    table.drop(columns=["Description"]).to_excel(prompts / "Train_text.xlsx", index=False)
    with pytest.raises(BenchmarkError, match=r"Train_text.xlsx: missing column 'Description'"):
        make_split(root, catalog, "SynthBrainSeg", "supervised", None, 0)
    table.assign(Image=["nowhere.png", *table["Image"][1:]]).to_excel(prompts / "Train_text.xlsx", index=False)
    with pytest.raises(BenchmarkError, match=r"Train_text.xlsx: lists 'nowhere.png', which is not in"):
        make_split(root, catalog, "SynthBrainSeg", "supervised", None, 0)
    with pytest.raises(BenchmarkError, match="data_fraction: dataset 'SynthBrain' is not in the medclipseg layout"):
        make_split(root, catalog, "SynthBrain", "data_fraction", 10, 0)


def test_bilinear_resize_is_opencvs_and_bicubic_stays_pils(tmp_path):
    """``resize: bilinear`` decodes as MedCLIPSeg's loader: ``cv2.resize`` (INTER_LINEAR, no antialiasing) on
    the 8-bit image; the default stays PIL's antialiased bicubic."""
    import cv2

    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "a.png")
    bilinear, _ = load_image(str(tmp_path / "a.png"), 32, "bilinear")
    expected = cv2.resize(array, (32, 32), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
    np.testing.assert_array_equal(bilinear.permute(1, 2, 0).numpy(), expected)
    bicubic, _ = load_image(str(tmp_path / "a.png"), 32)
    pil = np.asarray(Image.fromarray(array).resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255.0
    np.testing.assert_array_equal(bicubic.permute(1, 2, 0).numpy(), pil)


def test_a_method_entrys_resize_is_recorded_and_keeps_its_own_features(write_protocol, tmp_path, capsys):
    """Per method entry (or protocol) ``resize``; MedCLIPSeg's default is its loader's bilinear. A cached
    feature of a bilinearly resized image never stands in for a bicubic one."""
    cnn = {"backbone": {"model": "mobilenetv3_small_050", "weights": "random-init", "seed": 0}, "meta_epochs": 1,
           "sub_epochs": 1, "n_batch": 256, "coupling_blocks": 2, "pos_embed_dim": 16, "progress": False}  # fmt: skip
    path = write_protocol(
        settings=[{"name": "few_shot", "shots": [2]}], datasets=["SynthBrain"],
        methods={"bgad": cnn, "bgad_bilinear": {**cnn, "method": "bgad", "resize": "bilinear"}},
    )  # fmt: skip
    assert main(["run", str(path)]) == 0
    records = {r["method"]: r for r in ResultStore(tmp_path / "results", "t").latest().values()}
    assert records["bgad"]["params"]["resize"] == "bicubic"
    assert records["bgad_bilinear"]["params"]["resize"] == "bilinear"
    assert records["bgad"]["metrics"] != records["bgad_bilinear"]["metrics"]
    recipes = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("recipe.json")]
    assert {r.get("resize") for r in recipes} == {None, "bilinear"}
    from methods.medclipseg import MedCLIPSeg

    assert MedCLIPSeg.default_resize == "bilinear"
    capsys.readouterr()
    bad = write_protocol(name="bad", methods={"winclip": {"resize": "area"}})
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "methods.winclip.resize: expected one of bicubic, bilinear, got 'area'" in err and err.count("\n") == 1
