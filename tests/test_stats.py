"""Statistics over test images: bootstrap intervals, DeLong's test, paired bootstrap, Holm, Friedman/Nemenyi,
per-image evidence, and the compare/report commands on a real run."""

import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import protocol_file
from mlflow.tracking import MlflowClient
from scipy import stats as sps

from benchmark import stats
from benchmark.cli import main
from benchmark.evidence import EvidenceWriter, pixel_counts
from benchmark.metrics import PixelMetrics, auroc_exact
from benchmark.reports.tables import interval_text
from benchmark.store import ResultStore


def _scores(n_normal=60, n_anomalous=40, shift=1.0, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_normal), np.ones(n_anomalous)].astype(bool)
    a = rng.normal(0, 1, len(labels)) + shift * labels
    b = 0.6 * a + 0.8 * rng.normal(0, 1, len(labels)) + 0.3 * labels
    return a, b, labels


def test_bootstrap_interval_is_scipys_own():
    a, _, labels = _scores()
    got = stats.bootstrap_ci(lambda i: auroc_exact(a[i], labels[i]), labels, 500, seed=3)
    normal, anomalous = np.flatnonzero(~labels), np.flatnonzero(labels)
    expected = sps.bootstrap(
        (normal, anomalous),
        lambda x, y: auroc_exact(a[np.r_[x, y]], labels[np.r_[x, y]]),
        n_resamples=500,
        method="BCa",
        vectorized=False,
        rng=np.random.default_rng(3),
    ).confidence_interval
    assert (got.low, got.high) == (expected.low, expected.high)
    assert got.low < got.value == auroc_exact(a, labels) < got.high


def test_monte_carlo_error_of_the_endpoints_is_their_spread_over_bootstrap_seeds():
    """The MC error read off one bootstrap distribution is the size of the endpoints' spread over reruns with
    other bootstrap seeds, and shrinks as the resamples grow (about as 1 / sqrt(B))."""
    a, _, labels = _scores(12, 12)

    def statistic(i):
        return auroc_exact(a[i], labels[i])

    runs = [stats.bootstrap_ci(statistic, labels, 500, seed=s) for s in range(8)]
    spread = max(np.std([r.low for r in runs], ddof=1), np.std([r.high for r in runs], ddof=1))
    assert 0.5 < np.mean([r.mc_error for r in runs]) / spread < 2.0
    many = stats.bootstrap_ci(statistic, labels, 8000, seed=0)
    assert 0 < many.mc_error < np.mean([r.mc_error for r in runs]) / 2


def test_intervals_are_printed_only_to_the_digits_their_mc_error_supports():
    assert interval_text(0.71234, 0.86789, 0.012) == "[71, 87]"  # an error of 1.2 points: whole points
    assert interval_text(0.71234, 0.86789, 0.004) == "[71.2, 86.8]"
    assert interval_text(0.71234, 0.86789, 0.00004) == "[71.23, 86.79]"  # never more than two decimals
    assert interval_text(0.71234, 0.86789, 0.0) == "[71.23, 86.79]"  # every resample alike: no error


def test_delong_variance_matches_a_direct_computation():
    """The structural components computed pair by pair (O(m n)), independently of the midrank algorithm."""
    a, b, labels = _scores(30, 20)
    aucs, cov = stats.delong_covariance(np.vstack([a, b]), labels)
    pos, neg = [s[labels] for s in (a, b)], [s[~labels] for s in (a, b)]

    def psi(x, y):
        return (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])

    v10 = [psi(p, q).mean(1) for p, q in zip(pos, neg, strict=True)]
    v01 = [psi(p, q).mean(0) for p, q in zip(pos, neg, strict=True)]
    direct = np.cov(np.vstack(v10)) / labels.sum() + np.cov(np.vstack(v01)) / (~labels).sum()
    np.testing.assert_allclose(cov, direct, rtol=1e-12)
    np.testing.assert_allclose(aucs, [auroc_exact(a, labels), auroc_exact(b, labels)], rtol=1e-12)


def test_delong_p_value_agrees_with_a_permutation_test():
    a, b, labels = _scores(70, 50)
    delong = stats.delong_test([a], [b], labels)
    rng = np.random.default_rng(1)
    observed, hits, rounds = abs(delong.difference), 0, 3000
    for _ in range(rounds):  # swap the two methods' scores image by image: the null of equal AUROCs
        swap = rng.random(len(labels)) < 0.5
        x, y = np.where(swap, b, a), np.where(swap, a, b)
        hits += abs(auroc_exact(x, labels) - auroc_exact(y, labels)) >= observed - 1e-12
    permutation = (hits + 1) / (rounds + 1)
    assert 0.05 < delong.p < 0.6 and abs(delong.p - permutation) < 0.03
    vectorised = stats.permutation_auroc_test([a], [b], labels, rounds, seed=2)  # on ranks, all at once
    assert vectorised.difference == pytest.approx(delong.difference) and abs(vectorised.p - permutation) < 0.03


def test_small_test_sets_get_a_permutation_test_whose_p_few_images_can_support():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(12), np.ones(12)].astype(bool)
    a = [rng.normal(0, 1, 24) + 2 * labels for _ in range(2)]  # two seeds each
    b = [rng.normal(0, 1, 24) - 2 * labels for _ in range(2)]
    delong = stats.delong_test(a, b, labels)
    test = stats.auroc_test(a, b, labels, 999)
    # no swap of 999 reaches the observed difference: p is the floor (1 + 0) / (999 + 1), never 0 nor 1e-70
    assert delong.p < 1e-12 and test.test == "permutation" and test.p == 1 / 1000
    assert test.difference == pytest.approx(delong.difference)
    assert stats.auroc_test(a, [b[0]], labels).test == "DeLong"  # other seed counts: no paired swap


@pytest.mark.parametrize(("normal", "anomalous", "expected"), [(60, 49, "permutation"), (50, 50, "DeLong")])
def test_the_auroc_test_switches_at_fifty_images_in_a_class(normal, anomalous, expected):
    a, b, labels = _scores(normal, anomalous)
    assert stats.auroc_test([a], [b], labels, 200).test == expected


def test_identical_methods_give_p_one():
    a, _, labels = _scores()
    assert stats.delong_test([a, a + 0.0], [a], labels).p == 1.0
    assert stats.permutation_auroc_test([a, a], [a, 2 * a], labels).p == 1.0  # other scale, same ranks
    same = stats.paired_bootstrap(
        lambda i: auroc_exact(a[i], labels[i]), lambda i: auroc_exact(a[i], labels[i]), labels
    )
    assert same.p == 1.0 and same.difference == 0.0


def test_paired_bootstrap_sees_a_real_difference():
    a, _, labels = _scores(80, 80, shift=2.0)
    noise = np.random.default_rng(5).normal(0, 1, len(labels))
    test = stats.paired_bootstrap(
        lambda i: auroc_exact(a[i], labels[i]), lambda i: auroc_exact(noise[i], labels[i]), labels, 500
    )
    assert test.difference > 0.3 and test.p < 0.01


def test_paired_bootstrap_p_is_never_zero():
    """No resample crosses zero: p = 2 (1 + 0) / (B + 1), the smallest p B resamples can give, not 0."""
    a, _, labels = _scores(80, 80, shift=3.0)
    noise = np.random.default_rng(5).normal(0, 1, len(labels))
    test = stats.paired_bootstrap(
        lambda i: auroc_exact(a[i], labels[i]), lambda i: auroc_exact(noise[i], labels[i]), labels, 199
    )
    assert test.p == 2 / 200


def test_holm_and_friedman_nemenyi():
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    table = pd.DataFrame({"A": [0.9, 0.8, 0.85, 0.7], "B": [0.6, 0.7, 0.65, 0.6], "C": [0.5, 0.4, 0.6, 0.55]})
    result = stats.friedman_nemenyi(table)
    assert result.p == pytest.approx(sps.friedmanchisquare(*table.to_numpy().T).pvalue)
    assert result.ranks == {"A": 1.0, "B": 2.0, "C": 3.0}
    # Demsar (2006): CD = q_0.05 sqrt(k (k + 1) / (6 N)), q_0.05 = 2.343 for k = 3
    assert result.critical_difference == pytest.approx(2.343 * np.sqrt(3 * 4 / 24), abs=1e-3)


def test_rank_tests_need_five_datasets_and_their_diagram_keeps_its_title():
    from benchmark.reports.compare import cd_figure, rank_tests

    rng = np.random.default_rng(0)
    methods = [f"a method with a long variant name {i}" for i in range(11)]
    rows = [{"group": "few-shot, K=4", "dataset": f"D{d}", "method": m, "mean": rng.random()}
            for d in range(5) for m in methods]  # fmt: skip
    tests, too_few = rank_tests(pd.DataFrame(rows), True, 0.05)
    assert list(tests) == ["few-shot, K=4"] and tests["few-shot, K=4"].datasets == 5 and too_few == {}
    fewer = pd.DataFrame([r for r in rows if r["dataset"] != "D4"])
    assert rank_tests(fewer, True, 0.05) == ({}, {"few-shot, K=4": 4})
    fig = cd_figure(tests["few-shot, K=4"], "an experiment with a long name, few-shot, K=4, image_auroc")
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1  # wrapped, not cut


def test_per_image_counts_give_the_dataset_dice_bit_for_bit():
    torch.manual_seed(0)
    maps, masks = torch.rand(7, 20, 20), torch.rand(7, 20, 20) > 0.85
    thresholds = (0.1, 0.3, 0.5, 0.7, 0.9)
    pixels = PixelMetrics(thresholds)
    writer = EvidenceWriter(thresholds, masks=True)
    for part in (slice(0, 3), slice(3, 7)):
        pixels.update(maps[part], masks[part])
        n = maps[part].shape[0]
        writer.update(tuple(str(i) for i in range(n)), ["x"] * n, torch.rand(n), torch.ones(n), maps[part], masks[part])
    evidence = writer.build()
    for t in thresholds:
        assert evidence.dice(t) == pixels.dice(t)
    counts = pixel_counts(maps, masks, torch.tensor(thresholds))
    assert (counts[:, 0] + counts[:, 2] == masks.reshape(7, -1).sum(1, keepdim=True).numpy()).all()


@pytest.fixture(scope="module")
def twins(tmp_path_factory, synth_root, mlflow_template):
    """A run where a second method entry is the first one again, and a third differs (once per test process:
    the tests only read it, each writing files of its own)."""
    folder = tmp_path_factory.mktemp("twins")
    path = protocol_file(
        folder,
        synth_root,
        mlflow_template,
        methods={
            "winclip": {"scales": [2]},
            "winclip_twin": {"method": "winclip", "scales": [2]},
            "winclip_other": {  # another random backbone: other numbers
                "method": "winclip",
                "scales": [2],
                "backbone": {"model": "tiny-vit", "weights": "random-init", "seed": 1},
            },
        },
        settings=[{"name": "few_normal", "shots": [2]}],
        datasets=["SynthBrain", "SynthLiver"],
        seeds=[0, 1],
    )
    assert main(["run", str(path)]) == 0
    return folder / "results"


def test_records_carry_evidence_that_reproduces_their_metrics(twins):
    from benchmark.evidence import Evidence

    store = ResultStore(twins, "t")
    for rec in store.latest().values():
        evidence = Evidence.load(store.dir / rec["cell_id"] / "evidence.npz")
        assert evidence.image_auroc() == rec["metrics"]["image_auroc"]
        assert evidence.dice(0.5) == rec["metrics"]["dice"]
        assert evidence.accuracy(0.5) == rec["metrics"]["image_accuracy"]
        assert len(evidence.examples["maps"]) == 2 and evidence.pixel_roc is not None


def test_compare_marks_no_difference_between_twins(twins, capsys):
    assert main(["compare", "t", "--results-dir", str(twins), "--baseline", "winclip", "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    frame = pd.read_csv(twins / "t" / "compare" / "image_auroc.csv")
    twin = frame[frame["entry"] == "winclip_twin"]
    assert (twin["p"] == 1.0).all() and not twin["significant"].any() and (twin["difference"].abs() < 1e-12).all()
    tested = frame[frame["method"] != frame["reference"]]
    assert (tested["test"] == "permutation").all()  # 5 + 5 test images: no normal approximation
    table = "".join(line for line in out.splitlines() if line.startswith("|"))
    assert table.count("(perm.)") == len(tested) and "(perm.) a paired permutation test of the AUROCs" in out
    assert (frame["ci_low"] <= frame["mean"]).all() and (frame["mean"] <= frame["ci_high"]).all()
    assert "(ref.)" in out and "Holm" in out and "Monte Carlo error" in out
    assert (frame["mc_error"] > 0).all()  # 10 test images: 200 resamples leave a visible error
    for row in frame.itertuples():  # every interval printed to the digits its error supports, no more
        assert f"{row.mean * 100:.2f} {interval_text(row.ci_low, row.ci_high, row.mc_error)}" in out
    for suffix in ("md", "tex", "csv"):
        assert (twins / "t" / "compare" / f"image_auroc.{suffix}").is_file()
    # 3 methods on 2 datasets: no rank test to draw, and the output says why
    assert not list((twins / "t" / "compare").glob("cd_image_auroc_*"))
    assert "No rank test across datasets (Friedman/Nemenyi, critical-difference diagram) for few-normal-shot, K=2 " \
           "(2 datasets): it needs at least 5 datasets to separate methods." in out  # fmt: skip
    assert main(["compare", "t", "--results-dir", str(twins), "--metric", "dice", "--resamples", "200"]) == 0


def test_tables_ci(twins, capsys):
    assert main(["tables", "t", "--results-dir", str(twins), "--ci", "--metrics", "image_auroc,dice"]) == 0
    out = capsys.readouterr().out
    assert "95% confidence interval" in out and " [" in out
    assert main(["tables", "t", "--results-dir", str(twins), "--ci", "--format", "latex"]) == 0
    assert r"\scriptsize [" in capsys.readouterr().out


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.headings = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])

    def handle_data(self, data):
        if self.lasttag in ("h2", "h3"):
            self.headings.append(data)


def test_report_is_one_self_contained_page(twins, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", "t", "--results-dir", str(twins), "--out", str(out), "--resamples", "200"]) == 0
    assert "logged to MLflow run 'report: t, 12 finished cells'" in capsys.readouterr().out
    page = _Images()
    page.feed(out.read_text())
    assert page.sources and all(s.startswith("data:image/png;base64,") for s in page.sources)
    headings = {"Results", "Which differences are real", "Curves", "Efficiency", "Provenance of every number"}
    assert headings <= set(page.headings)
    assert "Random-init backbones" in out.read_text()
    from benchmark.reports.compare import load_entries
    from benchmark.reports.report import curve_figures

    entries = load_entries(twins, "t")
    fig = curve_figures(entries)[f"curves_{entries[0].group}_{entries[0].dataset}"]
    mine = [e for e in entries if (e.group, e.dataset) == (entries[0].group, entries[0].dataset)]
    legends = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert legends == [
        f"{e.name} (AUROC {np.mean([r['metrics']['pixel_auroc'] for r in e.records]):.3f})" for e in mine
    ]  # the pixel ROC's AUROC: the mean over seeds, as the image ROC's
    client = MlflowClient(f"sqlite:///{twins / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    # the analysis is a run of its own, named for what it covers; the run of the grid's invocation is left as it was
    (parent,) = [r for r in runs if r.data.tags.get("analysis") == "report"]
    assert parent.info.run_name == "report: t, 12 finished cells" and parent.info.status == "FINISHED"
    grid = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and "analysis" not in r.data.tags]
    assert len(grid) == 1 and not client.list_artifacts(grid[0].info.run_id, "report")
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/report.html" in logged and any(p.startswith("report/curves_") for p in logged)
    assert "report/efficiency.png" in logged  # accuracy against time
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:  # where a browser is installed, it renders the page
        shot = tmp_path / "shot.png"
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
        subprocess.run(
            [chromium, *flags, f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
             "--window-size=1200,2000", out.as_uri()],
            capture_output=True, timeout=120,
        )  # fmt: skip
        assert shot.stat().st_size > 10_000
