"""Real datasets before any GPU time: the cards' sources, licences and published counts, ``verify-data`` (layout,
counts, ``--deep``), locks and a protocol's ``data_locks``, and ``fetch-data`` against a local Hub."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from benchmark.cli import main
from benchmark.data.catalog import data_table, load_catalog, read_card
from benchmark.data.fetching import unpack
from benchmark.data.locks import read_lock
from benchmark.data.splits import make_split
from benchmark.data.synthetic import write_segmentation_dataset
from benchmark.errors import BenchmarkError
from benchmark.store import ResultStore
from tests.conftest import SMALL, LocalHub

README = Path(__file__).resolve().parents[1] / "README.md"
TOY = """---
name: Toy
folder: Toy_AD
modality: "synthetic"
organ: brain
masks: true
source: "tests"
licence: "generated"
expected:
  from: "the test's own count"
  train: {good: 6}
  valid: 8
  test: {good: 5, Ungood: 5}
---
"""
TOY_SEG = """---
name: ToySeg
folder: ToySeg
modality: "synthetic"
organ: brain
masks: true
layout: medclipseg
segmentation_only: true
source: "tests"
licence: "generated"
fetch: {hub: lab/toy-data, file: ToySeg.zip}
expected: {from: "the test's own count", train: 10, valid: 8, test: 10,
           fractions: {train: {10: 1, 25: 2, 50: 5}, valid: {10: 1, 25: 2, 50: 4}}}
---
"""


def _cards(tmp_path: Path) -> Path:
    cards = tmp_path / "cards"
    cards.mkdir(exist_ok=True)
    (cards / "Toy.md").write_text(TOY)
    (cards / "ToySeg.md").write_text(TOY_SEG)
    return cards


def _toy(tmp_path: Path, synth_root: Path) -> tuple[Path, Path]:
    """A copy of SynthBrain as the card Toy (6 normal training images, 8 valid, 5 + 5 test) and the cards."""
    root = tmp_path / "data"
    shutil.copytree(synth_root / "SynthBrain_AD", root / "Toy_AD")
    shutil.rmtree(root / "Toy_AD" / "train" / "Ungood")  # BMAD's train/ is normal only
    return root, _cards(tmp_path)


def _toy_seg(root: Path) -> Path:
    """SynthBrainSeg written as the card ToySeg (10 training images, 8 valid, 10 test) under ``root``."""
    write_segmentation_dataset(root, load_catalog()["SynthBrainSeg"], SMALL)
    return (root / "SynthBrainSeg").rename(root / "ToySeg")


def _verify(capsys, root: Path, cards: Path, *args: str) -> tuple[int, list[str]]:
    code = main(["verify-data", *args, "--data-root", str(root), "--cards", str(cards), "--workers", "1"])
    captured = capsys.readouterr()
    return code, captured.out.splitlines() + captured.err.splitlines()


def test_every_card_says_where_it_comes_from_and_the_readme_table_is_generated_from_them():
    catalog = load_catalog()
    for spec in catalog.values():
        assert spec.source and spec.licence and spec.expected is not None, spec.card
        assert spec.synthetic or spec.fetch is not None, spec.card
        assert spec.expected.counts or spec.expected.why.startswith(("the counts", "MedSAD-CLIP")), spec.card
    assert catalog["BrainMRI"].expected.counts == {"train": {"good": 7500}, "valid": 83, "test": 3715}
    assert catalog["Kvasir"].fetch.hub == "TahaKoleilat/MedCLIPSeg" and catalog["Kvasir"].fetch.file == "Kvasir.zip"
    assert catalog["EUS"].fetch.manual and catalog["BrainMRI"].fetch.manual
    text = README.read_text(encoding="utf-8")
    shown = text.split("<!-- data-table:start -->\n", 1)[1].split("<!-- data-table:end -->", 1)[0]
    assert shown == data_table(catalog), "README's data table is stale: python -m benchmark list --data-table"
    assert shown.count("\n") == len(catalog) + 2


@pytest.mark.parametrize(
    ("front", "message"),
    [
        ("expected: {train: 5}", "key 'expected' needs 'from'"),
        ("expected: {from: BMAD, test: -1}", "expected.test: expected a number or {good: N, Ungood: M}"),
        ("expected: {from: BMAD, test: {good: 5, bad: 1}}", "expected.test: expected a number"),
        ("expected: maybe 100", "key 'expected' must be a mapping of counts or 'not stated: <why>'"),
        ("expected: {from: BMAD, fractions: {train: {10: 5}}}", "expected: unknown key 'fractions'"),
        ("fetch: {hub: lab/x}", "key 'fetch' must be {hub: OWNER/NAME, file: FILE}"),
        ("fetch: {hub: x, file: a.zip}", "key 'fetch.hub' must be a repository id OWNER/NAME"),
        ("licence: ''", "key 'licence' must be the licence as its distributor states it"),
    ],
)
def test_a_card_with_a_bad_source_key_is_one_line_naming_it(tmp_path, front, message):
    path = tmp_path / "Bad.md"
    path.write_text(f"---\nname: Bad\nfolder: Bad\nmodality: x\norgan: x\nmasks: true\n{front}\n---\n")
    with pytest.raises(BenchmarkError, match=r"Bad\.md: ") as info:
        read_card(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_verify_data_says_ok_with_the_counts_and_names_every_fault_at_once(tmp_path, synth_root, capsys):
    root, cards = _toy(tmp_path, synth_root)
    code, lines = _verify(capsys, root, cards, "Toy")
    assert code == 0 and lines == [
        "Toy: OK (train 6 normal, valid 4 normal + 4 anomalous, test 5 normal + 5 anomalous; counts as the test's own "
        "count)"
    ]
    test = root / "Toy_AD" / "test"
    (test / "good" / "img" / "test_good_0000.png").unlink()  # one image fewer than published
    shutil.copy(test / "Ungood" / "anomaly_mask" / "test_ungood_0000.png", test / "Ungood" / "anomaly_mask" / "x.png")
    shutil.rmtree(root / "Toy_AD" / "valid")  # a split missing
    code, lines = _verify(capsys, root, cards, "Toy")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Toy: 3 problems: ")
    assert "no valid/ folder in" in lines[0]
    assert "test/good: 4 normal images, expected 5" in lines[0]
    assert lines[0].endswith("(published counts: the test's own count)")
    assert "1 of 6 masks in" in lines[0] and "'x.png'" in lines[0]  # the mask without an image
    assert main(["verify-data", "Nope", "--cards", str(cards)]) == 2
    assert capsys.readouterr().err.startswith("error: no dataset card named 'Nope'")


def test_a_copy_without_train_is_explained_and_full_normal_refused(tmp_path, synth_root, capsys):
    """MVFA-AD's tarballs have no train/: few-shot settings draw from valid/; full_normal is refused."""
    root, cards = _toy(tmp_path, synth_root)
    shutil.rmtree(root / "Toy_AD" / "train")
    code, lines = _verify(capsys, root, cards, "Toy")
    assert code == 0 and lines[0].startswith("Toy: OK (valid 4 normal + 4 anomalous, test 5 normal + 5 anomalous")
    assert "note: no train/ (the all-normal split, which MVFA-AD's copy lacks): full_normal needs it" in lines[0]
    catalog = load_catalog([cards])
    assert len(make_split(root, catalog, "Toy", "few_normal", 2, 0).train) == 2  # from valid/good
    with pytest.raises(BenchmarkError, match=r"full_normal trains on every normal image of train/good, and '.*train' "
                                             r"is not there \(MVFA-AD's copy lacks it"):  # fmt: skip
        make_split(root, catalog, "Toy", "full_normal", None, 0)


def test_deep_decodes_every_file_as_a_run_does_in_parallel_processes(tmp_path, synth_root):
    root, cards = _toy(tmp_path, synth_root)
    mask = root / "Toy_AD" / "test" / "Ungood" / "anomaly_mask" / "test_ungood_0001.png"
    values = np.asarray(Image.open(mask)).copy()
    values[values > 0] = 128
    values[0, 0] = 255  # three values: not binary
    Image.fromarray(values).save(mask)
    command = [sys.executable, "-m", "benchmark", "verify-data", "Toy", "--data-root", str(root), "--cards", str(cards)]
    shallow = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shallow.returncode == 0, shallow.stdout + shallow.stderr
    deep = subprocess.run([*command, "--deep", "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert deep.returncode == 2 and len(deep.stdout.splitlines()) == 1, deep.stdout + deep.stderr
    assert "Toy: 1 problem: 1 of 24 images (each with its mask) a run would refuse: mask '" in deep.stdout
    assert "test_ungood_0001.png': values {0, 128, 255} are not binary" in deep.stdout


def test_verify_data_checks_medclipsegs_prompt_tables(tmp_path, catalog, capsys):
    cards = _cards(tmp_path)
    root = tmp_path / "data"
    _toy_seg(root)
    code, lines = _verify(capsys, root, cards, "ToySeg")
    assert code == 0 and lines == ["ToySeg: OK (train 10, valid 8, test 10; counts as the test's own count)"]
    prompts = root / "ToySeg" / "Prompts_Folder"
    (prompts / "Val_text.xlsx").unlink()
    (prompts / "Train_text_25.xlsx").unlink()
    half = pd.read_excel(prompts / "Train_text_50.xlsx")
    half.iloc[1:].to_excel(prompts / "Train_text_50.xlsx", index=False)  # one row fewer than published
    (root / "ToySeg" / "Test_Folder" / "img" / "test_0003.png").unlink()
    code, lines = _verify(capsys, root, cards, "ToySeg")
    assert code == 2 and lines[0].startswith("ToySeg: ")
    assert "no prompt table 'Val_text.xlsx' in" in lines[0]
    assert "no prompt table 'Train_text_25.xlsx' in" in lines[0] and "(its 25 % subset)" in lines[0]
    assert "Train_text_50.xlsx: 4 images, expected 5; " in lines[0]
    assert "Test_text_original.xlsx: lists 'test_0003.png', which is not in" in lines[0]
    assert "test: 9 images, expected 10" in lines[0] and lines[0].endswith("(published counts: the test's own count)")


def test_a_lock_names_every_file_added_missing_or_changed(tmp_path, synth_root, capsys):
    root, cards = _toy(tmp_path, synth_root)
    lock = tmp_path / "locks" / "Toy.lock.json"
    code, lines = _verify(capsys, root, cards, "Toy", "--lock", str(lock))
    files = sum(p.is_file() for p in (root / "Toy_AD").rglob("*")) - 1  # but the generator's hidden marker
    assert code == 0 and lines[1].startswith(f"Toy: wrote lock {lock} ({files} files, test content hash ")
    written = json.loads(lock.read_text())
    assert written["dataset"] == "Toy" and sorted(written["splits"]) == ["test", "train", "valid"]
    assert written["files"] == files == 33 and len(written["test_content_hash"]) == 40
    code, lines = _verify(capsys, root, cards, "Toy", "--against", str(lock))
    assert code == 0 and lines[1].startswith(f"Toy: every file as in lock {lock} (content ")
    folder = tmp_path / "again"  # written later by another lab, into a folder: the same files, the same label
    assert main(["verify-data", "Toy", "--data-root", str(root), "--cards", str(cards), "--lock", f"{folder}/"]) == 0
    again = folder / "Toy.lock.json"
    assert read_lock(again).label().split("(")[1] == read_lock(lock).label().split("(")[1]
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert main(["verify-data", "Toy", "--data-root", str(root), "--cards", str(cards), "--lock", f"{blocked}/x"]) == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .startswith(f"error: verify-data Toy --lock: '{blocked}/x' cannot be written (")
    )
    (root / "Toy_AD" / "test" / "good" / "img" / "._test_good_0002.png").write_bytes(b"macOS resource fork")
    code, lines = _verify(capsys, root, cards, "Toy", "--against", str(lock), "--deep")
    assert code == 0 and lines[0].startswith("Toy: OK (train 6 normal, valid 4 normal + 4 anomalous, test 5 normal")
    image = root / "Toy_AD" / "test" / "good" / "img" / "test_good_0002.png"
    image.write_bytes(image.read_bytes() + b"\0")
    (root / "Toy_AD" / "valid" / "good" / "img" / "valid_good_0001.png").unlink()
    shutil.copy(image, root / "Toy_AD" / "train" / "good" / "img" / "new.png")
    code, lines = _verify(capsys, root, cards, "Toy", "--against", str(lock))
    assert code == 2 and lines[1].endswith("1 changed, 1 missing, 1 added")
    assert lines[2:] == [
        "  changed: test/good/img/test_good_0002.png",
        "  missing: valid/good/img/valid_good_0001.png",
        "  added: train/good/img/new.png",
    ]


def test_a_protocols_data_lock_refuses_a_changed_copy_before_any_cell(tmp_path, synth_root, write_protocol, capsys):
    root = tmp_path / "data"
    shutil.copytree(synth_root / "SynthBrain_AD", root / "SynthBrain_AD")
    lock = tmp_path / "SynthBrain.lock.json"
    assert main(["verify-data", "SynthBrain", "--data-root", str(root), "--lock", str(lock)]) == 0
    path = write_protocol(data_root=str(root), datasets=["SynthBrain"], data_locks={"SynthBrain": str(lock)})
    assert main(["run", str(path)]) == 0
    store = ResultStore(tmp_path / "results", "t")
    (record,) = store.records()
    assert record["data_lock"] == read_lock(lock).label() and record["tags"]["data_lock"] == record["data_lock"]
    assert record["test_content_hash"] == json.loads(lock.read_text())["test_content_hash"]
    capsys.readouterr()
    assert main(["tables", "t", "--results-dir", str(tmp_path / "results"), "--format", "markdown"]) == 0
    assert f"Data as locked (every file's SHA-256 checked before the run): SynthBrain by {lock} (content " in (
        capsys.readouterr().out
    )
    assert main(["run", str(path), "--dry-run"]) == 0
    assert f"data: 'SynthBrain' is locked by {read_lock(lock).label()} (a run hashes the copy first)" in (
        capsys.readouterr().out
    )
    image = root / "SynthBrain_AD" / "test" / "Ungood" / "img" / "test_ungood_0001.png"
    image.write_bytes(image.read_bytes() + b"\0")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        f"dataset 'SynthBrain': the copy under '{root / 'SynthBrain_AD'}' differs from its lock '{lock}' (1 changed;"
        in err
    )
    assert "first changed: test/Ungood/img/test_ungood_0001.png)" in err
    assert len(store.records()) == 1  # nothing recorded, not even a failed cell
    bad = write_protocol(datasets=["SynthBrain"], data_locks={"SynthLiver": str(lock)})
    assert main(["run", str(bad), "--dry-run"]) == 2
    assert "data_locks.SynthLiver: 'SynthLiver' is not one of the protocol's datasets" in capsys.readouterr().err
    gone = write_protocol(datasets=["SynthBrain"], data_locks={"SynthBrain": str(tmp_path / "gone.json")})
    assert main(["run", str(gone), "--dry-run"]) == 2
    assert f"data_locks.SynthBrain: data lock '{tmp_path / 'gone.json'}' not found" in capsys.readouterr().err


def _archive(tmp_path: Path, extra: int = 0) -> bytes:
    """ToySeg's folder as a zip, as MedCLIPSeg's archives hold it (and ``extra`` bytes of noise in one file)."""
    source = tmp_path / "source"
    _cards(tmp_path)
    _toy_seg(source)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted((source / "ToySeg").rglob("*")):
            zf.write(path, path.relative_to(source).as_posix())
        if extra:
            zf.writestr("ToySeg/noise.bin", np.random.default_rng(0).bytes(extra))
    return buffer.getvalue()


def _fetch(hub: LocalHub, tmp_path: Path, root: Path, **kwargs) -> subprocess.CompletedProcess | subprocess.Popen:
    args = [sys.executable, "-m", "benchmark", "fetch-data", "ToySeg", "--to", str(root), "--cards",
            str(tmp_path / "cards")]  # fmt: skip
    if kwargs.get("background"):
        return subprocess.Popen(args, env=hub.env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(args, env=hub.env(tmp_path), capture_output=True, text=True, timeout=300)


def test_fetch_data_downloads_checks_and_unpacks_and_refuses_bytes_that_do_not_match(tmp_path):
    data = _archive(tmp_path)
    hub = LocalHub({"datasets/lab/toy-data": {"ToySeg.zip": data}})
    root = tmp_path / "data"
    done = _fetch(hub, tmp_path, root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"ToySeg: unpacked into {root / 'ToySeg'}",
        "ToySeg: OK (train 10, valid 8, test 10; counts as the test's own count)",
    ]
    assert not list((root / ".fetch").iterdir())  # the archive is gone once unpacked
    again = _fetch(hub, tmp_path, root)  # nothing downloaded again: the copy there is verified
    assert again.returncode == 0 and again.stdout.splitlines() == [
        f"ToySeg: '{root / 'ToySeg'}' is there already (not downloaded again; remove it to fetch again)",
        "ToySeg: OK (train 10, valid 8, test 10; counts as the test's own count)",
    ]
    assert len([r for r in hub.requests if r[1].startswith("/cdn/")]) == 1
    corrupt = LocalHub({"datasets/lab/toy-data": {"ToySeg.zip": data}}, corrupt={"ToySeg.zip"})
    refused = _fetch(corrupt, tmp_path, tmp_path / "other")
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith("error: fetch-data: lab/toy-data/ToySeg.zip: the downloaded bytes hash to SHA-256")
    assert "refused and deleted, nothing unpacked" in refused.stderr
    assert not (tmp_path / "other" / "ToySeg").exists() and not list((tmp_path / "other" / ".fetch").iterdir())
    (tmp_path / "cards" / "ToySeg.md").write_text(TOY_SEG.replace("file: ToySeg.zip", "file: Toy.zip"))
    absent = _fetch(hub, tmp_path, tmp_path / "third")
    assert absent.returncode == 2 and absent.stderr.splitlines() == [
        "error: fetch-data ToySeg: the Hub has no file Toy.zip in the dataset repository lab/toy-data (check fetch: in "
        f"{tmp_path / 'cards' / 'ToySeg.md'})"
    ]


def test_fetch_data_resumes_a_download_cut_short(tmp_path):
    """A download killed half-way: the next fetch-data asks only for the bytes it lacks (an HTTP Range)."""
    data = _archive(tmp_path, extra=12 << 20)  # huggingface_hub writes in blocks of 10 MiB
    hub = LocalHub({"datasets/lab/toy-data": {"ToySeg.zip": data}}, hang_first={"ToySeg.zip": 11 << 20})
    root = tmp_path / "data"
    part = root / ".fetch" / "ToySeg.zip.part"
    first = _fetch(hub, tmp_path, root, background=True)
    deadline = time.monotonic() + 120
    while not (part.is_file() and part.stat().st_size >= 10 << 20) and time.monotonic() < deadline:
        time.sleep(0.2)
    first.kill()
    first.wait()
    hub.release()
    have = part.stat().st_size
    assert have == 10 << 20 and not (root / "ToySeg").exists()
    resumed = _fetch(hub, tmp_path, root)
    assert resumed.returncode == 0, resumed.stderr
    ranges = [h.get("range") for method, path, h in hub.requests if method == "GET" and path.startswith("/cdn/")]
    assert ranges == [None, f"bytes={have}-"]
    assert (root / "ToySeg" / "noise.bin").stat().st_size == 12 << 20 and "ToySeg: OK" in resumed.stdout


def test_fetch_data_offline_or_by_hand_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    cards = _cards(tmp_path)
    assert main(["fetch-data", "ToySeg", "--to", str(tmp_path / "data"), "--cards", str(cards)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1  # the one connection check answered, before any download was tried
    assert err[0].startswith("error: fetch-data ToySeg: no network to download from: 127.0.0.1:9 cannot be reached")
    assert main(["fetch-data", "BrainMRI", "--to", str(tmp_path / "data")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(
        "error: fetch-data BrainMRI: not fetched by script: BMAD's release, the only copy with train/"
    )
    assert f"(into '{tmp_path / 'data' / 'Brain_AD'}')" in line
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("prefix", "stray"),
    [("ToySeg/", None), ("", None), ("MedCLIPSeg_release/ToySeg/", "README.txt"), ("kvasir/", "__MACOSX/x")],
)
def test_an_archive_is_unpacked_from_the_folder_that_holds_its_splits(tmp_path, prefix, stray):
    source = _toy_seg(tmp_path / "source")
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(source.rglob("*")):
            zf.write(path, prefix + path.relative_to(source).as_posix())
        if stray:
            zf.writestr(stray, b"x")
    spec = load_catalog([_cards(tmp_path)])["ToySeg"]
    target = unpack(archive, tmp_path / "data", spec)
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in source.iterdir())
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["ToySeg"]


def test_an_archive_without_the_sets_splits_or_with_a_member_outside_is_refused(tmp_path):
    spec = load_catalog([_cards(tmp_path)])["ToySeg"]
    for name, members in (("flat.zip", {"images/a.png": b"x"}), ("slip.zip", {"../../evil.txt": b"x"})):
        archive = tmp_path / name
        with zipfile.ZipFile(archive, "w") as zf:
            for member, data in members.items():
                zf.writestr(member, data)
        with pytest.raises(BenchmarkError, match=r"fetch-data: '(flat|slip)\.zip' holds (no one folder|a member)"):
            unpack(archive, tmp_path / "data", spec)
    assert not (tmp_path / "data").exists() and not (tmp_path / "unpack-ToySeg").exists()


def test_a_split_published_empty_may_be_missing_and_a_missing_class_folder_is_named(tmp_path, synth_root, capsys):
    cards = _cards(tmp_path)
    no_valid = TOY_SEG.replace("valid: 8", "valid: 0").replace(", valid: {10: 1, 25: 2, 50: 4}", "")
    (cards / "ToySeg.md").write_text(no_valid)  # as CVC300, ColonDB: no validation images
    root = tmp_path / "data"
    shutil.rmtree(_toy_seg(root) / "Val_Folder")
    for table in (root / "ToySeg" / "Prompts_Folder").glob("Val_text*.xlsx"):
        table.unlink()
    code, lines = _verify(capsys, root, cards, "ToySeg")
    assert code == 0 and lines == ["ToySeg: OK (train 10, test 10; counts as the test's own count)"], lines
    bmad, _ = _toy(tmp_path / "bmad", synth_root)
    shutil.rmtree(bmad / "Toy_AD" / "test" / "Ungood")
    code, lines = _verify(capsys, bmad, cards, "Toy")
    assert code == 2 and f"no test/Ungood/img/ folder in '{bmad / 'Toy_AD'}' (its anomalous images)" in lines[0]
