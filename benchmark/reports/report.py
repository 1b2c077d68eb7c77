"""One self-contained HTML page per experiment: tables, comparisons with confidence intervals and
critical-difference diagrams, ROC and Dice-vs-threshold curves per dataset (methods overlaid), example maps
of every method on the same images, and the provenance of every number.

The figures are drawn with the ``draw_*`` functions of ``benchmark.reports.figures`` (the per-cell figures
use the same ones) and embedded as PNG data URIs, so the page is one file that opens anywhere.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from benchmark.errors import BenchmarkError
from benchmark.metrics import auroc_exact, roc_points
from benchmark.reports import compare, tables
from benchmark.reports.figures import (
    Curve,
    SampleView,
    draw_overlay,
    draw_roc,
    draw_sweep,
    efficiency_figure,
    pyplot,
    to_png,
)
from benchmark.store import ResultStore

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .5em}
th{background:#f4f4f4}.warn{background:#fde8e8;border:1px solid #e99;padding:.8em;border-radius:4px}
.caption{color:#555;font-size:.85em;max-width:1100px}img{max-width:100%}.grid{display:flex;flex-wrap:wrap;gap:1em}
"""


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<div><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></div>'


def _table_html(headers: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    rows = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><tr>{head}</tr>{rows}</table>"


def results_table(frame, metrics: tuple[str, ...]) -> str:
    """The experiment's table (``benchmark.reports.tables``), marks included, as HTML."""
    rows, columns = tables.build(frame, metrics)
    ranks = tables._ranks(rows, columns)
    body = []
    for i, row in enumerate(rows):
        cells = [html.escape(row.label())]
        for col in columns:
            text = html.escape(tables._fmt(row.values.get(col), seed_free=row.seed_free))
            rank = ranks[col].get(i)
            cells.append(f"<b>{text}</b>" if rank == 0 else f"<u>{text}</u>" if rank == 1 else text)
        body.append(cells)
    headers = ["Method"] + [f"{d} {tables.HEADERS.get(m, m)}" for d, m in columns]
    return _table_html(headers, body)


def comparison_section(entries: list[compare.Entry], experiment: str, metric: str, resamples: int) -> tuple:
    """The comparison table with CIs and daggers, and its critical-difference diagrams (as figures)."""
    result = compare.compare(entries, metric, None, resamples)
    datasets = list(dict.fromkeys(result.frame["dataset"]))
    body = []
    for (group, method), part in result.frame.groupby(["group", "method"], sort=False):
        cells = {r["dataset"]: html.escape(compare.cell_text(r)) for _, r in part.iterrows()}
        body.append([html.escape(group), html.escape(method), *(cells.get(d, "--") for d in datasets)])
    text = f'<p class="caption">{html.escape(compare.caption(result, experiment, resamples))}</p>'
    if result.too_few:
        text += f'<p class="caption">{html.escape(compare.too_few_text(result))}</p>'
    figures = {
        f"cd_{metric}_{group}": compare.cd_figure(test, f"{group}, {metric}") for group, test in result.ranks.items()
    }
    return text + _table_html(["Setting", "Method", *datasets], body), figures


def curve_figures(entries: list[compare.Entry]) -> dict[str, object]:
    """Per (setting, dataset): ROC curves of every method overlaid (image level; pixel level where there are
    masks), and Dice against the threshold (mean over seeds)."""
    plt = pyplot()
    figures = {}
    by_cell: dict[tuple[str, str], list[compare.Entry]] = {}
    for e in entries:
        by_cell.setdefault((e.group, e.dataset), []).append(e)
    for (group, dataset), part in by_cell.items():
        masks = part[0].evidence[0].has_masks
        fig, axes = plt.subplots(1, 3 if masks else 1, figsize=(13 if masks else 4.6, 4.4), squeeze=False)
        image_level = len(set(part[0].evidence[0].labels.tolist())) == 2  # not on a segmentation-only set
        for e in part:
            first = e.evidence[0]
            if image_level:
                fpr, tpr = roc_points(first.scores, first.labels)
                mean_auroc = float(np.mean([auroc_exact(ev.scores, ev.labels.astype(bool)) for ev in e.evidence]))
                draw_roc(axes[0][0], Curve(fpr, tpr, mean_auroc), e.name)
            if masks and first.pixel_roc is not None:
                pixel_auroc = float(np.mean([r["metrics"]["pixel_auroc"] for r in e.records]))
                draw_roc(axes[0][1], Curve(*first.pixel_roc, pixel_auroc), e.name)
            if masks:
                dice = np.mean([[ev.dice(t) for t in ev.thresholds] for ev in e.evidence], axis=0)
                rows = [{"threshold": t, "dice": d} for t, d in zip(first.thresholds, dice, strict=True)]
                draw_sweep(axes[0][2], rows, label=e.name, what=("dice",))
        title = (
            "image ROC (first seed; AUROC: mean over seeds)" if image_level else "no image ROC: every image anomalous"
        )
        axes[0][0].set_title(title, fontsize=8)
        if masks:
            axes[0][1].set_title("pixel ROC (first seed; AUROC: mean over seeds)", fontsize=8)
            axes[0][2].set_title("Dice against the threshold (mean over seeds)", fontsize=8)
        fig.suptitle(f"{dataset}, {group}", fontsize=9)
        fig.tight_layout()
        figures[f"curves_{group}_{dataset}"] = fig
    return figures


def examples_figures(entries: list[compare.Entry]) -> dict[str, object]:
    """Per (setting, dataset): the same example images (rows: the first test images of each class, kept by every
    cell's evidence) under every method's map (columns)."""
    plt = pyplot()
    figures = {}
    by_cell: dict[tuple[str, str], list[compare.Entry]] = {}
    for e in entries:
        if e.evidence[0].examples.get("images") is not None and len(e.evidence[0].examples["images"]):
            by_cell.setdefault((e.group, e.dataset), []).append(e)
    for (group, dataset), part in by_cell.items():
        names = [str(n) for n in part[0].evidence[0].examples["names"]]
        fig, axes = plt.subplots(
            len(names), len(part), figsize=(2.1 * len(part), 2.1 * len(names)), squeeze=False,
            subplot_kw={"xticks": [], "yticks": []},
        )  # fmt: skip
        for col, e in enumerate(part):
            ex = e.evidence[0].examples
            where = {str(n): i for i, n in enumerate(ex["names"])}
            for row, name in enumerate(names):
                ax = axes[row][col]
                if name not in where:
                    ax.axis("off")
                    continue
                i = where[name]
                view = SampleView(
                    name, ex["images"][i] / 255.0, ex["masks"][i].astype(bool), ex["maps"][i].astype(np.float32), 0, 0
                )
                draw_overlay(ax, view, 0.0, 1.0)
                if row == 0:
                    ax.set_title(e.name, fontsize=7)
                if col == 0:
                    ax.text(-0.05, 0.5, name, transform=ax.transAxes, rotation=90, ha="right", va="center", fontsize=6)
        fig.suptitle(
            f"{dataset}, {group}: anomaly maps (colours 0-1), ground truth outlined; the first test images of each "
            "class, the same for every method",
            fontsize=8,
        )
        figures[f"examples_{group}_{dataset}"] = fig
    return figures


def efficiency_section(records: list[dict], experiment: str) -> tuple[str, object | None]:
    """The efficiency table (``tables --efficiency``) as HTML, and accuracy against time as a scatter plot
    (None when no cell measured its time: records from before efficiency was measured)."""
    frame = tables.efficiency_frame(records)
    headers, body = tables.efficiency_rows(frame)
    section = f'<p class="caption">{html.escape(tables.efficiency_caption(experiment, records))}</p>'
    section += _table_html(headers, [[html.escape(c) for c in row] for row in body])
    timed = frame.dropna(subset=["ms_per_image"])
    if timed.empty:
        return section, None
    points = [
        (f"{r.method} ({tables.setting_label(r.setting, int(r.shots))})", r.ms_per_image, 100 * r.average_auroc)
        for r in timed.itertuples()
        if r.average_auroc == r.average_auroc  # a row with an AUROC (not NaN)
    ]
    devices = ", ".join(sorted(set(timed["device"]) - {""})) or "device not recorded"
    return section, efficiency_figure(points, f"{experiment}: accuracy against time ({devices})") if points else None


def provenance(records: list[dict]) -> str:
    body = []
    for r in sorted(records, key=lambda r: r["cell_id"]):
        tags = r.get("tags", {})
        values = (
            r["cell_id"], r.get("status"), tags.get("git_commit", "")[:10], r.get("protocol_version"),
            r.get("backbone"), r.get("backbone_weights"), (r.get("test_content_hash") or "")[:12],
            tags.get("device", ""), r.get("duration_s"),
        )  # fmt: skip
        body.append([html.escape(str(x)) for x in values])
    headers = ["cell", "status", "git commit", "protocol", "backbone", "weights", "test set", "device", "seconds"]
    return _table_html(headers, body)


def build_report(
    results_dir: str | Path, experiment: str, resamples: int = compare.DEFAULT_RESAMPLES
) -> tuple[str, dict[str, bytes]]:
    """The page, and its figures as PNG bytes (also logged to MLflow by the caller)."""
    store = ResultStore(results_dir, experiment)
    records = list(store.latest().values())
    frame = store.frame()
    if frame["metric"].dropna().empty:
        raise BenchmarkError(f"{store.path}: no finished cells for experiment '{experiment}'")
    entries = compare.load_entries(results_dir, experiment)
    parts = [f"<h1>MedAD-Bench report: {html.escape(experiment)}</h1>"]
    weights = sorted({str(r.get("backbone_weights")) for r in records if r.get("status") == "finished"})
    if any("random-init" in w for w in weights):
        parts.append(
            '<p class="warn"><b>Random-init backbones.</b> Some cells ran on randomly initialised backbones: '
            "their numbers test the harness and say nothing about any method.</p>"
        )
    commits = sorted({r.get("tags", {}).get("git_commit", "")[:10] for r in records if r.get("tags")})
    versions = sorted({str(r.get("protocol_version")) for r in records})
    finished = sum(r["status"] == "finished" for r in records)
    parts.append(
        f"<p>{finished} finished cells of {len(records)}; git commits {', '.join(commits) or '-'}; protocol "
        f"versions {', '.join(versions)}; backbone weights: {html.escape('; '.join(weights))}.</p>"
    )
    recorded = set(frame["metric"].dropna())
    figures: dict[str, bytes] = {}

    def add(name: str, fig) -> None:
        figures[f"{_slug(name)}.png"] = to_png(fig)
        parts.append(_img(figures[f"{_slug(name)}.png"], name))

    parts.append("<h2>Results</h2>")
    for style, metrics in tables.STYLES.items():
        shown = tuple(m for m in metrics if m in recorded)
        if shown:
            caption = tables.caption_for(frame, experiment, shown)
            parts += [f'<p class="caption">{html.escape(caption)} ({style} style)</p>', results_table(frame, shown)]
    parts.append("<h2>Which differences are real</h2>")
    for metric in compare.TESTED:
        if metric not in recorded:  # no mask (dice), or segmentation sets only (image metrics)
            continue
        section, cds = comparison_section(entries, experiment, metric, resamples)
        parts += [f"<h3>{metric}</h3>", section]
        for name, fig in cds.items():
            add(name, fig)
    parts.append("<h2>Curves</h2>")
    for name, fig in curve_figures(entries).items():
        add(name, fig)
    parts.append("<h2>Example maps: every method on the same images</h2>")
    for name, fig in examples_figures(entries).items():
        add(name, fig)
    section, scatter = efficiency_section(records, experiment)
    parts += ["<h2>Efficiency</h2>", section]
    if scatter is not None:
        add("efficiency", scatter)
    parts += ["<h2>Provenance of every number</h2>", provenance(records)]
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(experiment)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n"
    )
    return page, figures


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("_")
