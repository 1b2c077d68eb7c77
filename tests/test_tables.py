import pytest

from benchmark.reports.tables import render_latex, render_markdown
from benchmark.store import ResultStore

L14 = "ViT-L-14-336 / openai (pretrained)"
WINCLIP_BACKBONE = "ViT-B-16-plus-240 / laion400m_e31 (pretrained)"  # the architecture MVFA's WinCLIP rows used


def _record(store, method, variant, setting, shots, seed, dataset, metrics, threshold=0.5, backbone=None):
    store.append(
        {
            "config_hash": f"{method}{variant}{setting}{shots}{seed}{dataset}{threshold}{backbone}",
            "status": "finished",
            "method": method,
            "variant": variant,
            "setting": setting,
            "shots": shots,
            "seed": seed,
            "dataset": dataset,
            "backbone": backbone or (WINCLIP_BACKBONE if method == "winclip" else "bb"),
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
    _record(store, "other", "Other", "zero_shot_loo", None, 0, "BrainMRI", {"image_auroc": 0.9, "pixel_auroc": 0.7})
    _record(store, "other", "Other", "zero_shot_loo", None, 0, "HIS", {"image_auroc": 0.6})
    _record(store, "third", "Third", "few_shot", 4, 0, "BrainMRI", {"image_auroc": 0.7, "pixel_auroc": 0.6})
    _record(store, "third", "Third", "few_shot", 4, 0, "HIS", {"image_auroc": 0.4})
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
\multicolumn{4}{l}{\emph{zero-shot LOO}} \\
Other & \textbf{90.00} & \underline{70.00} & \textbf{60.00} \\
WinCLIP & \underline{82.00} & \textbf{91.00} & \underline{50.00} \\
\midrule
\multicolumn{4}{l}{\emph{few-shot, K=4}} \\
Third & 70.00 & 60.00 & 40.00 \\
\bottomrule
\end{tabular}
\end{table}
"""


def test_latex_groups_rows_by_setting_and_ranks_within_each(tmp_path):
    """Means only by default; a setting's rows are ranked among themselves (a lone row is not marked)."""
    got = render_latex(_known(tmp_path), ("image_auroc", "pixel_auroc"), "cap", "tab:known")
    assert got == EXPECTED


def test_latex_std_is_optional_and_small(tmp_path):
    got = render_latex(_known(tmp_path), ("image_auroc", "pixel_auroc"), "cap", "tab:known", std=True)
    assert (
        r"WinCLIP & \underline{82.00{\scriptsize $\pm$2.83}} & \textbf{91.00{\scriptsize $\pm$1.41}} & "
        r"\underline{50.00{\scriptsize $\pm$0.00}} \\"
    ) in got.splitlines()
    assert r"Other & \textbf{90.00} &" in got  # one seed: no spread to show


def test_latex_published_rows_with_true_minus_signs(tmp_path):
    got = render_latex(_known(tmp_path), ("image_auroc", "pixel_auroc"), "cap", "tab:known", published=True)
    # published WinCLIP zero-shot numbers of MVFA Table 2 sit under the zero-shot row, and only there
    lines = got.splitlines()
    row = lines.index(r"WinCLIP & \underline{82.00} & \textbf{91.00} & \underline{50.00} \\")
    assert lines[row + 1] == r"\quad published & 66.49 & 85.99 & 69.85 \\"
    assert lines[row + 2] == r"\quad difference & $+$15.51 & $+$5.01 & $-$19.85 \\"
    assert got.count(r"\quad published") == 1 and "Published rows: mvfa Table 2." in got


def test_a_run_on_another_backbone_is_labelled_and_never_beside_the_published_number(tmp_path):
    """MVFA's WinCLIP numbers came from ViT-B-16+: the same method on a tiny random-init ViT is its own row,
    labelled with its backbone, with no published number or difference under it; the caption says why."""
    store = ResultStore(tmp_path, "tiny")
    for seed in (0, 1):
        _record(store, "winclip", "WinCLIP", "zero_shot_loo", None, seed, "BrainMRI", {"image_auroc": 0.8},
                backbone="tiny-vit / random-init (random-init, seed 0)")  # fmt: skip
        _record(store, "winclip", "WinCLIP", "zero_shot_loo", None, seed, "BrainMRI", {"image_auroc": 0.7})
    text = render_markdown(store.frame(), ("image_auroc",), "cap", published=True)
    lines = text.splitlines()
    tiny = next(i for i, line in enumerate(lines) if line.startswith("| WinCLIP on tiny-vit / random-init ("))
    assert "80.00" in lines[tiny] and (tiny + 1 == len(lines) or "published" not in lines[tiny + 1])
    matched = next(i for i, line in enumerate(lines) if line.startswith("| WinCLIP (zero-shot LOO)"))
    assert "70.00" in lines[matched] and "published (mvfa Table 2)" in lines[matched + 1]
    assert text.count("published (") == 1
    assert "WinCLIP on tiny-vit / random-init (zero-shot LOO; the paper's: ViT-B-16-plus-240)" in lines[0]


def test_latex_long_names_get_a_mark_and_a_legend(tmp_path):
    store = ResultStore(tmp_path, "abl")
    for method, variant, value in (
        ("medsad_clip", "MedSAD-CLIP", 0.8),
        ("no_tpca", "MedSAD-CLIP (prompt=on, TPCA=off, MC=on)", 0.7),
        ("no_mc", "MedSAD-CLIP (prompt=on, TPCA=on, MC=off)", 0.6),
    ):
        _record(store, method, variant, "supervised", None, 0, "Brain", {"dice": value})
    got = render_latex(store.frame(), ("dice",), "cap", "tab:abl")
    assert r"MedSAD-CLIP$^{1}$ & \textbf{70.00}" not in got  # 0.8 is the best
    assert r"MedSAD-CLIP & \textbf{80.00} \\" in got
    assert r"MedSAD-CLIP$^{1}$ & 60.00 \\" in got and r"MedSAD-CLIP$^{2}$ & \underline{70.00} \\" in got
    assert "Rows: 1: MedSAD-CLIP (prompt=on, TPCA=on, MC=off). 2: MedSAD-CLIP (prompt=on, TPCA=off, MC=on)." in got


def test_markdown_marks_ties_alike(tmp_path):
    store = ResultStore(tmp_path, "ties")
    for m, value in (("a", 0.7), ("b", 0.7), ("c", 0.6)):
        _record(store, m, m.upper(), "full_normal", None, 0, "RESC", {"image_auroc": value})
    md = render_markdown(store.frame(), ("image_auroc",), "cap")
    assert md.count("**70.00**") == 2 and md.count("<u>60.00</u>") == 1


def test_a_group_that_ties_throughout_is_not_marked(tmp_path):
    store = ResultStore(tmp_path, "ties")
    for m in ("a", "b"):
        _record(store, m, m.upper(), "full_normal", None, 0, "RESC", {"dice": 0.0})
    md = render_markdown(store.frame(), ("dice",), "cap")
    assert "**" not in md and "<u>" not in md


def test_a_variant_named_with_parentheses_gets_one_label(tmp_path):
    store = ResultStore(tmp_path, "labels")
    _record(store, "april_gan", "APRIL-GAN (few-shot)", "few_normal", 2, 0, "RESC", {"image_auroc": 0.7})
    _record(store, "mvfa", "MVFA (official) (authors' checkpoint)", "few_shot", 2, 0, "RESC", {"image_auroc": 0.6})
    md = render_markdown(store.frame(), ("image_auroc",), "cap")
    labels = [line.split("|")[1].strip() for line in md.splitlines()[4:]]
    assert labels == [
        "MVFA (official; authors' checkpoint; few-shot, K=2)", "APRIL-GAN (few-shot; few-normal-shot, K=2)"
    ]  # fmt: skip


def test_per_image_dsc_on_sets_with_normal_images_is_over_the_anomalous_ones(tmp_path):
    from benchmark.reports.tables import caption_for

    store = ResultStore(tmp_path, "dsc")
    seg = {"dice_per_image": 0.4, "nsd": 0.5}
    # written before the rule: normal images averaged in (an empty map scored 1 on each); not shown
    _record(store, "old", "Old", "few_shot", 2, 0, "BrainMRI", {"image_auroc": 0.7, "dice_per_image": 0.5, "nsd": 0.5})
    store.append({**store.records()[-1], "config_hash": "new", "method": "new", "variant": "New",
                  "params": {"segmentation_images": "anomalous"}, "metrics": {"image_auroc": 0.6, **seg}})  # fmt: skip
    _record(store, "seg", "Seg", "few_shot", 2, 0, "Kvasir", seg)  # every image holds a lesion: as before
    frame = store.frame()
    shown = frame[frame["metric"] == "dice_per_image"]
    assert sorted(shown["method"]) == ["new", "seg"]
    md = render_markdown(frame, ("dice_per_image", "nsd"), caption_for(frame, "dsc", ("dice_per_image", "nsd")))
    assert "Old" not in md and "| New (few-shot, K=2) |" in md
    assert "DSC and NSD on BrainMRI (sets with normal test images too): per-image means over the anomalous test " \
           "images only" in md  # fmt: skip


def test_efficiency_table_puts_parameters_beside_mean_auroc(tmp_path):
    from benchmark.reports.tables import efficiency_frame, render_efficiency

    store = ResultStore(tmp_path, "eff")
    for seed, (img, pix) in enumerate([(0.8, 0.9), (0.6, 0.7)]):
        efficiency = {"trainable_params": 2_970_000.0, "params": 152e6, "gflops_per_image": 40.0 + seed}
        efficiency |= {"fit_s": 60.0 * (seed + 1), "model_ms_per_image": 10.0, "ms_per_image": 12.5}
        efficiency |= {"images_per_s": 80.0, "peak_memory_mb": 2048.0}
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
                "params": {"trainable_params": 2_970_000, "head_flops": 3.26e9, "precision": "fp32"},
                "metrics": {"image_auroc": img, "pixel_auroc": pix},
                "tags": {"device": "cpu"},
                "efficiency": efficiency,
            }
        )
    row = efficiency_frame(store.records()).iloc[0]
    assert row["trainable_params_M"] == pytest.approx(2.97) and row["head_gflops"] == pytest.approx(3.26)
    assert row["image_auroc"] == pytest.approx(0.7) and row["average_auroc"] == pytest.approx(0.75)
    assert row["fit_s"] == pytest.approx(90.0) and row["gflops_per_image"] == pytest.approx(40.5)  # means over seeds
    assert row["params_M"] == pytest.approx(152.0) and row["precision"] == "fp32" and row["device"] == "cpu"
    md = render_efficiency(store.records(), "markdown", "cap")
    header, _, line = (row.strip("|").split("|") for row in md.strip().splitlines()[-3:])
    cells = dict(zip([h.strip() for h in header], [c.strip() for c in line], strict=True))
    assert cells["Method"] == "MCMIAD" and cells["Precision"] == "fp32" and cells["Trainable params (M)"] == "2.97"
    assert cells["Fit (s)"] == "90.0" and cells["GFLOPs / image"] == "40.5" and cells["Avg."] == "75.00"
    # a record from before efficiency was measured: parameters only, the rest "--"
    old = ResultStore(tmp_path, "old")
    old.append({**store.records()[0], "efficiency": {}, "tags": {}})
    assert "| --" in render_efficiency(old.records(), "markdown", "cap")


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
        "| MVFA (few-shot, K=2)            | <u>10.00</u>  |",
        "| MVFA (few-shot, K=2)            | **20.00**     |",
        "| WinCLIP+ (few-normal-shot, K=2) | 50.00 ± 14.14 |",
    ]


def test_published_dice_matches_only_the_same_fixed_threshold():
    from benchmark.reports.published import load_published, lookup

    pub = load_published()
    assert lookup(pub, "MedSAD-CLIP", "supervised", None, "Brain", "dice", 0.5, L14) == (89.47, "medsad-clip Table 2")
    assert lookup(pub, "MedSAD-CLIP", "supervised", None, "Brain", "dice", 0.3, L14) is None
    assert lookup(pub, "MedSAD-CLIP", "supervised", None, "Brain", "dice", None, L14) is None
    assert lookup(pub, "MedSAD-CLIP", "supervised", None, "Brain", "dice", float("nan"), L14) is None
    assert lookup(pub, "MedSAD-CLIP", "supervised", None, "Brain", "image_accuracy", None, L14) == (
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
                "seed": 0, "dataset": "Brain", "backbone": "ViT-L-14-336 / openai (pretrained)", "threshold": 0.5,
                "metrics": {"dice": 0.8},
            }
        )  # fmt: skip
    lines = render_markdown(store.frame(), ("dice",), "cap", published=True).splitlines()
    published = [i for i, line in enumerate(lines) if "published (medsad-clip Table 2)" in line]
    assert len(published) == 1 and "89.47" in lines[published[0]]
    assert "MedSAD-CLIP (supervised)" in lines[published[0] - 1]


DEMO_ROWS = (  # the demo's rows: (method, variant, setting, K)
    ("winclip", "WinCLIP", "zero_shot_loo", None),
    ("winclip", "WinCLIP+", "few_normal", 2),
    ("winclip", "WinCLIP+", "few_shot", 2),
    ("mvfa", "MVFA (official)", "zero_shot_loo", None),
    ("mvfa", "MVFA (official)", "few_shot", 2),
    ("bgad", "BGAD", "few_shot", 2),
    ("mcmiad", "MCMIAD", "few_normal", 2),
    ("medsad_clip", "MedSAD-CLIP", "few_shot", 2),
    ("medsad_no_prompt", "MedSAD-CLIP (prompt=off, TPCA=on, MC=on)", "few_shot", 2),
    ("medsad_no_tpca", "MedSAD-CLIP (prompt=on, TPCA=off, MC=on)", "few_shot", 2),
    ("medsad_no_mc", "MedSAD-CLIP (prompt=on, TPCA=on, MC=off)", "few_shot", 2),
)


def _demo_frame(tmp_path):
    store = ResultStore(tmp_path, "demo")
    for i, (method, variant, setting, shots) in enumerate(DEMO_ROWS):
        for seed in (0, 1):
            for j, dataset in enumerate(("SynthBrain", "SynthLiver", "SynthRetina")):
                value = 0.4 + 0.05 * ((i + j + seed) % 9)
                metrics = {"image_auroc": value, "pixel_auroc": value, "dice": value / 3, "image_accuracy": value}
                _record(store, method, variant, setting, shots, seed, dataset, metrics)
    return store.frame()


@pytest.mark.parametrize("std", [False, True])
@pytest.mark.parametrize("metrics", [("image_auroc", "pixel_auroc"), ("dice", "image_accuracy")])
def test_the_demo_table_fits_a_landscape_page(tmp_path, std, metrics):
    """Compiled with pdflatex where it is installed (no overfull box on a landscape letter page with 1-inch
    margins); else measured with Computer Modern's metrics (``tests/tools/latex_width.py``)."""
    import shutil
    import subprocess

    from tools.latex_width import PAGE_PT, tabular_width

    from benchmark.reports.tables import caption_for

    frame = _demo_frame(tmp_path)
    tex = render_latex(frame, metrics, caption_for(frame, "demo", metrics, std), "tab:demo", std=std)
    assert tex.count(r"\emph{") == 3 and "Rows: 1: MedSAD-CLIP (" in tex and "3: MedSAD-CLIP (" in tex
    if shutil.which("pdflatex") is None:
        assert tabular_width(tex) <= PAGE_PT
        return
    doc = tmp_path / "t.tex"
    doc.write_text(
        "\\documentclass{article}\\usepackage[landscape,letterpaper,margin=1in]{geometry}\\usepackage{booktabs}"
        f"\\begin{{document}}{tex}\\end{{document}}\n"
    )
    run = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path, capture_output=True
    )
    assert run.returncode == 0, run.stdout.decode(errors="replace")[-2000:]
    assert "Overfull \\hbox" not in (tmp_path / "t.log").read_text(errors="replace")


def test_the_width_checker_sees_a_table_too_wide(tmp_path):
    """The checker itself: the old layout (long labels with the setting, ± std in full size) did not fit."""
    from tools.latex_width import PAGE_PT, tabular_width

    cells = " & ".join([r"\textbf{82.00 $\pm$ 12.83}"] * 6)
    label = "MedSAD-CLIP (prompt=on, TPCA=off, MC=on) (few-shot, K=2)"
    wide = "\\begin{tabular}{l cc cc cc}\n" + f"{label} & {cells} \\\\\n"
    assert tabular_width(wide + "\\end{tabular}") > PAGE_PT
    assert 0 < tabular_width("\\begin{tabular}{l}\nMethod \\\\\n\\end{tabular}") < 60
