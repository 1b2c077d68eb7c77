import pytest

from benchmark.reports.tables import render_latex, render_markdown
from benchmark.store import ResultStore


def _record(store, method, variant, setting, shots, seed, dataset, metrics, threshold=0.5):
    store.append(
        {
            "config_hash": f"{method}{variant}{setting}{shots}{seed}{dataset}{threshold}",
            "status": "finished",
            "method": method,
            "variant": variant,
            "setting": setting,
            "shots": shots,
            "seed": seed,
            "dataset": dataset,
            "backbone": "bb",
            "threshold": threshold,
            "metrics": metrics,
        }
    )


def _known(tmp_path):
    store = ResultStore(tmp_path, "known")
    for seed, (a, b) in enumerate([(0.80, 0.90), (0.84, 0.92)]):
        _record(
            store, "winclip", "WinCLIP", "zero_shot_loo", None, seed, "BrainMRI", {"image_auroc": a, "pixel_auroc": b}
        )
        _record(store, "winclip", "WinCLIP", "zero_shot_loo", None, seed, "HIS", {"image_auroc": 0.5})
    _record(store, "other", "Other", "few_shot", 4, 0, "BrainMRI", {"image_auroc": 0.9, "pixel_auroc": 0.7})
    _record(store, "other", "Other", "few_shot", 4, 0, "HIS", {"image_auroc": 0.6})
    store.append({"config_hash": "failed", "status": "failed", "method": "x", "dataset": "HIS"})
    return store.frame()


EXPECTED = r"""\begin{table}[t]
\centering
\caption{cap}
\label{tab:known}
\begin{tabular}{l cc c}
\toprule
 & \multicolumn{2}{c}{BrainMRI} & \multicolumn{1}{c}{HIS} \\
\cmidrule(lr){2-3} \cmidrule(lr){4-4}
Method & AC & AS & AC \\
\midrule
WinCLIP (zero-shot LOO) & \underline{82.00 $\pm$ 2.83} & \textbf{91.00 $\pm$ 1.41} & \underline{50.00 $\pm$ 0.00} \\
Other (few-shot, K=4) & \textbf{90.00} & \underline{70.00} & \textbf{60.00} \\
\quad published (mvfa Table 2) & 66.49 & 85.99 & 69.85 \\
\quad difference & +23.51 & -15.99 & -9.85 \\
\bottomrule
\end{tabular}
\end{table}
"""


def test_latex_exact(tmp_path):
    frame = _known(tmp_path)
    got = render_latex(frame, ("image_auroc", "pixel_auroc"), "cap", "tab:known")
    assert got == EXPECTED.replace("\\quad published (mvfa Table 2) & 66.49 & 85.99 & 69.85 \\\\\n", "").replace(
        "\\quad difference & +23.51 & -15.99 & -9.85 \\\\\n", ""
    )


def test_latex_with_published_rows(tmp_path):
    frame = _known(tmp_path)
    frame.loc[frame["method"] == "other", ["method", "plugin"]] = "winclip"
    frame.loc[frame["variant"] == "Other", "variant"] = "Other"
    got = render_latex(frame, ("image_auroc", "pixel_auroc"), "cap", "tab:known", published=True)
    # published WinCLIP zero-shot numbers of MVFA Table 2 sit under the zero-shot row, not the few-shot one
    lines = got.splitlines()
    row = lines.index(
        r"WinCLIP (zero-shot LOO) & \underline{82.00 $\pm$ 2.83} & \textbf{91.00 $\pm$ 1.41} & "
        r"\underline{50.00 $\pm$ 0.00} \\"
    )
    assert lines[row + 1] == r"\quad published (mvfa Table 2) & 66.49 & 85.99 & 69.85 \\"
    assert lines[row + 2] == r"\quad difference & +15.51 & +5.01 & -19.85 \\"


def test_markdown_marks_ties_alike(tmp_path):
    store = ResultStore(tmp_path, "ties")
    for m in ("a", "b"):
        _record(store, m, m.upper(), "full_normal", None, 0, "RESC", {"image_auroc": 0.7})
    md = render_markdown(store.frame(), ("image_auroc",), "cap")
    assert md.count("**70.00**") == 2


def test_efficiency_table_puts_parameters_beside_mean_auroc(tmp_path):
    from benchmark.reports.tables import efficiency_frame, render_efficiency

    store = ResultStore(tmp_path, "eff")
    for seed, (img, pix) in enumerate([(0.8, 0.9), (0.6, 0.7)]):
        store.append(
            {
                "config_hash": f"h{seed}",
                "status": "finished",
                "method": "mcmiad",
                "variant": "MCMIAD",
                "setting": "full_normal",
                "shots": None,
                "seed": seed,
                "dataset": "RESC",
                "params": {"trainable_params": 2_970_000, "head_flops": 3.26e9},
                "metrics": {"image_auroc": img, "pixel_auroc": pix},
            }
        )
    row = efficiency_frame(store.records()).iloc[0]
    assert row["trainable_params_M"] == pytest.approx(2.97) and row["head_gflops"] == pytest.approx(3.26)
    assert row["image_auroc"] == pytest.approx(0.7) and row["average_auroc"] == pytest.approx(0.75)
    md = render_efficiency(store.records(), "markdown", "cap")
    assert "| MCMIAD   | full-normal |     | 2.97" in md and "75.00" in md


def test_rows_follow_their_keys_whatever_the_thresholds(tmp_path):
    store = ResultStore(tmp_path, "val")
    # validation mode: the record holds no main threshold (the per-cell choices are params), seeds make one row
    for seed, dice in enumerate([0.4, 0.6]):
        _record(store, "winclip", "WinCLIP+", "few_normal", 2, seed, "RESC", {"dice": dice}, threshold=None)
    # one method at two fixed main thresholds (a protocol rerun with another threshold.value): two rows, each
    # with its own value
    for threshold, dice in ((0.3, 0.1), (0.7, 0.2)):
        _record(store, "mvfa", "MVFA", "few_shot", 2, 0, "RESC", {"dice": dice}, threshold=threshold)
    rows = [line for line in render_markdown(store.frame(), ("dice",), "cap").splitlines() if line.startswith("| ")]
    assert rows[1:] == [
        "| MVFA (few-shot, K=2)            | 10.00             |",
        "| MVFA (few-shot, K=2)            | <u>20.00</u>      |",
        "| WinCLIP+ (few-normal-shot, K=2) | **50.00 ± 14.14** |",
    ]


def test_published_dice_matches_only_the_same_fixed_threshold():
    from benchmark.reports.published import load_published, lookup

    pub = load_published()
    assert lookup(pub, "MedSAD-CLIP", "supervised", None, "Brain", "dice", 0.5) == (89.47, "medsad-clip Table 2")
    assert lookup(pub, "MedSAD-CLIP", "supervised", None, "Brain", "dice", 0.3) is None
    assert lookup(pub, "MedSAD-CLIP", "supervised", None, "Brain", "dice", None) is None
    assert lookup(pub, "MedSAD-CLIP", "supervised", None, "Brain", "dice", float("nan")) is None
    assert lookup(pub, "MedSAD-CLIP", "supervised", None, "Brain", "image_accuracy", None) == (
        96.34,
        "medsad-clip Table 2",
    )


def test_published_numbers_sit_only_beside_the_configuration_the_paper_reports(tmp_path):
    """An ablation alias of MedSAD-CLIP is not the paper's MedSAD-CLIP (nor its Table 3 'CLIP-adapt', which
    repeats its MVFA numbers): only the full model's row gets the published number."""
    store = ResultStore(tmp_path, "abl")
    for method, variant, published_as in (
        ("medsad_clip", "MedSAD-CLIP", "MedSAD-CLIP"),
        ("clip_adapt", "MedSAD-CLIP (prompt=off, TPCA=off, MC=off)", ""),
    ):
        store.append(
            {
                "config_hash": method, "status": "finished", "method": method, "plugin": "medsad_clip",
                "variant": variant, "published_as": published_as, "setting": "supervised", "shots": None,
                "seed": 0, "dataset": "Brain", "backbone": "bb", "threshold": 0.5, "metrics": {"dice": 0.8},
            }
        )  # fmt: skip
    lines = render_markdown(store.frame(), ("dice",), "cap", published=True).splitlines()
    published = [i for i, line in enumerate(lines) if "published (medsad-clip Table 2)" in line]
    assert len(published) == 1 and "89.47" in lines[published[0]]
    assert "MedSAD-CLIP (supervised)" in lines[published[0] - 1]
