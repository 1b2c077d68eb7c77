"""Paper-style tables from the results store: LaTeX (booktabs), Markdown and CSV.

Rows are (method variant, setting, K); columns are datasets as groups with one sub-column per metric
(AC/AS as MVFA Table 1, or Dice/Acc as MedSAD-CLIP Table 2). A cell is mean ± std over seeds, in percent.
In each column the best mean is bold and the second underlined, decided on unrounded means and the
metric's direction; tied means share a mark. ``published=True`` adds, under each row, the papers' number
and our difference, where the row ran on the backbone the paper states; a row on another backbone is labelled
with its own and the caption names the paper's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from tabulate import tabulate

from benchmark.backbones.identity import of_label
from benchmark.method import METHODS
from benchmark.metrics import METRICS
from benchmark.reports.published import (
    AGGREGATES,
    AGGREGATES_OF,
    average_sets,
    load_published,
    lookup,
    other_backbones,
)

HEADERS = {
    "image_auroc": "AC",
    "pixel_auroc": "AS",
    "dice": "Dice",
    "image_accuracy": "Acc",
    "dice_oracle": "Dice (oracle)",
    "dice_per_image": "DSC",
    "nsd": "NSD",
    "pixel_ece": "ECE",
    "uncertainty_mean": "Unc.",
}
STYLES = {
    "mvfa": ("image_auroc", "pixel_auroc"),
    "medsad": ("dice", "image_accuracy"),
    "segmentation": ("dice_per_image", "nsd"),  # MedCLIPSeg's DSC and NSD; the default without image metrics
}
SETTING_NAMES = {
    "zero_shot_loo": "zero-shot LOO",
    "few_shot": "few-shot",
    "few_normal": "few-normal-shot",
    "supervised": "supervised",
    "full_normal": "full-normal",
    "data_fraction": "data fraction",
    "domain_generalization": "domain generalisation",
}


# a row each (evaluation_size: where DSC and NSD were scored; records before it: "model")
ROW_KEYS = [
    "method",
    "plugin",
    "variant",
    "published_as",
    "setting",
    "shots",
    "backbone",
    "threshold",
    "evaluation_size",
    "fit_source",
]


def row_key(values: dict) -> tuple:
    """A table row's identity from its ``ROW_KEYS`` values, as a record or a grouped frame holds them (missing
    values, None or NaN, become "")."""

    def norm(key: str, value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return {"evaluation_size": "model", "fit_source": "retrain"}.get(key, "")
        if key == "shots":
            return int(value)
        return float(value) if key == "threshold" else str(value)

    return tuple(norm(k, values.get(k)) for k in ROW_KEYS)


def published_name(plugin: str, published_as: str | None = None) -> str:
    """The name under which the papers print a row's numbers: the record's ``published_as`` ("" for a variant
    no paper reports); for records written before it existed, the registered method's published name."""
    if isinstance(published_as, str):
        return published_as
    return METHODS.get(plugin).published_name if plugin in METHODS else plugin


ATTEMPT_KEYS = ["method", "setting", "shots", "backbone", "dataset"]  # the seeds of one grid row and dataset


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (ddof 1; 0 for one value) over the seeds that gave a number (``n``), the seeds the grid
    ran for that row and dataset, failed cells included (``of``), and whether every cell of it is seed-free
    (``seed_free``: run once, as no seed changes it), per row key, dataset and metric."""
    keys = [*ROW_KEYS, "dataset", "metric"]
    frame = frame.assign(shots=frame["shots"].fillna(0).astype(int), seed_free=frame["seed_free"].eq(True))
    attempts = frame.groupby(ATTEMPT_KEYS, dropna=False)["seed"].nunique().rename("of").reset_index()
    grouped = frame[frame["metric"].notna()].groupby(keys, dropna=False)
    out = grouped["value"].agg(mean="mean", std=lambda v: float(v.std(ddof=1)) if v.count() > 1 else 0.0, n="count")
    out["seed_free"] = grouped["seed_free"].all()
    out = out.reset_index().merge(attempts, on=ATTEMPT_KEYS, how="left")
    out["of"] = out[["of", "n"]].max(axis=1).astype(int)
    return out


def setting_label(setting: str, shots: int) -> str:
    if setting == "data_fraction":
        return f"{SETTING_NAMES[setting]} {shots} %"
    return f"{SETTING_NAMES.get(setting, setting)}" + (f", K={shots}" if shots else "")


Value = tuple[float, float, int, int]  # mean, std, seeds with a number, seeds run


@dataclass
class Row:
    """A table row: ours (``kind`` "ours"), or the papers' numbers and our difference under it."""

    name: str  # the method variant
    group: str  # its setting (and K): rows are grouped, and ranked, by it
    values: dict[tuple[str, str], Value]
    kind: str = "ours"  # ours | published | difference
    source: str = ""  # published: "mvfa Table 2"
    key: tuple = ()  # ``row_key``: where its confidence intervals are found
    seed_free: bool = False  # every cell ran once, as no seed changes its result: no spread to show
    other_backbone: str = ""  # ours, on another backbone than the published numbers of its method: theirs

    @property
    def retrain(self) -> bool:
        """Whether the row's models were trained here, not a given checkpoint evaluated (ranked apart)."""
        return not self.key or self.key[ROW_KEYS.index("fit_source")] == "retrain"

    def label(self) -> str:
        """The full label (Markdown): ``name (setting)``, the details a variant's name ends with in the same
        parenthesis (``MVFA (official; authors' checkpoint; few-shot, K=2)``); published and difference rows say
        what they are."""
        if self.kind == "published":
            return f"published ({self.source})"
        if self.kind == "difference":
            return "difference"
        base, details, mark = self.name, [self.group], ""
        if base.endswith("]") and " [" in base:  # a mark (``[same result as ...]``) stays last
            base, _, mark = base.rpartition(" [")
            mark = f" [{mark}"
        while base.endswith(")") and " (" in base:
            base, _, detail = base.rpartition(" (")
            details.insert(0, detail[:-1])
        return f"{base} ({'; '.join(details)}){mark}"


def repeated(frame: pd.DataFrame) -> dict[tuple, str]:
    """Rows (``row_key``) every cell of which was recorded from another setting's cell (``same_result_as``: the
    method reads nothing that tells the two apart), with that setting's label."""
    if "same_result_as" not in frame:
        return {}
    out = {}
    for values, part in frame[frame["status"] == "finished"].groupby(ROW_KEYS, dropna=False):
        sources = [x for x in part["same_result_as"] if isinstance(x, dict)]
        if len(sources) < len(part):
            continue
        key = row_key(dict(zip(ROW_KEYS, values, strict=True)))
        own = setting_label(key[ROW_KEYS.index("setting")], key[ROW_KEYS.index("shots")] or 0)
        labels = {setting_label(x["setting"], int(x["shots"] or 0)) for x in sources}
        labels = {x.get("method", "") for x in sources} if labels == {own} else labels  # another entry alike
        if len(labels) == 1:
            out[key] = labels.pop()
    return out


def build(frame: pd.DataFrame, metrics: tuple[str, ...], published: bool = False):
    """Rows (``Row``) grouped by setting, and the (dataset, metric) columns."""
    summary = summarize(frame)
    summary = summary[summary["metric"].isin(metrics)]
    datasets = list(dict.fromkeys(summary["dataset"]))
    columns = [
        (d, m)
        for d in datasets
        for m in metrics
        if not summary[(summary["dataset"] == d) & (summary["metric"] == m)].empty
    ]
    table_rows: list[Row] = []
    averaged: set[tuple[str, str]] = set()  # MedCLIPSeg's averages over datasets, beside its README's
    pub = load_published() if published else None
    order = {name: i for i, name in enumerate(SETTING_NAMES)}
    mixed = summary["evaluation_size"].nunique() > 1  # rows scored at both sizes: say which is which
    copies = repeated(frame)
    summary = summary.assign(_order=summary["setting"].map(order)).sort_values(["_order", "shots", "method", "variant"])
    for values_key, part in summary.groupby(ROW_KEYS, dropna=False, sort=False):
        key = dict(zip(ROW_KEYS, values_key, strict=True))
        values = {
            (r["dataset"], r["metric"]): (r["mean"], r["std"], int(r["n"]), int(r["of"])) for _, r in part.iterrows()
        }
        name = key["variant"] if isinstance(key["variant"], str) and key["variant"] else key["method"]
        if mixed and key["evaluation_size"] == "native":
            name += " [DSC, NSD at native size]"
        if row_key(key) in copies:
            name += f" [same result as {copies[row_key(key)]}]"
        group = setting_label(key["setting"], int(key["shots"]))
        table_rows.append(Row(name, group, values, key=row_key(key), seed_free=bool(part["seed_free"].all())))
        if pub is None:
            continue
        for agg in AGGREGATES_OF.get(key["setting"], ()):
            for m in metrics:
                means = {d: (v[0], v[2]) for (d, mm), v in values.items() if mm == m and v[2] > 0}
                if (found := average_sets(means, agg)) is not None:
                    values[(agg, m)] = (found[0], float("nan"), found[1], found[1])
                    averaged.add((agg, m))
        paper_name = published_name(key["plugin"], key["published_as"])
        if not paper_name:
            continue
        theirs = other_backbones(pub, paper_name, key["setting"], int(key["shots"]), key["backbone"])
        if theirs:
            row = table_rows[-1]
            row.name, row.other_backbone = f"{name} on {of_label(key['backbone'])}", theirs
            continue
        found, delta, sources = {}, {}, set()
        for d, m in [*columns, *sorted(averaged, key=lambda c: AGGREGATES.index(c[0]))]:
            hit = lookup(pub, paper_name, key["setting"], int(key["shots"]), d, m, key["threshold"], key["backbone"])
            if hit is not None:
                found[(d, m)] = (hit[0] / 100.0, 0.0, 0, 0)
                sources.add(hit[1])
                if (d, m) in values:
                    delta[(d, m)] = (values[(d, m)][0] - hit[0] / 100.0, 0.0, 0, 0)
        if found:
            source = "; ".join(sorted(sources))
            table_rows.append(Row(name, group, found, "published", source))
            table_rows.append(Row(name, group, delta, "difference", source))
    return table_rows, [*columns, *sorted(averaged, key=lambda c: (AGGREGATES.index(c[0]), metrics.index(c[1])))]


def has_published(rows: list[Row]) -> bool:
    """Whether a published number sits beside a row, or a row is labelled as run on another backbone."""
    return any(r.kind == "published" or r.other_backbone for r in rows)


def backbone_note(rows: list[Row]) -> str:
    """The caption's sentence on rows not matched to published numbers because the paper used another backbone."""
    other = [f"{r.name} ({r.group}; the paper's: {r.other_backbone})" for r in rows if r.other_backbone]
    if not other:
        return ""
    return (
        " Not beside published numbers, as the papers ran them on another backbone (a backbone difference is no "
        f"reproduction gap): {'; '.join(other)}."
    )


def _ranks(rows: list[Row], columns) -> dict[tuple, dict[int, int]]:
    """Per column, rank 0 (best) and 1 (second) of our rows trained here (not an evaluated checkpoint), within each
    setting group; tied means share a rank; a group whose rows all tie (or that has one row) is not marked."""
    ranks: dict[tuple, dict[int, int]] = {col: {} for col in columns}
    groups = dict.fromkeys(r.group for r in rows)
    for col in columns:
        better = METRICS[col[1]].higher_is_better if col[1] in METRICS else True
        for group in groups:
            scored = {
                i: r.values[col][0]
                for i, r in enumerate(rows)
                if r.kind == "ours" and r.retrain and r.group == group and col in r.values
                and not math.isnan(r.values[col][0])
            }  # fmt: skip
            distinct = sorted(set(scored.values()), reverse=better)
            if len(distinct) < 2:
                continue
            ranks[col].update({i: distinct.index(v) for i, v in scored.items() if v in distinct[:2]})
    return ranks


def _fmt(value: Value | None, signed: bool = False, std: bool = True, seed_free: bool = False) -> str:
    """``mean ± std`` in percent (``mean (deterministic)`` for a seed-free row: no seed changes it); ``(n/m
    seeds)`` when only n of the m seeds run gave a number."""
    if value is None:
        return "--"
    mean, sd, n, of = value
    if math.isnan(mean):
        return f"-- ({n}/{of} seeds)" if n < of else "--"
    text = f"{mean * 100:+.2f}" if signed else f"{mean * 100:.2f}"
    if std and seed_free:
        text = f"{text} (deterministic)"
    elif std and n > 1 and not math.isnan(sd):
        text = f"{text} ± {sd * 100:.2f}"
    return f"{text} ({n}/{of} seeds)" if n < of else text


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"), ("±", r"$\pm$")):
        text = text.replace(a, b)
    return text


def _latex_number(value: Value | None, signed: bool, std: bool, seed_free: bool = False) -> str:
    """A number cell: true minus signs, the std small after a ± (``std``; "det." for a seed-free row), the
    seed count small."""
    text = _fmt(value, signed, std=False)
    if value is None or math.isnan(value[0]):
        return text
    number, _, seeds = text.partition(" (")
    number = number.replace("-", "$-$").replace("+", "$+$")
    if std and seed_free:
        number += r"{\scriptsize ~det.}"
    elif std and value[2] > 1:
        number += rf"{{\scriptsize $\pm${value[1] * 100:.2f}}}"
    return number + (rf" {{\scriptsize ({seeds}}}" if seeds else "")


def short_names(rows: list[Row], width: int = 16) -> dict[str, str]:
    """Row labels short enough for a page: a name longer than ``width`` whose details are in parentheses
    becomes its base name with a numbered mark (``MedSAD-CLIP$^{1}$``); the legend spells each mark out."""
    short: dict[str, str] = {}
    for name in dict.fromkeys(r.name for r in rows):
        base, _, detail = name.partition(" (")
        if len(name) <= width or not detail:
            short[name] = _latex_escape(name)
        else:
            short[name] = rf"{_latex_escape(base)}$^{{{sum(v.endswith('}$') for v in short.values()) + 1}}}$"
    return short


def legend(short: dict[str, str]) -> str:
    marks = [(v.rpartition("$^{")[2].rstrip("}$"), k) for k, v in short.items() if v.endswith("}$")]
    return " ".join(f"{mark}: {_latex_escape(name)}." for mark, name in marks)


def latex_head(columns: list[tuple[str, str]]) -> list[str]:
    """The tabular's opening and header: datasets spanning their metric columns, rules under each, metric
    names (``HEADERS``)."""
    datasets = list(dict.fromkeys(d for d, _ in columns))
    spans = [(d, sum(1 for c in columns if c[0] == d)) for d in datasets]
    rules, start = [], 2
    for _, n in spans:
        rules.append(rf"\cmidrule(lr){{{start}-{start + n - 1}}}")
        start += n
    return [
        r"\begin{tabular}{l" + "".join(" " + "c" * n for _, n in spans) + "}",
        r"\toprule",
        " & " + " & ".join(rf"\multicolumn{{{n}}}{{c}}{{{_latex_escape(d)}}}" for d, n in spans) + r" \\",
        " ".join(rules),
        "Method & " + " & ".join(HEADERS.get(m, _latex_escape(m)) for _, m in columns) + r" \\",
    ]


def render_latex(
    frame: pd.DataFrame,
    metrics: tuple[str, ...],
    caption: str,
    label: str,
    published: bool = False,
    std: bool = False,
    ci=None,
) -> str:
    """A booktabs table that fits a landscape page: rows grouped by setting (ranked within it), short row
    labels with a legend in the caption, means only unless ``std``."""
    rows, columns = build(frame, metrics, published)
    ranks = _ranks(rows, columns)
    short = short_names(rows)
    marks = legend(short)
    sources = sorted({r.source for r in rows if r.kind == "published"})
    caption += backbone_note(rows) + (ci_caption(ci) if ci is not None else "")
    text = _latex_escape(caption).replace("†", r"$^\dagger$") + (f" Rows: {marks}" if marks else "")
    text += f" Published rows: {_latex_escape('; '.join(sources))}." if sources else ""
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{text}}}",
        rf"\label{{{label}}}",
        *latex_head(columns),
    ]
    group = None
    for i, row in enumerate(rows):
        if row.group != group:
            group = row.group
            lines.append(r"\midrule")
            lines.append(rf"\multicolumn{{{len(columns) + 1}}}{{l}}{{\emph{{{_latex_escape(group)}}}}} \\")
        cells = []
        for col in columns:
            cell = _latex_number(
                row.values.get(col), row.kind == "difference", std and row.kind == "ours", row.seed_free
            )
            interval, dagger = _interval(ci, row, col)
            cell += (rf"{{\scriptsize{interval}}}" if interval else "") + (r"$^\dagger$" if dagger else "")
            rank = ranks[col].get(i) if row.kind == "ours" else None
            cells.append(rf"\textbf{{{cell}}}" if rank == 0 else rf"\underline{{{cell}}}" if rank == 1 else cell)
        name = short[row.name] if row.kind == "ours" else rf"\quad {row.kind}"
        lines.append(name + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def interval_text(low: float, high: float, mc_error: float) -> str:
    """``[low, high]`` in percent, rounded at the first significant digit of the endpoints' Monte Carlo error
    (two decimals at most, none when the error is a point or more): no digit the resampling does not fix."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "[--, --]"
    error = mc_error * 100
    decimals = 2 if not error > 0 else min(2, max(0, -math.floor(math.log10(error))))
    return f"[{low * 100:.{decimals}f}, {high * 100:.{decimals}f}]"


def mc_note(largest: float, resamples: int) -> str:
    """The caption's sentence on the intervals' Monte Carlo error (``largest``: the table's largest)."""
    return (
        f"Interval endpoints are rounded at the first significant digit of their Monte Carlo error (from the "
        f"bootstrap distribution; at most {largest * 100:.2g} points at {resamples} resamples)."
    )


def _interval(ci, row: Row, col: tuple[str, str]) -> tuple[str, bool]:
    """`` [low, high]`` (percent) of a row's cell when ``ci`` (``TableIntervals``) has it, and its dagger."""
    if ci is None or row.kind != "ours":
        return "", False
    key = (row.key, col[0], col[1])
    found = ci.intervals.get(key)
    text = f" {interval_text(found.low, found.high, found.mc_error)}" if found is not None else ""
    return text, key in ci.daggers


def ci_caption(ci) -> str:
    largest = max((i.mc_error for i in ci.intervals.values()), default=0.0)
    return (
        f" [low, high]: 95% confidence interval (BCa bootstrap over test images, stratified by label; seeds "
        f"averaged). {mc_note(largest, ci.resamples)} †: the best of its setting is better than the second, "
        f"p < {ci.alpha} after Holm's correction over the table's {ci.tests} tests, by {ci.test_names()}."
    )


def render_markdown(
    frame: pd.DataFrame, metrics: tuple[str, ...], caption: str, published: bool = False, ci=None
) -> str:
    """``ci``: ``benchmark.reports.compare.TableIntervals`` adds intervals and daggers."""
    rows, columns = build(frame, metrics, published)
    ranks = _ranks(rows, columns)
    headers = ["Method"] + [f"{d} {HEADERS.get(m, m)}" for d, m in columns]
    body = []
    for i, row in enumerate(rows):
        cells = [row.label() if row.kind == "ours" else "↳ " + row.label()]
        for col in columns:
            text = _fmt(row.values.get(col), signed=row.kind == "difference", seed_free=row.seed_free)
            interval, dagger = _interval(ci, row, col)
            text += interval + (" †" if dagger else "")
            rank = ranks[col].get(i) if row.kind == "ours" else None
            cells.append(f"**{text}**" if rank == 0 else f"<u>{text}</u>" if rank == 1 else text)
        body.append(cells)
    caption += backbone_note(rows) + (ci_caption(ci) if ci is not None else "")
    return f"{caption}\n\n" + tabulate(body, headers=headers, tablefmt="github", disable_numparse=True) + "\n"


def render_csv(frame: pd.DataFrame, published: bool = False) -> str:
    summary = summarize(frame)
    if published:
        pub = load_published()
        values, sources = [], []
        for _, r in summary.iterrows():
            hit = lookup(
                pub,
                published_name(r["plugin"], r["published_as"]),
                r["setting"],
                int(r["shots"]),
                r["dataset"],
                r["metric"],
                r["threshold"],
                r["backbone"],
            )
            values.append(hit[0] / 100.0 if hit else float("nan"))
            sources.append(hit[1] if hit else "")
        summary["published"] = values
        summary["published_source"] = sources
        summary["difference"] = summary["mean"] - summary["published"]
    return summary.to_csv(index=False)


def data_locks_text(rows: pd.DataFrame) -> str:
    """What a caption says of the data locks its rows' copies were checked against (``data_locks``); nothing
    where none was used."""
    locked = rows[rows["data_lock"].notna()] if "data_lock" in rows else rows.iloc[0:0]
    if locked.empty:
        return ""
    named = "; ".join(
        f"{d} by {lock}" for d, lock in sorted(set(zip(locked["dataset"], locked["data_lock"], strict=True)))
    )
    unlocked = sorted(set(rows["dataset"]) - set(locked["dataset"]))
    rest = f"; {', '.join(unlocked)} not locked" if unlocked else ""
    return f" Data as locked (every file's SHA-256 checked before the run): {named}{rest}."


def caption_for(frame: pd.DataFrame, experiment: str, metrics: tuple[str, ...], std: bool = True) -> str:
    names = ", ".join(f"{HEADERS.get(m, m)} = {m}" for m in metrics)
    backbones = sorted(set(frame.loc[frame["metric"].notna(), "backbone"]))
    spread = "mean ± std over seeds" if std else "mean over seeds"
    text = (
        f"{experiment}: {names}, in %, {spread}; best in bold and second underlined within each setting "
        f"(ties share a mark). Backbones: {'; '.join(backbones)}."
    )
    shown = frame.loc[frame["metric"].notna(), "precision"].fillna("fp32")  # records before the policy: fp32
    precisions = sorted(set(shown))
    text += (
        f" Precision: {precisions[0]}."
        if len(precisions) == 1
        else f" Precisions: {', '.join(precisions)} (each row's in its name; benchmark.precision)."
    )
    native = frame.loc[frame["metric"].notna(), "evaluation_size"].eq("native")
    if {"dice_per_image", "nsd"} & set(metrics) and native.any():
        which = "" if native.all() else " in rows marked so (the others at the model's size)"
        text += (
            f" DSC and NSD{which}: at each mask's native size (the binary prediction upsampled nearest-neighbour to"
            " it, as MedCLIPSeg's evaluation); the NSD's 2-pixel tolerance is in those pixels."
        )
    if {"dice_per_image", "nsd"} & set(metrics):
        shown = frame[frame["metric"].isin(("dice_per_image", "nsd"))]["dataset"]
        with_normals = sorted(set(shown) & set(frame.loc[frame["metric"] == "image_auroc", "dataset"]))
        if with_normals:
            text += (
                f" DSC and NSD on {', '.join(with_normals)} (sets with normal test images too): per-image means over"
                " the anomalous test images only (on a normal image an empty prediction would score 100)."
            )
    if "dice_oracle" in metrics:
        text += " Dice (oracle): the best Dice over the threshold sweep, picked on test data; for reference only."
    if std and frame["seed_free"].eq(True).any():
        text += (
            " deterministic (det.): a row whose method depends on no seed in its setting (nothing trained) and whose"
            " data are not sampled per seed; run once, it has no spread over seeds to show."
        )
    if any("random-init" in b for b in backbones):
        text += " Random-init backbones: not comparable with published numbers."
    text += data_locks_text(frame.loc[frame["metric"].notna()])
    summary = summarize(frame)
    if (summary[summary["metric"].isin(metrics)]["n"] < summary[summary["metric"].isin(metrics)]["of"]).any():
        text += (
            " (n/m seeds): the mean of the n seeds that gave a number out of the m run; the other cells failed"
            " (their errors are in results.jsonl)."
        )
    return text


EFFICIENCY_COLUMNS = {  # efficiency figure (benchmark.efficiency) -> header; means over the row's cells
    "trainable_params_M": "Trainable params (M)",
    "params_M": "Params (M)",
    "gflops_per_image": "GFLOPs / image",
    "fit_s": "Fit (s)",
    "model_ms_per_image": "ms / image (model)",
    "ms_per_image": "ms / image (with loading)",
    "images_per_s": "Images / s",
    "peak_memory_mb": "Peak memory (MB)",
}


def efficiency_frame(records: list[dict]) -> pd.DataFrame:
    """Per method variant, setting, K, precision and device: the cells' efficiency figures (means over datasets
    and seeds; parameters as the first cell has them) beside average image and pixel AUROC, as MCMIAD Table 2.
    Records written before efficiency was measured have parameters (and head FLOPs) only."""
    rows = []
    for rec in records:
        if rec.get("status") != "finished":
            continue
        params, eff = rec.get("params", {}), rec.get("efficiency", {})
        trainable = eff.get("trainable_params", params.get("trainable_params", 0))
        rows.append(
            {
                "method": rec.get("variant") or rec["method"],
                "setting": rec["setting"],
                "shots": rec.get("shots") or 0,
                "precision": params.get("precision", "fp32"),
                "device": rec.get("tags", {}).get("device", ""),
                "trainable_params_M": trainable / 1e6,
                "params_M": eff.get("params", float("nan")) / 1e6,
                "head_gflops": params.get("head_flops", float("nan")) / 1e9,
                **{k: eff.get(k, float("nan")) for k in EFFICIENCY_COLUMNS if not k.endswith("params_M")},
                "image_auroc": rec["metrics"].get("image_auroc", float("nan")),
                "pixel_auroc": rec["metrics"].get("pixel_auroc", float("nan")),
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    first = ("trainable_params_M", "params_M", "head_gflops")
    means = [c for c in frame.columns if c not in (*first, "method", "setting", "shots", "precision", "device")]
    out = frame.groupby(["method", "setting", "shots", "precision", "device"], dropna=False).agg(
        **{c: (c, "first") for c in first}, **{c: (c, "mean") for c in means}
    )
    out["average_auroc"] = out[["image_auroc", "pixel_auroc"]].mean(axis=1)
    return out.reset_index()


def efficiency_caption(experiment: str, records: list[dict]) -> str:
    """What the efficiency table's numbers are, and where they were measured."""
    frame = efficiency_frame(records)
    devices = ", ".join(sorted(set(frame["device"]) - {""})) if not frame.empty else ""
    return (
        f"{experiment}: efficiency beside accuracy, means over each row's cells (datasets, seeds). Trainable params:"
        " the method's trained head (frozen backbones are in Params). GFLOPs: one test image's whole forward pass"
        " (torch's flop counter, feature cache bypassed). ms / image (model): predict on one test batch, warm, feature"
        " cache bypassed; with loading: plus the test pass's decoding per image. Peak memory: the process's peak"
        " resident memory during the cell (CPU), or torch's peak allocation (GPU). Avg.: mean of image and pixel"
        f" AUROC (%). Device: {devices or 'not recorded'}; precision per row (benchmark.precision)."
    )


def _number(value: float, digits: int | str = 2) -> str:
    """``value`` with ``digits`` decimals, or a format ("3g": three significant digits); "--" when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "--"
    return f"{value:.{digits}}" if isinstance(digits, str) else f"{value:.{digits}f}"


def efficiency_rows(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The efficiency table's headers and rows as text, from ``efficiency_frame``."""
    # sizes and FLOPs over orders of magnitude (a tiny head, a ViT-L): three significant digits
    digits = {"fit_s": 1, "images_per_s": 1, "peak_memory_mb": 0, "trainable_params_M": "3g", "params_M": "3g"}
    digits["gflops_per_image"] = "3g"
    headers = ["Method", "Setting", "K", "Precision", *EFFICIENCY_COLUMNS.values(), "Image AUROC", "Pixel AUROC"]
    headers.append("Avg.")
    body = [
        [
            r.method,
            SETTING_NAMES.get(r.setting, r.setting),
            str(r.shots or ""),
            r.precision,
            *(_number(getattr(r, c), digits.get(c, 2)) for c in EFFICIENCY_COLUMNS),
            *(_number(100 * v) for v in (r.image_auroc, r.pixel_auroc, r.average_auroc)),
        ]
        for r in frame.itertuples()
    ]
    return headers, body


def render_efficiency(records: list[dict], fmt: str, caption: str) -> str:
    frame = efficiency_frame(records)
    if fmt == "csv":
        return frame.assign(**{c: frame[c] * 100 for c in ("image_auroc", "pixel_auroc", "average_auroc")}).to_csv(
            index=False
        )
    headers, body = efficiency_rows(frame)
    if fmt == "markdown":
        return f"{caption}\n\n" + tabulate(body, headers=headers, tablefmt="github", disable_numparse=True) + "\n"
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{_latex_escape(caption)}}}",
        r"\resizebox{\linewidth}{!}{%  needs \usepackage{graphicx}",
        r"\begin{tabular}{llll" + "r" * (len(headers) - 4) + "}",
        r"\toprule",
        " & ".join(_latex_escape(h) for h in headers) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(_latex_escape(str(c)) for c in row) + r" \\" for row in body]
    lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}"]
    return "\n".join(lines) + "\n"
