"""Comparisons from the per-image evidence of an experiment's cells: confidence intervals, paired tests
against a reference method with Holm's correction, and Friedman/Nemenyi rank tests across datasets.

An *entry* is one table row (a method variant in a setting) on one dataset: the cells of its seeds, whose
evidence is aligned image by image. Two entries of a setting on a dataset are compared on the same images.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from benchmark import stats
from benchmark.errors import BenchmarkError
from benchmark.evidence import Evidence
from benchmark.metrics import METRICS
from benchmark.reports.tables import ROW_KEYS, interval_text, mc_note, row_key, setting_label
from benchmark.store import ResultStore

TESTED = ("image_auroc", "image_accuracy", "dice")
# Resamples and permutations: with Holm over m tests no adjusted p falls below m times the smallest p a test
# can give, 1 / (B + 1) by permutation and 2 / (B + 1) by the two-sided paired bootstrap; at 4,000, Holm over
# up to 100 tests can still reach p < 0.05 (200 permutation tests); the endpoints' Monte Carlo error is half
# that of 1,000 resamples.
DEFAULT_RESAMPLES = 4000


@dataclass
class Entry:
    row: tuple  # the table row's key (``ROW_KEYS``)
    name: str  # method variant
    method: str  # the protocol's method entry
    group: str  # setting label
    dataset: str
    evidence: list[Evidence]  # one per seed, images in one order
    thresholds: list[dict[str, float]]  # per seed: the Dice and accuracy thresholds it used
    records: list[dict] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        return self.evidence[0].labels

    def statistic(self, metric: str):
        """Indices of test images -> the mean over seeds of ``metric`` on those images."""
        key = {"dice": "dice", "image_accuracy": "accuracy"}.get(metric, "dice")

        def value(idx: np.ndarray) -> float:
            pairs = zip(self.evidence, self.thresholds, strict=True)
            return float(np.mean([e.metric(metric, t[key], idx) for e, t in pairs]))

        return value

    def value(self, metric: str) -> float:
        return self.statistic(metric)(np.arange(len(self.labels)))

    def aligned_to(self, other: Entry) -> Entry:
        """This entry with its images in ``other``'s order (the same test set is required)."""
        if self.evidence[0].keys.tolist() == other.evidence[0].keys.tolist():
            return self
        why = (
            f"'{self.name}' and '{other.name}' on '{self.dataset}' were tested on different images; "
            "they cannot be compared image by image"
        )
        return Entry(
            self.row, self.name, self.method, self.group, self.dataset,
            [aligned(e, other.evidence[0], why) for e in self.evidence], self.thresholds, self.records,
        )  # fmt: skip


def aligned(e: Evidence, reference: Evidence, why: str) -> Evidence:
    """``e`` with its images in ``reference``'s order; ``why`` is the error when the image sets differ."""
    if e.keys.tolist() == reference.keys.tolist():
        return e
    where = {k: i for i, k in enumerate(e.keys.tolist())}
    if set(where) != set(reference.keys.tolist()):
        raise BenchmarkError(why)
    order = np.array([where[k] for k in reference.keys.tolist()])
    return Evidence(
        e.keys[order], e.names[order], e.scores[order], e.labels[order], e.thresholds,
        e.counts[order] if e.counts.size else e.counts, e.examples, e.pixel_roc,
    )  # fmt: skip


def load_entries(results_dir: str | Path, experiment: str) -> list[Entry]:
    """Every (row, dataset) of an experiment's finished cells, with their seeds' evidence aligned."""
    store = ResultStore(results_dir, experiment)
    finished = [r for r in store.latest().values() if r["status"] == "finished"]
    if not finished:
        raise BenchmarkError(f"{store.path}: no finished cells for experiment '{experiment}'")
    groups: dict[tuple, list[dict]] = {}
    for rec in finished:
        row = row_key({**rec, "plugin": rec.get("plugin", rec.get("method")), "shots": rec.get("shots") or 0})
        groups.setdefault((row, rec["dataset"]), []).append(rec)
    entries = []
    for (row, dataset), records in groups.items():
        records.sort(key=lambda r: r["seed"])
        evidence = []
        for rec in records:
            path = store.dir / rec["cell_id"] / "evidence.npz"
            if not path.is_file():
                raise BenchmarkError(
                    f"{path}: missing (the cell was recorded before per-image evidence existed); rerun the cell"
                )
            evidence.append(Evidence.load(path))
        first = evidence[0]
        later = zip(evidence[1:], records[1:], strict=True)
        evidence = [first] + [
            aligned(e, first, f"cell '{rec['cell_id']}' was tested on other images than its row's first seed")
            for e, rec in later
        ]
        thresholds = [
            {
                "dice": float(rec["params"].get("threshold_dice", 0.5)),
                "accuracy": float(rec["params"].get("threshold_accuracy", 0.5)),
            }
            for rec in records
        ]
        key = dict(zip(ROW_KEYS, row, strict=True))
        name = key["variant"] or key["method"]
        group = setting_label(key["setting"], int(key["shots"] or 0))
        entries.append(Entry(row, name, key["method"], group, dataset, evidence, thresholds, records))
    methods_of: dict[str, set[str]] = {}
    for e in entries:
        methods_of.setdefault(e.name, set()).add(e.method)
    for e in entries:  # two method entries of one variant (an alias with the same switches): name both
        if len(methods_of[e.name]) > 1:
            e.name = f"{e.name} [{e.method}]"
    return entries


def pair_test(a: Entry, b: Entry, metric: str, n_resamples: int, seed: int) -> stats.PairedTest:
    """``a`` minus ``b`` on the same images: for image AUROC a permutation test on small test sets, else
    DeLong's test (``stats.auroc_test``); a paired bootstrap otherwise."""
    b = b.aligned_to(a)
    if metric == "image_auroc":
        scores = _seed_scores(a, len(b.evidence)), _seed_scores(b, len(a.evidence))
        return stats.auroc_test(*scores, a.labels, n_resamples, seed)
    return stats.paired_bootstrap(a.statistic(metric), b.statistic(metric), a.labels, n_resamples, seed)


def _seed_scores(e: Entry, seeds: int) -> list[np.ndarray]:
    """An entry's per-seed image scores; a seed-free entry's one run stands for ``seeds`` seeds (each would
    have given it), so that it pairs seed by seed with an entry that ran them."""
    scores = [ev.scores for ev in e.evidence]
    free = len(scores) == 1 and bool(e.records) and all(r.get("seed_free") for r in e.records)
    return scores * seeds if free else scores


def _better(metric: str) -> bool:
    return METRICS[metric].higher_is_better if metric in METRICS else True


@dataclass
class Comparison:
    metric: str
    frame: pd.DataFrame  # one row per entry: CI, reference, difference, p, adjusted p
    ranks: dict[str, stats.RankTest]  # per setting group with enough methods and datasets
    alpha: float
    baseline: str | None
    too_few: dict[str, int] = field(default_factory=dict)  # setting groups not rank-tested: their dataset count


def compare(
    entries: list[Entry],
    metric: str,
    baseline: str | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    alpha: float = 0.05,
) -> Comparison:
    """Per entry: mean and 95% CI; the test against its reference (``baseline``'s entry of the same setting
    and dataset, else the best mean there), Holm-adjusted over every test of the comparison; per setting, a
    Friedman/Nemenyi rank test across datasets."""
    if metric not in TESTED:
        raise BenchmarkError(f"--metric: '{metric}' has no per-image evidence to resample (one of {', '.join(TESTED)})")
    if metric == "dice":
        entries = [e for e in entries if e.evidence[0].has_masks]
    else:  # image metrics need both classes: segmentation-only sets have none
        entries = [e for e in entries if len(set(np.asarray(e.labels).tolist())) == 2]
    if not entries:
        raise BenchmarkError(f"--metric {metric}: no cell of the experiment has it")
    if baseline is not None and baseline not in {e.method for e in entries}:
        names = sorted({e.method for e in entries})
        raise BenchmarkError(f"--baseline: '{baseline}' is not a method of the experiment ({', '.join(names)})")
    better = _better(metric)
    rows = []
    cells: dict[tuple[str, str], list[Entry]] = {}
    for e in entries:
        cells.setdefault((e.group, e.dataset), []).append(e)
    for (group, dataset), part in cells.items():
        values = {id(e): e.value(metric) for e in part}
        if baseline is not None:
            reference = next((e for e in part if e.method == baseline), None)
        else:
            reference = max(part, key=lambda e: values[id(e)] if better else -values[id(e)])
        for e in part:
            ci = stats.bootstrap_ci(e.statistic(metric), e.labels, n_resamples, seed)
            row = {
                "group": group, "dataset": dataset, "method": e.name, "entry": e.method, "seeds": len(e.evidence),
                "images": len(e.labels), "mean": ci.value, "ci_low": ci.low, "ci_high": ci.high,
                "mc_error": ci.mc_error,
                "reference": reference.name if reference is not None else "", "difference": math.nan,
                "p": math.nan, "test": "",
            }  # fmt: skip
            if reference is not None and e is not reference:
                test = pair_test(e, reference, metric, n_resamples, seed)
                row.update(difference=test.difference, p=test.p, test=test.test)
            rows.append(row)
    frame = pd.DataFrame(rows)
    tested = frame["p"].notna()
    frame["p_holm"] = math.nan
    frame.loc[tested, "p_holm"] = stats.holm(frame.loc[tested, "p"].to_numpy())
    frame["significant"] = frame["p_holm"] < alpha
    ranks, too_few = rank_tests(frame, better, alpha)
    return Comparison(metric, frame, ranks, alpha, baseline, too_few)


# Friedman/Nemenyi across fewer datasets separates almost nothing: Nemenyi's critical difference grows as
# 1 / sqrt(datasets) (11 methods on 3 datasets: 8.7 of the 10 ranks there are), and Friedman's chi-square is an
# approximation that wants many blocks (Demsar 2006, sec. 3.2.2); below this count the tables say so instead.
MIN_RANK_DATASETS = 5


def rank_tests(frame: pd.DataFrame, better: bool, alpha: float) -> tuple[dict[str, stats.RankTest], dict[str, int]]:
    """Friedman/Nemenyi per setting group over the datasets every one of its methods ran (>= 3 methods, >=
    ``MIN_RANK_DATASETS`` datasets); and the groups of >= 3 methods left untested for too few datasets, with
    their dataset counts."""
    out, too_few = {}, {}
    for group, part in frame.groupby("group", sort=False):
        table = part.pivot_table(index="dataset", columns="method", values="mean").dropna(axis=0, how="any")
        if table.shape[1] < 3:
            continue
        if table.shape[0] < MIN_RANK_DATASETS:
            too_few[str(group)] = table.shape[0]
            continue
        test = stats.friedman_nemenyi(table, better, alpha)
        if np.isfinite(test.p):  # not when every method ties on every dataset
            out[str(group)] = test
    return out, too_few


def too_few_text(c: Comparison) -> str:
    """The sentence on the setting groups not rank-tested for too few datasets ("" when none)."""
    if not c.too_few:
        return ""
    groups = "; ".join(f"{g} ({n} dataset{'s' if n != 1 else ''})" for g, n in c.too_few.items())
    return (
        f"No rank test across datasets (Friedman/Nemenyi, critical-difference diagram) for {groups}: it needs at "
        f"least {MIN_RANK_DATASETS} datasets to separate methods."
    )


def _pct(x: float) -> str:
    return "--" if not np.isfinite(x) else f"{x * 100:.2f}"


def cell_text(row, latex: bool = False) -> str:
    """``mean [low, high]`` in percent (the interval to the digits its Monte Carlo error supports), with a
    dagger when the difference from the reference is significant."""
    text = f"{_pct(row['mean'])} {interval_text(row['ci_low'], row['ci_high'], row['mc_error'])}"
    if row["method"] == row["reference"]:
        text += " (ref.)"
    else:
        text += (r"$^\dagger$" if latex else " †") if row["significant"] else ""
        text += f" ({TESTS[row['test']][0]})" if row["test"] else ""
    return text


TESTS = {  # a PairedTest's name: its tag in a table cell, and the caption's words for it
    "DeLong": ("DeLong", "DeLong's test of the AUROCs (DeLong et al. 1988)"),
    "permutation": (
        "perm.",
        f"a paired permutation test of the AUROCs on normalised ranks (Venkatraman & Begg 1996), used where a "
        f"class has fewer than {stats.SMALL_CLASS} test images and both entries have as many seeds (else DeLong)",
    ),
    "paired bootstrap": ("boot.", "a paired bootstrap over test images"),
}


def caption(c: Comparison, experiment: str, n_resamples: int) -> str:
    reference = f"the baseline {c.baseline}" if c.baseline else "the best mean of its setting and dataset"
    used = [t for t in TESTS if (c.frame["test"] == t).any()]
    tests = "; ".join(f"({TESTS[t][0]}) {TESTS[t][1]}" for t in used)
    return (
        f"{experiment}: {c.metric} in %, mean over seeds with its 95% confidence interval (BCa bootstrap over "
        f"test images, stratified by label, {n_resamples} resamples). {mc_note(c.frame['mc_error'].max(), n_resamples)}"
        f" (ref.): the reference, {reference}; "
        f"†: differs from the reference, p < {c.alpha} after Holm's correction over the "
        f"{int(c.frame['p'].notna().sum())} tests of this table, by the test each cell names"
        + (f": {tests}." if tests else ".")
        + " Seeds: each method's number is its seeds' mean; a resample draws the same images for every seed."
    )


def render(c: Comparison, experiment: str, fmt: str, n_resamples: int) -> str:
    """The comparison as a table: rows (setting, method), columns datasets."""
    frame = c.frame
    if fmt == "csv":
        return frame.to_csv(index=False)
    latex = fmt == "latex"
    datasets = list(dict.fromkeys(frame["dataset"]))
    body = []
    for (group, method), part in frame.groupby(["group", "method"], sort=False):
        cells = {r["dataset"]: cell_text(r, latex) for _, r in part.iterrows()}
        body.append([group, method, *(cells.get(d, "--") for d in datasets)])
    text = caption(c, experiment, n_resamples)
    if not latex:
        table = tabulate(body, headers=["Setting", "Method", *datasets], tablefmt="github", disable_numparse=True)
        tests = "\n".join(
            f"- {name}: Friedman chi2 = {r.statistic:.2f}, p = {r.p:.3g} over {r.datasets} datasets; mean ranks "
            + ", ".join(f"{m} {v:.2f}" for m, v in sorted(r.ranks.items(), key=lambda x: x[1]))
            + f"; Nemenyi critical difference {r.critical_difference:.2f}"
            for name, r in c.ranks.items()
        )
        out = f"{text}\n\n{table}\n" + (f"\nRank tests across datasets:\n{tests}\n" if tests else "")
        return out + (f"\n{too_few_text(c)}\n" if c.too_few else "")
    from benchmark.reports.tables import _latex_escape

    dagger = r"$^\dagger$"
    lines = [
        r"\begin{table}[t]", r"\centering", rf"\caption{{{_latex_escape(text).replace('†', dagger)}}}",
        r"\begin{tabular}{ll" + "c" * len(datasets) + "}", r"\toprule",
        "Setting & Method & " + " & ".join(_latex_escape(d) for d in datasets) + r" \\", r"\midrule",
    ]  # fmt: skip
    for row in body:
        lines.append(" & ".join(_latex_escape(x) if "dagger" not in x else x for x in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def cd_figure(test: stats.RankTest, title: str):
    """A critical-difference diagram (scikit-posthocs): methods at their mean rank, bars joining methods
    Nemenyi's test does not separate."""
    import scikit_posthocs as sp

    from benchmark.reports.figures import pyplot

    plt = pyplot()

    longest = max(len(m) for m in test.ranks) + 7  # a label: "name (rank)", at 8 pt ~ 0.075 in a character
    side = 0.075 * longest
    width, height = 3.5 + 2 * side, 1.6 + 0.3 * len(test.ranks)
    fig, ax = plt.subplots(figsize=(width, height))
    fig.subplots_adjust(left=side / width, right=1 - side / width, top=1 - 0.9 / height)
    sp.critical_difference_diagram(pd.Series(test.ranks), test.pairwise, ax=ax, label_props={"fontsize": 8})
    # on the figure, wrapped to its width (about 0.075 in a character at 8 pt): a title wider than the axes is cut
    text = f"{title}; Friedman p = {test.p:.3g} over {test.datasets} datasets"
    text += f"; Nemenyi CD = {test.critical_difference:.2f}"
    fig.suptitle(textwrap.fill(text, int(width / 0.075)), fontsize=8)
    return fig


@dataclass
class TableIntervals:
    """For ``tables --ci``: each (row key, dataset, metric)'s interval, and the cells whose best mean is
    significantly better than the second of its setting (Holm over the table's tests)."""

    intervals: dict[tuple, stats.Interval]
    daggers: set[tuple]
    tests: int
    alpha: float
    resamples: int
    used: tuple[str, ...] = ()  # the names of the tests that made the daggers (``PairedTest.test``)

    def test_names(self) -> str:
        """The tests used, in the caption's words."""
        return "; ".join(TESTS[t][1] for t in self.used) or "no test"


def table_intervals(
    entries: list[Entry],
    metrics: tuple[str, ...],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    alpha: float = 0.05,
) -> TableIntervals:
    intervals: dict[tuple, stats.Interval] = {}
    candidates, pvalues, used = [], [], []
    for metric in (m for m in metrics if m in TESTED):
        usable = [e for e in entries if metric != "dice" or e.evidence[0].has_masks]
        cells: dict[tuple[str, str], list[Entry]] = {}
        for e in usable:
            intervals[(e.row, e.dataset, metric)] = stats.bootstrap_ci(e.statistic(metric), e.labels, resamples, seed)
            cells.setdefault((e.group, e.dataset), []).append(e)
        for part in cells.values():
            ranked = sorted(part, key=lambda e: intervals[(e.row, e.dataset, metric)].value, reverse=_better(metric))
            if len(ranked) < 2:
                continue
            test = pair_test(ranked[0], ranked[1], metric, resamples, seed)
            candidates.append((ranked[0].row, ranked[0].dataset, metric))
            pvalues.append(test.p)
            used.append(test.test)
    adjusted = stats.holm(pvalues)
    daggers = {c for c, p in zip(candidates, adjusted, strict=True) if p < alpha}
    return TableIntervals(intervals, daggers, len(pvalues), alpha, resamples, tuple(t for t in TESTS if t in used))
