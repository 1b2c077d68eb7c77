"""Published tables in their papers' layout, with our numbers from real runs in place, and their coverage."""

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmark.cli import PROTOCOLS_DIR, main
from benchmark.data.synthetic import write_dataset
from benchmark.reports.paper import coverage
from benchmark.reports.published import canonical, load_published, lookup
from benchmark.store import ResultStore
from tests.conftest import SMALL, relabel_backbone

L14 = "ViT-L-14-336 / openai (pretrained)"  # what MVFA's and MedSAD-CLIP's rows were run on
EFF = "tf_efficientnet_b6 / aa_in1k (pretrained)"  # BGAD's
OFFICIAL = Path(__file__).parent / "data" / "official"


def test_printed_names_and_settings_are_normalised():
    assert canonical("BGAD [57]") == "BGAD" and canonical("APRIL-GAN [9]") == canonical("April-GAN") == "APRIL-GAN"
    assert canonical("Aaclip") == "AA-CLIP" and canonical("CFlowAD") == "CFlow" and canonical("MVFA") == "MVFA"
    pub = load_published()
    # MVFA Table 7's "BGAD [57]" rows now match our BGAD; MedSAD-CLIP's few-shot rows map to K = 4
    assert lookup(pub, "BGAD", "few_shot", 2, "BrainMRI", "image_auroc", None, EFF) is not None
    assert lookup(pub, "MVFA", "few_shot", 4, "Brain", "dice", 0.5, L14) == (
        48.34,
        "medsad-clip Table 2",
    )
    assert lookup(pub, "MVFA", "zero_shot_loo", None, "Brain", "pixel_auroc", None, L14)[1] == "medsad-clip Table 4"
    tiny = "tiny-vit / random-init (random-init, seed 0)"
    assert lookup(pub, "MVFA", "few_shot", 4, "Brain", "dice", 0.5, tiny) is None  # no reproduction of anybody's


def test_every_published_row_of_a_method_we_run_is_reachable():
    items = coverage(PROTOCOLS_DIR)
    assert sum(c.rows for c in items) == len(load_published())
    assert [row for c in items for row in c.unreachable] == []
    by_table = {(c.paper, c.table): c for c in items}
    assert by_table[("mvfa", "Table 7")].reproducible == 132  # MVFA, BGAD [57], APRIL-GAN [9], DRA [12]; K = 2 ... 16
    assert by_table[("mvfa", "Table 1")].reproducible == 45  # all but CLIP's and MedCLIP's 18: MKD's 9 included
    assert by_table[("mcmiad", "Table 1")].reproducible == 24  # all but DiAD's 6: UniAD's and SimpleNet's included
    assert by_table[("mcmiad", "Table 3")].reproducible == 12  # UniAD's one-normal-shot rows too
    # ... AnomalyCLIP's, AdaCLIP's, AA-CLIP's, MadCLIP's, nnU-Net's and Rolling-UNet's too: all of them
    assert by_table[("medsad-clip", "Table 2")].reproducible == 112
    assert by_table[("medsad-clip", "Table 4")].reproducible == 20
    assert by_table[("medsad-clip", "Table 7")].reproducible == 80  # Dice at 0.3 ... 0.7 (the sweep)
    # MedCLIPSeg's data efficiency: its own 4 and the 28 of UNet, UNet++, DeepLabv3, Attention U-Net, nnU-Net,
    # Swin-UNet and TransUNet
    assert by_table[("medclipseg", "README: Data-Efficiency")].reproducible == 32
    assert sum(c.reproducible for c in items) == 487  # 451 + the supervised segmenters' 36


def test_paper_table_help_lists_every_published_paper_and_table(capsys, monkeypatch):
    """The papers and tables in ``--help`` are those of the published CSV the command reads (MedCLIPSeg's were
    missing from a hand-written list)."""
    monkeypatch.setenv("COLUMNS", "1000")  # no line wrapped inside a table's name
    with pytest.raises(SystemExit) as done:
        main(["paper-table", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    pub = load_published()
    papers = list(dict.fromkeys(pub["paper"]))
    assert "medclipseg" in papers
    assert f"a paper with published tables: {', '.join(papers)}" in out
    for paper, table in set(zip(pub["paper"], pub["table"], strict=True)):
        assert re.search(rf'[(;] ?{re.escape(paper)}: ("[^"]+", )*"{re.escape(table)}"', out), (paper, table)


def test_paper_table_without_from_shows_the_papers_numbers_alone(capsys):
    """No ``--from``: the paper's table in its layout, its numbers unmarked, a caption saying no run is shown and
    how to add one; ``--delta`` without a run is a one-line error."""
    assert main(["paper-table", "mvfa", "Table 2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "no run of ours is shown" in lines[0] and "--from EXPERIMENT" in lines[0] and "reproduced" not in lines[0]
    part = load_published().query("paper == 'mvfa' and table == 'Table 2'")
    table = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    header, body = table[0], table[2:]
    short = {"image_auroc": "AC", "pixel_auroc": "AS"}
    columns = dict.fromkeys(zip(part["dataset"], part["metric"], strict=True))
    assert header == ["Method", *(f"{d} {short[m]}" for d, m in columns)]
    settings = dict.fromkeys(part["setting"])
    expected = [x for s in settings for x in [f"*{s}*", *dict.fromkeys(part.loc[part["setting"] == s, "method"])]]
    assert [row[0] for row in body] == expected  # its settings and methods in its order
    rows = {row[0]: row for row in body}
    for _, r in part.iterrows():
        column = header.index(f"{r['dataset']} {short[r['metric']]}")
        assert rows[r["method"]][column] == f"{r['value_percent']:.2f}"  # the paper's number, unmarked
    assert main(["paper-table", "mvfa", "Table 2", "--format", "latex"]) == 0
    tex = capsys.readouterr().out
    assert "no run of ours is shown" in tex and r"$^\dagger$" not in tex and r"\emph{zeroshot\_loo}" in tex
    assert main(["paper-table", "mvfa", "Table 2", "--delta"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--delta needs --from" in err


def test_coverage_names_the_protocols_that_reproduce_each_table(capsys, monkeypatch, tmp_path):
    """``--coverage`` names per table the shipped protocol files that reproduce it, per setting where they differ
    (per method where those differ within a setting), and says so where none does."""

    def blocks(out: str) -> dict[str, str]:
        found = re.split(r"^(\S.*?): \d+ published numbers.*$", out, flags=re.M)
        return dict(zip(found[1::2], found[2::2], strict=True))

    assert main(["paper-table", "--coverage"]) == 0
    tables = blocks(capsys.readouterr().out)
    pub = load_published()
    assert set(tables) == {f"{p} {t}" for p, t in zip(pub["paper"], pub["table"], strict=True)}
    assert all("  reproduced by" in block for block in tables.values())
    assert "\n  reproduced by: protocols/zeroshot_loo.yaml\n" in tables["mvfa Table 2"]
    assert "\n  reproduced by, per setting:\n" in tables["mvfa Table 7"]
    for k in (2, 4, 8, 16):
        assert f"\n    fewshot_k{k}: protocols/fewshot_k{k}.yaml\n" in tables["mvfa Table 7"]
    assert "\n    few-shot: protocols/medsad_fewshot.yaml\n" in tables["medsad-clip Table 2"]
    supervised = re.search(r"^    supervised: (.*)$", tables["medsad-clip Table 2"], flags=re.M).group(1)
    assert "BGAD" in supervised and "MedSAD-CLIP: " in supervised  # its methods differ: grouped by their files
    domains = ("brain", "bus", "derm", "endo")
    assert (
        "reproduced by: " + ", ".join(f"protocols/medclipseg_domain_{d}.yaml" for d in domains)
        in tables["medclipseg README: Domain Generalization"]
    )
    named = set(re.findall(r"protocols/[\w.-]+\.yaml", "".join(tables.values())))
    assert named and all((PROTOCOLS_DIR.parent / name).is_file() for name in named)

    shipped = tmp_path / "protocols"  # only MVFA's zero-shot protocol: the others' tables are reproduced by none
    shipped.mkdir()
    shutil.copy(PROTOCOLS_DIR / "zeroshot_loo.yaml", shipped)
    monkeypatch.setattr("benchmark.cli.PROTOCOLS_DIR", shipped)
    assert main(["paper-table", "--coverage"]) == 0
    tables = blocks(capsys.readouterr().out)
    assert "\n  reproduced by: protocols/zeroshot_loo.yaml\n" in tables["mvfa Table 2"]
    assert "\n  reproduced by: none of the shipped protocols\n" in tables["mvfa Table 7"]


@pytest.fixture
def bmad_run(write_protocol, tmp_path, catalog):
    """Small generated data under the BMAD names BrainMRI and LiverCT, and a real few-shot run on them."""
    root = tmp_path / "bmad"
    for name, synthetic in (("BrainMRI", "SynthBrain"), ("LiverCT", "SynthLiver")):
        write_dataset(root, dataclasses.replace(catalog[synthetic], folder=catalog[name].folder), SMALL)
    path = write_protocol(
        name="k2",
        data_root=str(root),
        datasets=["BrainMRI", "LiverCT"],
        settings=[{"name": "few_shot", "shots": [2]}],
        seeds=[0, 1],
        threshold={"mode": "fixed", "value": 0.5},
        methods={
            "bgad": {
                "backbone": {"model": "mobilenetv3_small_050", "weights": "random-init", "seed": 0},
                "meta_epochs": 1, "sub_epochs": 1, "n_batch": 256, "coupling_blocks": 2, "pos_embed_dim": 16,
                "progress": False,
            },
        },
    )  # fmt: skip
    assert main(["run", str(path)]) == 0
    return tmp_path / "results"


def test_paper_table_puts_our_numbers_in_the_papers_layout(bmad_run, capsys):
    from benchmark.store import ResultStore

    ours = {
        (r["dataset"], r["seed"]): r["metrics"]["image_auroc"] for r in ResultStore(bmad_run, "k2").latest().values()
    }
    mean = (ours[("BrainMRI", 0)] + ours[("BrainMRI", 1)]) / 2 * 100

    def row(out: str, name: str) -> tuple[list[str], list[str]]:
        lines = out.splitlines()
        group = lines.index(next(line for line in lines if line.startswith("| *fewshot_k2*")))
        found = next(line for line in lines[group:] if line.strip("|").split("|")[0].strip() == name)
        header = [c.strip() for c in lines[2].strip("|").split("|")]
        return [c.strip() for c in found.strip("|").split("|")], header

    # on a tiny random-init backbone: a row of its own under the paper's, labelled, never matched to its numbers
    assert main(["paper-table", "mvfa", "Table 7", "--from", "k2", "--results-dir", str(bmad_run), "--delta"]) == 0
    out = capsys.readouterr().out
    cells, header = row(out, "BGAD [57]")
    assert cells[header.index("BrainMRI AC")].endswith("†")  # the paper's number, copied
    tiny, _ = row(out, "BGAD [57] (ours, on mobilenetv3_small_050 / random-init)")
    assert re.match(rf"^(\*\*|<u>)?{mean:.2f} ± [0-9.]+(\*\*|</u>)?$", tiny[header.index("BrainMRI AC")])  # no delta
    assert "which used tf_efficientnet_b6 (a backbone difference is no reproduction gap)" in out.splitlines()[0]
    assert "0 of 132 numbers reproduced" in out.splitlines()[0]

    # the same records on the paper's backbone: our numbers in place in the paper's row
    relabel_backbone(bmad_run, "k2", "k2b", EFF)
    assert main(["paper-table", "mvfa", "Table 7", "--from", "k2b", "--results-dir", str(bmad_run)]) == 0
    out = capsys.readouterr().out
    cells, header = row(out, "BGAD [57]")
    assert re.match(rf"^(\*\*|<u>)?{mean:.2f} ± ", cells[header.index("BrainMRI AC")])  # ours, in place
    assert cells[header.index("HIS AC")] == "--" or cells[header.index("HIS AC")].endswith("†")
    assert "(ours, on" not in out and "reproduced" in out.splitlines()[0]
    lines = out.splitlines()
    group = lines.index(next(line for line in lines if line.startswith("| *fewshot_k2*")))
    assert next(line for line in lines[group:] if line.startswith("| MVFA")).count("†") >= 2  # not run: copied
    assert main(["paper-table", "mvfa", "Table 7", "--from", "k2b", "--results-dir", str(bmad_run), "--delta"]) == 0
    published = lookup(
        load_published(),
        "BGAD",
        "few_shot",
        2,
        "BrainMRI",
        "image_auroc",
        None,
        EFF,
    )[0]
    assert f"({mean - published:+.2f})" in capsys.readouterr().out
    # a table the experiment covers nothing of is an error, as tables --published (it printed "0 of N", exit 0)
    assert main(["paper-table", "medsad-clip", "Table 2", "--from", "k2", "--results-dir", str(bmad_run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "k2 reproduce none of its" in err and "--coverage" in err

    out_tex = bmad_run / "t7.tex"
    args = ["paper-table", "mvfa", "Table 7", "--from", "k2b", "--results-dir", str(bmad_run), "--format", "latex"]
    assert main([*args, "--out", str(out_tex)]) == 0
    tex = out_tex.read_text()
    assert r"$^\dagger$" in tex and r"\emph{fewshot\_k2}" in tex
    assert " & -- & " in tex and "$-$$-$" not in tex  # a missing number stays a dash, not two minus signs
    if shutil.which("pdflatex"):
        doc = bmad_run / "doc.tex"
        doc.write_text(
            "\\documentclass{article}\\usepackage[landscape,margin=1in]{geometry}\\usepackage{booktabs}"
            f"\\begin{{document}}{tex}\\end{{document}}\n"
        )
        run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=bmad_run,
                             capture_output=True)  # fmt: skip
        assert run.returncode == 0, run.stdout.decode(errors="replace")[-1500:]


def test_paper_table_errors_are_one_line(tmp_path, capsys):
    assert main(["paper-table", "mvfa", "Table 99", "--from", "x", "--results-dir", str(tmp_path)]) == 2
    assert "no published table mvfa 'Table 99'" in capsys.readouterr().err
    assert main(["paper-table", "mvfa"]) == 2
    assert "expected PAPER TABLE [--from" in capsys.readouterr().err


def test_a_published_dice_at_another_threshold_is_matched_to_the_sweep(write_protocol, tmp_path, catalog, capsys):
    """MedSAD-CLIP's Table 7 prints AnomalyCLIP's zero-shot Dice at 0.3 ... 0.7: a run at the fixed 0.5
    fills 0.5 from ``dice`` and the other thresholds from its sweep (``dice_t0.3`` ...), never crosswise."""
    from benchmark.store import ResultStore

    root = tmp_path / "medsad"
    for name, synthetic in (("Brain", "SynthBrain"), ("Retina", "SynthRetina")):
        write_dataset(root, dataclasses.replace(catalog[synthetic], folder=catalog[name].folder), SMALL)
    methods = {"anomalyclip": {"layers": [4], "dpam_blocks": 2, "deep_depth": 2, "epochs": 1, "progress": False}}
    path = write_protocol(name="zs", data_root=str(root), datasets=["Brain", "Retina"], settings=["zero_shot_loo"],
                          threshold={"mode": "fixed", "value": 0.5}, methods=methods)  # fmt: skip
    assert main(["run", str(path)]) == 0
    results = tmp_path / "results"
    brain = next(r for r in ResultStore(results, "zs").latest().values() if r["dataset"] == "Brain")["metrics"]
    relabel_backbone(results, "zs", "zs_l14", L14)  # as on AnomalyCLIP's backbone
    assert main(["paper-table", "medsad-clip", "Table 7", "--from", "zs_l14", "--results-dir", str(results)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("| Method")).strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| Anomalyclip")]
    assert len(rows) == 5  # one row a threshold, in the paper's order
    for row, t in zip(rows, (0.3, 0.4, 0.5, 0.6, 0.7), strict=True):
        ours = brain["dice"] if t == 0.5 else brain[f"dice_t{t:g}"]
        assert row[header.index("Brain Dice")].replace("**", "").startswith(f"{ours * 100:.2f}")


def test_paper_table_shows_our_retrain_beside_the_authors_checkpoint_and_the_paper(write_protocol, tmp_path,
                                                                                    catalog, capsys):  # fmt: skip
    """MVFA retrained, and MVFA's released format (a file its own code wrote; tests/data/official) evaluated under
    the same protocol: a row each under the paper's, the checkpoint's never counted as reproduced."""
    root = tmp_path / "bmad"
    write_dataset(root, dataclasses.replace(catalog["SynthBrain"], folder=catalog["BrainMRI"].folder), SMALL)
    mvfa = {"method": "mvfa", "mode": "official", "layers": [2, 4], "epochs": 1, "progress": False}
    # its files are per dataset: a mapping names the one each dataset's cells evaluate
    official = {"checkpoint": {"BrainMRI": str(OFFICIAL / "mvfa_official_tiny.pth")}, "checkpoint_format": "official"}
    path = write_protocol(
        name="k2", data_root=str(root), datasets=["BrainMRI"], settings=[{"name": "few_shot", "shots": [2]}],
        threshold={"mode": "fixed", "value": 0.5}, methods={"mvfa": mvfa, "mvfa_authors": {**mvfa, **official}},
    )  # fmt: skip
    assert main(["run", str(path)]) == 0
    results = tmp_path / "results"
    records = {r["method"]: r for r in ResultStore(results, "k2").latest().values()}
    authors = records["mvfa_authors"]
    assert (
        authors["fit_source"] == "authors' checkpoint" and authors["variant"] == "MVFA (official) (authors' checkpoint)"
    )
    assert authors["params"]["fit"] == f"authors' checkpoint {OFFICIAL / 'mvfa_official_tiny.pth'}"
    assert records["mvfa"]["fit_source"] == "retrain" and records["mvfa"]["params"]["fit"].startswith("trained ")
    capsys.readouterr()
    assert main(["tables", "k2", "--results-dir", str(results)]) == 0
    table = capsys.readouterr().out
    assert "| MVFA (official; authors' checkpoint; few-shot, K=2)" in table
    assert "**" not in table and "<u>" not in table  # a checkpoint is not ranked against the one retrain
    relabel_backbone(results, "k2", "k2b", L14)
    assert main(["paper-table", "mvfa", "Table 7", "--from", "k2b", "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    group = lines.index(next(line for line in lines if line.startswith("| *fewshot_k2*")))
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    end = next(i for i in range(group + 1, len(lines)) if lines[i].startswith("| *"))
    rows = {line.strip("|").split("|")[0].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in lines[group:end] if line.startswith("| MVFA")}  # fmt: skip
    column = header.index("BrainMRI AC")
    retrain = f"{records['mvfa']['metrics']['image_auroc'] * 100:.2f}"
    checkpoint = f"{authors['metrics']['image_auroc'] * 100:.2f}"
    assert rows["MVFA"][column].strip("*<u>/") == retrain
    assert rows["MVFA (authors' checkpoint, evaluated by us)"][column] == checkpoint
    assert "2 of 132 numbers reproduced" in lines[0]  # the retrain's AC and AS, never the checkpoint's
    assert "retrain vs released weights vs paper" in lines[0]
