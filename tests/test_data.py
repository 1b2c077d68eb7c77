import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.cli import main
from benchmark.data.catalog import DatasetSpec, read_card
from benchmark.data.layout import read_split
from benchmark.data.loading import load_sample
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
    with pytest.raises(BenchmarkError, match=r"1 of 2 anomalous test images .* \(looked for .*; e\.g\. 'b\.png'\); "
                       r"1 of 2 masks there match no image \(e\.g\. 'c\.png'\); set mask_suffix"):  # fmt: skip
        read_split(tmp_path / "two", SPEC, "test")


def test_card_front_matter(tmp_path):
    card = tmp_path / "X.md"
    card.write_text("---\nname: X\nfolder: X_AD\nmodality: m\norgan: lung\nmasks: true\ncolour: red\n---\n")
    with pytest.raises(BenchmarkError, match="unknown key 'colour'"):
        read_card(card)


def _card(folder, extra="", layout=""):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "Toy.md"
    path.write_text(f"---\nname: Toy\nfolder: Toy_AD\nmodality: toy\norgan: toy\nmasks: true\n{layout}{extra}---\n")
    return path


def _lesion(path, rows):
    """An 8x8 mask whose lesion fills ``rows``; returns it as booleans."""
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[rows] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)
    return mask > 0


def _suffixed(root, names=("a", "b"), image=".jpg"):
    """A BMAD-layout set whose anomalous images ``<name><image>`` have masks ``<name>_mask.png``, each its own."""
    for name in ("y", "z"):
        _png(root / "Toy_AD/train/good/img" / f"{name}.png")
        _png(root / "Toy_AD/test/good/img" / f"{name}.png")
    lesions = {}
    for i, name in enumerate(names):
        _png(root / "Toy_AD/test/Ungood/img" / f"{name}{image}", 90)
        lesions[name] = _lesion(root / "Toy_AD/test/Ungood/label" / f"{name}_mask.png", slice(i, i + 2))
    return lesions


def test_card_mask_suffix_and_extension_pair_masks_by_name(tmp_path):
    lesions = _suffixed(tmp_path)
    _lesion(tmp_path / "Toy_AD/test/Ungood/label/b_mask.tif", slice(6, 8))  # not .png: not b's mask
    spec = read_card(_card(tmp_path / "cards", "mask_suffix: _mask\nmask_extension: .png\n"))
    anomalous = [s for s in read_split(tmp_path, spec, "test") if s.label]
    assert [Path(s.mask).name for s in anomalous] == ["a_mask.png", "b_mask.png"]
    for sample in anomalous:
        mask = load_sample(sample, 8)[2].numpy().astype(bool)
        assert np.array_equal(mask, lesions[Path(sample.path).stem])


def test_card_mask_suffix_pairs_medclipseg_masks(tmp_path):
    _png(tmp_path / "Toy_AD/Test_Folder/img/a.png")
    _lesion(tmp_path / "Toy_AD/Test_Folder/label/a_mask.png", slice(0, 2))
    layout = "layout: medclipseg\nsegmentation_only: true\n"
    spec = read_card(_card(tmp_path / "cards", "mask_suffix: _mask\n", layout))
    (sample,) = read_split(tmp_path, spec, "test")
    assert Path(sample.mask).name == "a_mask.png"


def test_unpaired_masks_are_all_counted_in_one_line_with_the_rule(tmp_path):
    _suffixed(tmp_path, names=("a", "b", "c", "d"), image=".png")
    img_dir, mask_dir = tmp_path / "Toy_AD/test/Ungood/img", tmp_path / "Toy_AD/test/Ungood/label"
    card = _card(tmp_path / "cards")
    with pytest.raises(BenchmarkError) as default:
        read_split(tmp_path, read_card(card), "test")
    message = str(default.value)
    assert "\n" not in message
    assert message == (
        f"{card}: 4 of 4 anomalous test images in '{img_dir}' have no mask in '{mask_dir}' (looked for "
        "<stem>{.png,.jpg,.jpeg,.bmp,.tif,.tiff}; e.g. 'a.png', 'b.png', 'c.png', ...); 4 of 4 masks there match "
        "no image (e.g. 'a_mask.png', 'b_mask.png', 'c_mask.png', ...); set mask_suffix/mask_extension in the card if "
        "masks are named otherwise"
    )
    (mask_dir / "c_mask.png").rename(mask_dir / "c_mask.jpg")
    with pytest.raises(BenchmarkError, match=r"1 of 4 .* \(looked for <stem>_mask\.png; e\.g\. 'c\.png'\); set"):
        read_split(tmp_path, read_card(_card(tmp_path / "cards", "mask_suffix: _mask\nmask_extension: .png\n")), "test")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("mask_suffix: 5", "key 'mask_suffix' must be text added to an image's file stem (e.g. _mask), got 5"),
        ("mask_suffix: masks/_m", "key 'mask_suffix' must be text"),
        ("mask_extension: png", "key 'mask_extension' must be one of .png, .jpg, .jpeg, .bmp, .tif, .tiff"),
        ("mask_extension: [.png]", "key 'mask_extension' must be one of"),
    ],
)
def test_mask_naming_keys_are_checked(tmp_path, line, expected):
    card = _card(tmp_path, line + "\n")
    with pytest.raises(BenchmarkError) as error:
        read_card(card)
    assert str(error.value).startswith(f"{card}: {expected}") and "\n" not in str(error.value)


def test_dry_run_pairs_masks_as_the_card_says(write_protocol, tmp_path, capsys):
    """Through the CLI: without the key a one-line error (exit 2); with it, the run's splits list; a wrong type
    is one line naming the card and the key."""
    _suffixed(tmp_path / "data")
    path = write_protocol(datasets=["Toy"], dataset_cards=[str(tmp_path / "cards")], data_root=str(tmp_path / "data"),
                          fresh_results=True)  # fmt: skip
    for extra, code, expected in (
        ("", 2, "Toy.md: 2 of 2 anomalous test images in"),
        ("mask_suffix: _mask\n", 0, None),
        ("mask_suffix: [_mask]\n", 2, "Toy.md: key 'mask_suffix' must be text"),
    ):
        _card(tmp_path / "cards", extra)
        assert main(["run", str(path), "--dry-run"]) == code
        err = capsys.readouterr().err
        assert err.count("\n") == (1 if expected else 0) and (expected is None or expected in err)


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
