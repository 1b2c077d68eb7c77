import shutil

import numpy as np
import pytest
from PIL import Image

from benchmark.data.catalog import DatasetSpec, read_card
from benchmark.data.layout import read_split
from benchmark.data.splits import make_split
from benchmark.data.synthetic import render
from benchmark.errors import BenchmarkError

SPEC = DatasetSpec("Toy", "Toy_AD", "toy", "toy", True)


def _png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)


def _toy(root, mask_folder="anomaly_mask", masks=("b.png", "a.png")):
    for name in ("z.png", "y.png"):
        _png(root / "Toy_AD/test/good/img" / name)
    for name in ("a.png", "b.png"):
        _png(root / "Toy_AD/test/Ungood/img" / name)
    for i, name in enumerate(masks):
        _png(root / f"Toy_AD/test/Ungood/{mask_folder}" / name, 255 * i)


def test_layout_sorted_and_masks_paired_by_name(tmp_path):
    _toy(tmp_path)
    samples = read_split(tmp_path, SPEC, "test")
    assert [s.path.split("/")[-1] for s in samples] == ["y.png", "z.png", "a.png", "b.png"]
    assert [s.label for s in samples] == [0, 0, 1, 1]
    for s in samples[2:]:
        assert s.mask.endswith("anomaly_mask/" + s.path.split("/")[-1])


def test_layout_accepts_label_folder_and_rejects_mismatch(tmp_path):
    _toy(tmp_path / "one", mask_folder="label")
    assert read_split(tmp_path / "one", SPEC, "test")[-1].mask.endswith("label/b.png")
    _toy(tmp_path / "two", masks=("a.png", "c.png"))
    with pytest.raises(BenchmarkError, match=r"no mask .* for image 'b\.png'"):
        read_split(tmp_path / "two", SPEC, "test")


def test_card_front_matter(tmp_path):
    card = tmp_path / "X.md"
    card.write_text("---\nname: X\nfolder: X_AD\nmodality: m\norgan: lung\nmasks: true\ncolour: red\n---\n")
    with pytest.raises(BenchmarkError, match="unknown key 'colour'"):
        read_card(card)


def test_synthetic_masks_are_exact_and_deterministic():
    for modality in ("brain", "liver", "retina"):
        normal, empty = render(modality, 3, "test", 5, False, 64)
        abnormal, mask = render(modality, 3, "test", 5, True, 64)
        assert not empty.any() and mask.sum() >= 6
        changed = np.abs(abnormal - normal) > 0
        assert not (changed & ~mask).any()
        assert changed[mask].mean() > 0.5
        again, mask2 = render(modality, 3, "test", 5, True, 64)
        assert np.array_equal(again, abnormal) and np.array_equal(mask, mask2)
    brain, _ = render("brain", 0, "test", 0, False, 64)
    retina, _ = render("retina", 0, "test", 0, False, 64)
    assert np.abs(brain - retina).mean() > 0.1


def test_splits_disjoint_and_kshot_deterministic(synth_root, catalog):
    for setting, shots in (("few_shot", 2), ("few_normal", 2), ("supervised", None), ("full_normal", None)):
        split = make_split(synth_root, catalog, "SynthBrain", setting, shots, 0)
        assert not {s.path for s in split.train} & {s.path for s in split.test}
        assert all("/test/" not in s.path for s in split.train)
    a = make_split(synth_root, catalog, "SynthBrain", "few_shot", 2, 0).train
    b = make_split(synth_root, catalog, "SynthBrain", "few_shot", 2, 0).train
    c = [make_split(synth_root, catalog, "SynthBrain", "few_shot", 2, s).train for s in range(1, 6)]
    assert a == b
    assert any(x != a for x in c)
    assert [s.label for s in a] == [0, 0, 1, 1]
    assert make_split(synth_root, catalog, "SynthBrain", "few_normal", 4, 0).train[0].label == 0


def test_loo_never_reads_target_train_or_valid(synth_root, catalog, tmp_path):
    root = tmp_path / "loo"
    shutil.copytree(synth_root, root)
    shutil.rmtree(root / "SynthBrain_AD" / "train")
    shutil.rmtree(root / "SynthBrain_AD" / "valid")
    split = make_split(root, catalog, "SynthBrain", "zero_shot_loo", None, 0, ("SynthLiver", "SynthRetina"))
    assert split.train and all("SynthBrain_AD" not in s.path for s in split.train)
    assert {s.path.split("/")[-5] for s in split.train} == {"SynthLiver_AD", "SynthRetina_AD"}
    assert all("SynthBrain_AD/test" in s.path for s in split.test)
    with pytest.raises(BenchmarkError, match="not available with zero_shot_loo"):
        make_split(root, catalog, "SynthBrain", "zero_shot_loo", None, 0, ("SynthLiver",), need_valid=True)


def test_mvfa_manifest_loads_as_is(synth_root, catalog, tmp_path):
    folder = tmp_path / "fewshot_seed" / "SynthBrain"
    folder.mkdir(parents=True)
    (folder / "2-shot.txt").write_text(
        "a-0: train_ungood_0003.png train_ungood_0001.png\nn-0: train_good_0004.png train_good_0000.png"
    )
    template = str(tmp_path / "fewshot_seed" / "{folder}" / "{shots}-shot.txt")
    split = make_split(synth_root, catalog, "SynthBrain", "few_shot", 2, 0, manifests=template)
    assert [s.path.split("/")[-1] for s in split.train] == [
        "train_good_0004.png",
        "train_good_0000.png",
        "train_ungood_0003.png",
        "train_ungood_0001.png",
    ]
    with pytest.raises(BenchmarkError, match="no 'n-3:'"):
        make_split(synth_root, catalog, "SynthBrain", "few_shot", 2, 3, manifests=template)
