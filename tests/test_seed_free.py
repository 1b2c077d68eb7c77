"""Seed-free cells: a method that declares a setting seed-free runs once there, unless the setting draws its
training data per sampling seed; the declaration is checked by running two seeds; tables say so."""

import dataclasses
import io

import numpy as np

from benchmark.cells import expand
from benchmark.cli import main
from benchmark.evidence import Evidence
from benchmark.job import CellJob, run_job
from benchmark.protocol import load_protocol
from benchmark.reports.compare import load_entries, pair_test
from benchmark.store import ResultStore


def test_a_seed_free_cell_expands_once_unless_its_data_are_sampled(write_protocol, catalog):
    protocol = load_protocol(
        write_protocol(seeds=[0, 1], settings=["zero_shot_loo", {"name": "few_normal", "shots": [2]}])
    )
    cells = expand(protocol, catalog, datasets=["SynthBrain"])
    assert [(c.setting, c.seed) for c in cells] == [("zero_shot_loo", 0), ("few_normal", 0), ("few_normal", 1)]
    assert [c.seed_free for c in cells] == [True, False, False]
    assert [c.seed for c in expand(protocol, catalog, seeds=[1], datasets=["SynthBrain"])] == [1, 1]


def test_winclip_gives_the_same_result_under_every_seed_where_it_says_so(write_protocol, catalog, synth_root, tmp_path):
    """The declaration checked: each seed-free setting's cell run under two model seeds (own feature caches,
    so nothing is shared but the images) gives identical scores."""
    protocol = load_protocol(write_protocol(settings=["zero_shot_loo", "full_normal"], seeds=[0]))
    for cell in expand(protocol, catalog, datasets=["SynthBrain"]):
        assert cell.seed_free
        runs = []
        for seed in (0, 1):
            where = tmp_path / f"{cell.setting}-{seed}"
            cell_seed = dataclasses.replace(cell, seed=seed)
            runs.append(
                run_job(CellJob(cell_seed, protocol, catalog, str(synth_root), str(where), str(where / "cell")))
            )
        assert [r.status for r in runs] == ["finished", "finished"], [r.error for r in runs]
        assert runs[0].metrics == runs[1].metrics
        scores = [Evidence.load(io.BytesIO(r.evidence)).scores for r in runs]
        np.testing.assert_array_equal(*scores)


def test_tables_say_deterministic_for_a_seed_free_row(write_protocol, tmp_path, capsys):
    path = write_protocol(settings=["zero_shot_loo", {"name": "few_normal", "shots": [2]}], seeds=[0, 1])
    assert main(["run", str(path), "--datasets", "SynthBrain,SynthLiver"]) == 0
    results = tmp_path / "results"
    records = ResultStore(results, "t").latest().values()
    assert sorted((r["setting"], r["seed_free"]) for r in records if r["dataset"] == "SynthBrain") == [
        ("few_normal", False), ("few_normal", False), ("zero_shot_loo", True)
    ]  # fmt: skip
    capsys.readouterr()
    assert main(["tables", "t", "--results-dir", str(results)]) == 0
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert rows["WinCLIP (zero-shot LOO)"].count("(deterministic)") == 4 and "±" not in rows["WinCLIP (zero-shot LOO)"]
    assert "(deterministic)" not in rows["WinCLIP+ (few-normal-shot, K=2)"]

    # the one seed-free run stands for every seed: it pairs seed by seed with an entry that ran two
    entries = {e.group: e for e in load_entries(results, "t") if e.dataset == "SynthBrain"}
    free, sampled = entries["zero-shot LOO"], entries["few-normal-shot, K=2"]
    assert pair_test(free, sampled, "image_auroc", 200, 0).test == "permutation"
    seeded = dataclasses.replace(free, records=[{**r, "seed_free": False} for r in free.records])
    assert pair_test(seeded, sampled, "image_auroc", 200, 0).test == "DeLong"  # one seed against two
