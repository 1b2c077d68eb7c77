"""A published table in its paper's layout, our reproduced numbers in place where a run covers a cell and the
paper's number, marked as copied, elsewhere; and the coverage of every published table by shipped protocols.

Rows are the paper's methods in its order, grouped by its settings; columns its datasets and metrics. A row
is ours when its normalised name (``benchmark.reports.published.canonical``) is the published name of a
method we run, and a cell is reproduced when an experiment holds that method in the mapped (setting, K) on
that dataset (Dice: at the same fixed threshold, or at that threshold of the run's sweep) on the backbone the
row states (``benchmark.backbones.identity``). Our runs of it on another backbone get a row of their own
under it, labelled with their backbone, and are not matched to the paper's numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from benchmark.backbones.identity import agrees, of_label
from benchmark.errors import BenchmarkError
from benchmark.method import METHODS
from benchmark.metrics import METRICS
from benchmark.reports.published import (
    AGGREGATES,
    DOMAIN_SOURCES,
    EFFICIENCY_SETS,
    PUBLISHED_CSV,
    average_sets,
    canonical,
    load_published,
)
from benchmark.reports.tables import HEADERS, _latex_escape, latex_head, published_name, summarize
from benchmark.store import ResultStore

COPIED = "†"


def plugin_names() -> dict[str, str]:
    """Our methods by published name (lower case): ``{"mvfa": "mvfa", "medsad-clip": "medsad_clip", ...}``."""
    from methods.anomalib_models import PUBLISHED

    classes = [METHODS.get(n) for n in METHODS.names()]
    ours = {c.published_name.lower(): c.name for c in classes if c.published_name}  # a family member by its own name
    return {**{p.lower(): f"anomalib:{cls}" for cls, p in PUBLISHED.items()}, **ours}


@dataclass
class Cell:
    published: float | None  # percent; None in a row of ours on another backbone than the paper's
    ours: tuple[float, float, int] | None = None  # mean, std (percent), seeds


@dataclass
class PaperTable:
    paper: str
    table: str
    groups: list[str]  # settings as printed, in the paper's order
    rows: list[tuple[str, str]]  # (setting, method as printed)
    columns: list[tuple[str, str]]  # (dataset, metric)
    cells: dict[tuple[str, str, str, str], Cell]  # (setting, method, dataset, metric)
    notes: list[str] = field(default_factory=list)
    provenance: str = ""
    experiments: list[str] = field(default_factory=list)  # none: the paper's numbers alone


def our_summary(results_dir: str | Path, experiments: list[str]) -> pd.DataFrame:
    frames = []
    for experiment in experiments:
        store = ResultStore(results_dir, experiment)
        if not store.path.is_file():
            raise BenchmarkError(f"--from: no results for experiment '{experiment}' ({store.path} not found)")
        frames.append(store.frame())
    frame = pd.concat(frames, ignore_index=True)
    summary = summarize(frame)
    summary["name_key"] = [
        canonical(published_name(p, a)).lower() for p, a in zip(summary["plugin"], summary["published_as"], strict=True)
    ]
    return summary


def _provenance(results_dir: str | Path, experiments: list[str]) -> str:
    commits, weights, locks = set(), set(), set()
    for experiment in experiments:
        for rec in ResultStore(results_dir, experiment).latest().values():
            if rec.get("status") == "finished":
                commits.add(rec.get("tags", {}).get("git_commit", "")[:10])
                weights.add(str(rec.get("backbone_weights")))
                if rec.get("data_lock"):
                    locks.add((rec["dataset"], rec["data_lock"]))
    git = ", ".join(sorted(c for c in commits if c)) or "-"
    text = f"Ours from {', '.join(experiments)} (git {git}; backbone weights {', '.join(sorted(weights))})."
    if any("random-init" in w for w in weights):
        text += " Random-init backbones: our numbers are not comparable with the paper's."
    if locks:
        text += f" Data as locked: {'; '.join(f'{d} by {lock}' for d, lock in sorted(locks))}."
    return text


def aggregate(hits: pd.DataFrame, dataset: str) -> tuple[float, int] | None:
    """An averaged published "dataset" from our summary rows ``hits`` (one row's cells of one metric)."""
    means = {d: (float(m), int(n)) for d, m, n in zip(hits["dataset"], hits["mean"], hits["n"], strict=True)}
    return average_sets(means, dataset)


def paper_table(paper: str, table: str, results_dir: str | Path, experiments: list[str]) -> PaperTable:
    """The table with our runs from ``experiments`` in place; with none, the paper's numbers alone."""
    pub = load_published()
    part = pub[(pub["paper"] == paper) & (pub["table"] == table)]
    if part.empty:
        known = sorted({f"{p} '{t}'" for p, t in zip(pub["paper"], pub["table"], strict=True)})
        raise BenchmarkError(
            f"no published table {paper} '{table}' in {PUBLISHED_CSV.name} (known: {', '.join(known)})"
        )
    ours = our_summary(results_dir, experiments) if experiments else None
    groups = list(dict.fromkeys(part["setting"]))
    # a table that prints one method at several thresholds (MedSAD-CLIP's Table 7) gets a row per threshold
    several = part.groupby(["setting", "method", "dataset", "metric"]).size().max() > 1
    labels = [
        f"{m} @{t:g}" if several and not math.isnan(t) else m
        for m, t in zip(part["method"], part["threshold"], strict=True)
    ]
    part = part.assign(label=labels)
    rows = list(dict.fromkeys(zip(part["setting"], part["label"], strict=True)))
    columns = list(dict.fromkeys(zip(part["dataset"], part["metric"], strict=True)))
    cells: dict[tuple[str, str, str, str], Cell] = {}
    # a printed row -> {a row of ours under it: (fit source, the paper's backbone where ours ran on another)}
    others: dict[tuple[str, str], dict[str, tuple[str, str]]] = {}
    for _, r in part.iterrows():
        cell = Cell(float(r["value_percent"]))
        cells[(r["setting"], r["label"], r["dataset"], r["metric"])] = cell
        if r["our_setting"] is None or ours is None:
            continue
        mine = ours[
            (ours["name_key"] == r["method_key"])
            & (ours["setting"] == r["our_setting"])
            & (ours["shots"] == int(r["our_shots"]))
        ]
        agree = mine["backbone"].map(lambda b, stated=r["backbone"]: agrees(stated, b)).astype(bool)
        retrain = mine["fit_source"] == "retrain"
        cell.ours = _ours(mine[agree & retrain], r)
        extra = others.setdefault((r["setting"], r["label"]), {})
        for (source, backbone), given in mine.groupby(["fit_source", "backbone"], sort=False):
            if source == "retrain" and agrees(r["backbone"], backbone):
                continue  # the paper's own row
            on = "" if agrees(r["backbone"], backbone) else f"on {of_label(backbone)}"
            kind = "ours" if source == "retrain" else f"{source}, evaluated by us"
            label = f"{r['label']} ({', '.join(x for x in (kind, on) if x)})"
            extra[label] = (source, "" if not on else r["backbone"] or "not stated")
            found = _ours(given, r)
            if found is not None:
                cells[(r["setting"], label, r["dataset"], r["metric"])] = Cell(None, found)
    rows = [x for row in rows for x in [row, *((row[0], label) for label in sorted(others.get(row, {}), key=_order))]]
    notes = [
        f"{label}: not matched to the paper's numbers, which used {theirs} (a backbone difference is no "
        "reproduction gap)."
        for labels in others.values()
        for label, (_, theirs) in labels.items()
        if theirs
    ]
    sources = sorted({source for labels in others.values() for source, _ in labels.values()} - {"retrain"})
    notes += [SOURCE_NOTES[source] for source in sources]
    notes += sorted({n for n in (*part["setting_note"], *part["method_note"]) if n})
    provenance = _provenance(results_dir, experiments) if experiments else ""
    return PaperTable(paper, table, groups, rows, columns, cells, notes, provenance, experiments)


SOURCE_NOTES = {
    "authors' checkpoint": "Rows \"(authors' checkpoint, evaluated by us)\": the authors' released weights evaluated "
    "by this harness under the same protocol; the paper's row above holds our retrain (or the paper's number, "
    "copied): retrain vs released weights vs paper.",
    "checkpoint": 'Rows "(checkpoint, evaluated by us)": a fit file given to the protocol, evaluated by this '
    "harness; not counted as a retrain.",
}


def _order(label: str) -> tuple[bool, str]:
    """Rows under a printed row: ours on other backbones first, then evaluated checkpoints."""
    return "evaluated by us" in label, label


def _ours(mine: pd.DataFrame, r: pd.Series) -> tuple[float, float, int] | None:
    """Our (mean, std, seeds) in percent for the published row ``r`` from our summary rows ``mine`` of its method
    and setting (Dice: at the run's fixed threshold, else at the same threshold of its sweep)."""
    if r["dataset"] in AGGREGATES:
        found = aggregate(mine[(mine["metric"] == r["metric"]) & (mine["n"] > 0)], r["dataset"])
        return None if found is None else (found[0] * 100, float("nan"), found[1])
    mine = mine[mine["dataset"] == r["dataset"]]
    hit = mine[mine["metric"] == r["metric"]]
    if r["metric"] == "dice":
        t = r["threshold"]
        same = hit[(hit["threshold"] - t).abs() < 1e-9] if not math.isnan(t) else hit[:0]
        hit = same if not same.empty or math.isnan(t) else mine[mine["metric"] == f"dice_t{t:g}"]
    hit = hit[hit["n"] > 0]
    if hit.empty:
        return None
    best = hit.iloc[0]
    return best["mean"] * 100, best["std"] * 100, int(best["n"])


def _ranks(t: PaperTable) -> dict[tuple, int]:
    """Bold (0) and underline (1) among *our* numbers of a column within a setting."""
    marks = {}
    for group in t.groups:
        for d, m in t.columns:
            better = METRICS[m].higher_is_better if m in METRICS else True
            values = {
                (g, meth, d, m): c.ours[0]
                for (g, meth) in t.rows
                if g == group
                and (c := t.cells.get((g, meth, d, m))) is not None
                and c.ours is not None
                and c.published is not None
            }
            distinct = sorted(set(values.values()), reverse=better)
            if len(distinct) >= 2:
                marks.update({k: distinct.index(v) for k, v in values.items() if v in distinct[:2]})
    return marks


def _text(cell: Cell | None, delta: bool, copied: str = COPIED) -> str:
    if cell is None:
        return "--"
    if cell.ours is None:
        return f"{cell.published:.2f}{copied}"
    mean, std, n = cell.ours
    text = f"{mean:.2f} ± {std:.2f}" if n > 1 and not math.isnan(std) else f"{mean:.2f}"
    return text + (f" ({mean - cell.published:+.2f})" if delta and cell.published is not None else "")


def caption(t: PaperTable, delta: bool) -> str:
    if not t.experiments:
        text = (
            f"{t.paper} {t.table} as published, in the paper's layout: its numbers only, no run of ours is shown "
            "(add one with --from EXPERIMENT[,...]; paper-table --coverage names the protocols that reproduce it)."
        )
        return " ".join([text, *t.notes])
    reproduced = sum(c.ours is not None and c.published is not None for c in t.cells.values())
    printed = sum(c.published is not None for c in t.cells.values())
    text = (
        f"{t.paper} {t.table}, in the paper's layout: {reproduced} of {printed} numbers reproduced (mean ± std "
        f"over seeds); {COPIED}: copied from the paper, not reproduced. Bold and underline rank our reproduced "
        "numbers only, within a setting and column."
    )
    if delta:
        text += " (±x.xx): ours minus the paper's number."
    return " ".join([text, t.provenance, *t.notes])


def render(t: PaperTable, fmt: str, delta: bool = False) -> str:
    marks = _ranks(t)
    if fmt == "csv":
        rows = [
            {"setting": g, "method": meth, "dataset": d, "metric": m, "published": c.published,
             "ours_mean": c.ours[0] if c.ours else None, "ours_std": c.ours[1] if c.ours else None,
             "ours_seeds": c.ours[2] if c.ours else 0}
            for (g, meth, d, m), c in t.cells.items()
        ]  # fmt: skip
        return pd.DataFrame(rows).to_csv(index=False)
    latex = fmt == "latex"
    copied = COPIED if t.experiments else ""  # every number is the paper's: nothing to mark
    body = []
    for group in t.groups:
        body.append(("group", group, []))
        for g, meth in (r for r in t.rows if r[0] == group):
            cells = []
            for d, m in t.columns:
                cell = t.cells.get((g, meth, d, m))
                text = _text(cell, delta, copied)
                rank = marks.get((g, meth, d, m))
                if latex:
                    # true signs on the differences only ("--", no number, stays a dash)
                    text = _latex_escape(text).replace(COPIED, r"$^\dagger$")
                    text = text.replace("(-", "($-$").replace("(+", "($+$")
                    text = rf"\textbf{{{text}}}" if rank == 0 else rf"\underline{{{text}}}" if rank == 1 else text
                else:
                    text = f"**{text}**" if rank == 0 else f"<u>{text}</u>" if rank == 1 else text
                cells.append(text)
            body.append(("row", meth, cells))
    headers = [f"{d} {HEADERS.get(m, m)}" for d, m in t.columns]
    if not latex:
        rows = []
        for kind, name, cells in body:
            rows.append([f"*{name}*", *[""] * len(headers)] if kind == "group" else [name, *cells])
        return f"{caption(t, delta)}\n\n" + tabulate(rows, ["Method", *headers], "github", disable_numparse=True) + "\n"
    dagger = r"$^\dagger$"
    lines = [
        r"\begin{table}[t]", r"\centering", rf"\caption{{{_latex_escape(caption(t, delta)).replace(COPIED, dagger)}}}",
        *latex_head(t.columns),
    ]  # fmt: skip
    for kind, name, cells in body:
        if kind == "group":
            lines += [r"\midrule", rf"\multicolumn{{{len(t.columns) + 1}}}{{l}}{{\emph{{{_latex_escape(name)}}}}} \\"]
        else:
            lines.append(_latex_escape(name) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


@dataclass
class Coverage:
    paper: str
    table: str
    rows: int
    reproducible: int
    not_run: dict[str, int]  # printed method -> rows
    exceptions: dict[str, int]  # documented reason -> rows
    unreachable: list[str]  # rows of methods we run that no shipped protocol reaches
    protocols: dict[str, dict[str, set[str]]] = field(default_factory=dict)  # setting -> method -> files reproducing


# Rows of methods we run that no protocol can reach, and why (documented in the README)
EXCEPTIONS = {
    ("bgad", "no masks"): "BGAD trains on pixel masks; MVFA Table 7 reports it on the image-label-only HIS, "
    "ChestXray and OCT17, which our plugin refuses (it would need the masks MVFA's authors did not have either)",
}


def reachable_cells(protocols_dir: Path) -> dict[tuple[str, str, int, str, str, float | None, str], set[str]]:
    """What the shipped protocols compute, (plugin, setting, K, dataset, metric, Dice threshold, backbone label),
    each with the protocol files that compute it (``protocols/fewshot_k2.yaml``)."""
    from benchmark.cells import expand
    from benchmark.data.catalog import load_catalog
    from benchmark.protocol import load_protocol

    out: dict[tuple[str, str, int, str, str, float | None, str], set[str]] = {}
    for path in sorted(protocols_dir.glob("*.yaml")):
        name = str(path.relative_to(protocols_dir.parent))
        protocol = load_protocol(path)
        catalog = load_catalog([Path(p) for p in protocol.dataset_cards])
        fixed = protocol.threshold.value if protocol.threshold.mode == "fixed" else None
        for cell in expand(protocol, catalog):
            spec = catalog[cell.dataset]
            metrics = [] if spec.segmentation_only else ["image_auroc", "image_accuracy"]
            if spec.masks:
                metrics += ["pixel_auroc", "dice", "dice_per_image"]
            backbone = cell.backbone.label()
            keys = {
                (cell.plugin_name, cell.setting, cell.shots or 0, cell.dataset, m, fixed, backbone) for m in metrics
            }
            if catalog[cell.dataset].masks:  # Dice at every threshold of the sweep, too
                key = (cell.plugin_name, cell.setting, cell.shots or 0, cell.dataset, "dice")
                keys |= {(*key, t, backbone) for t in protocol.sweep}
            for key in keys:
                out.setdefault(key, set()).add(name)
    return out


def coverage(protocols_dir: Path) -> list[Coverage]:
    pub = load_published()
    plugins = plugin_names()
    reach = reachable_cells(protocols_dir)
    from benchmark.data.catalog import load_catalog

    catalog = load_catalog()
    out = []
    for (paper, table), part in pub.groupby(["paper", "table"], sort=False):
        cov = Coverage(paper, table, len(part), 0, {}, {}, [])
        for _, r in part.iterrows():
            by_method = cov.protocols.setdefault(r["setting"], {})
            plugin = plugins.get(r["method_key"])
            if plugin is None:
                cov.not_run[r["canonical"]] = cov.not_run.get(r["canonical"], 0) + 1
                continue
            threshold = None if math.isnan(r["threshold"]) else float(r["threshold"])
            key = (plugin, r["our_setting"], int(r["our_shots"] or 0), r["dataset"], r["metric"])
            if r["dataset"] in AGGREGATES:  # averages over sets: every set they average must be reached
                sets = {
                    k: f
                    for k, f in reach.items()
                    if k[:3] == key[:3] and k[4] == r["metric"] and agrees(r["backbone"], k[6])
                }
                have = {k[3] for k in sets}
                sources = have & set(DOMAIN_SOURCES)
                efficiency = r["dataset"] == "avg_efficiency_sets"
                if set(EFFICIENCY_SETS) <= have if efficiency else sources and have - sources:
                    cov.reproducible += 1
                    by_method.setdefault(r["method"], set()).update(*sets.values())
                else:
                    cov.unreachable.append(f"{r['method']} | {r['setting']} | {r['dataset']} | {r['metric']}")
                continue
            found = [
                f
                for k, f in reach.items()
                if k[:5] == key
                and (r["metric"] != "dice" or (k[5] is not None and abs(k[5] - threshold) < 1e-9))
                and agrees(r["backbone"], k[6])
            ]
            if r["our_setting"] is not None and found:
                cov.reproducible += 1
                by_method.setdefault(r["method"], set()).update(*found)
            elif METHODS.get(plugin).requires_masks and r["dataset"] in catalog and not catalog[r["dataset"]].masks:
                reason = EXCEPTIONS[(plugin, "no masks")]
                cov.exceptions[reason] = cov.exceptions.get(reason, 0) + 1
            else:
                cov.unreachable.append(f"{r['method']} | {r['setting']} | {r['dataset']} | {r['metric']}")
        out.append(cov)
    return out


def render_coverage(items: list[Coverage]) -> str:
    lines = []
    for c in items:
        lines.append(
            f"{c.paper} {c.table}: {c.rows} published numbers; {c.reproducible} reproducible by shipped protocols"
        )
        if c.not_run:
            missing = ", ".join(f"{m} ({n})" for m, n in sorted(c.not_run.items()))
            lines.append(f"  methods we do not run yet: {missing}")
        for reason, n in c.exceptions.items():
            lines.append(f"  documented exception ({n}): {reason}")
        lines += _reproduced_by(c)
        lines.append(f"  rows of methods we run that no shipped protocol reaches: {len(c.unreachable)}")
        lines += [f"    {row}" for row in c.unreachable]
    return "\n".join(lines) + "\n"


def _reproduced_by(c: Coverage) -> list[str]:
    """The protocol files that reproduce a table: one line, or one a setting where they differ (within a setting,
    its methods grouped by the files that reproduce them where those differ)."""

    def listed(files: frozenset[str]) -> str:
        return ", ".join(sorted(files)) or "none of the shipped protocols"

    def by_files(methods: dict[str, set[str]]) -> str:
        groups: dict[frozenset[str], list[str]] = {}
        for method, files in methods.items():
            groups.setdefault(frozenset(files), []).append(method)
        if len(groups) <= 1:
            return listed(next(iter(groups), frozenset()))
        return "; ".join(f"{', '.join(names)}: {listed(files)}" for files, names in groups.items())

    texts = {setting: by_files(methods) for setting, methods in c.protocols.items()}
    if len(set(texts.values())) == 1:
        return [f"  reproduced by: {next(iter(texts.values()))}"]
    return ["  reproduced by, per setting:", *(f"    {setting}: {text}" for setting, text in texts.items())]
