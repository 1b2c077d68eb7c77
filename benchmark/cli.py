"""``python -m benchmark run|tables|compare|report|paper-table|list|synth|fetch-weights|fetch-data|verify-data|sync``.
Bad input: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import difflib
import os
import signal
import sys
import time
from pathlib import Path

from benchmark.errors import BenchmarkError, Interrupted

PROTOCOLS_DIR = Path(__file__).resolve().parents[1] / "protocols"


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(x) for x in text.split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}") from None

    return parse


def _parser() -> argparse.ArgumentParser:
    from benchmark.reports.published import published_tables

    p = argparse.ArgumentParser(prog="python -m benchmark", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a protocol's grid of cells")
    run.add_argument("protocol", help="a protocol file, e.g. protocols/demo.yaml (`list` shows the shipped ones)")
    run.add_argument("--methods", type=_csv(str), help="run only these method entries of the protocol (a,b)")
    run.add_argument("--datasets", type=_csv(str), help="run only these datasets of the protocol (x,y)")
    run.add_argument("--seeds", type=_csv(int), help="run only these model seeds of the protocol (0,1)")
    run.add_argument("--settings", type=_csv(str), help="run only these settings of the protocol (few_shot,...)")
    run.add_argument(
        "--shots", type=_csv(int), help="run only these K (data_fraction: percentages) of the protocol's settings "
        "(2,4); settings without K are left out"
    )  # fmt: skip
    run.add_argument("--data-root", help="folder holding the datasets (overrides the protocol's data_root)")
    run.add_argument("--results-dir", help="overrides the protocol's results_dir")
    run.add_argument("--resume", action="store_true", help="skip cells already finished with the same config")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the grid, the skipped pairs and each cell's training samples; run and write nothing",
    )
    run.add_argument("--save-predictions", action="store_true", help="write each cell's predictions.npz")
    run.add_argument(
        "--refit", action="store_true", help="train every fit again, ignoring the fits stored before this run"
    )
    run.add_argument(
        "--save-fits",
        choices=("mlflow", "none"),
        default="mlflow",
        help="mlflow: each trained cell logs its fit file as an MLflow artifact (the default); none: the fits stay "
        "in RESULTS_DIR/fits only (huge grids)",
    )
    run.add_argument(
        "--workers",
        type=int,
        help="run cells in N local worker processes (one GPU each, round robin, where there are GPUs); default: one "
        "per GPU, else one per CPU core ($MEDAD_BENCH_WORKERS where set); 1: one cell after another in this process",
    )
    run.add_argument(
        "--executor",
        choices=("serial", "local", "ray"),
        help="where cells run: local (--workers processes; the default), serial (this process) or ray (a Ray cluster)",
    )
    run.add_argument("--address", help="with --executor ray: the cluster to join (e.g. auto); none: a local Ray")
    tables = sub.add_parser("tables", help="render an experiment's results as tables")
    tables.add_argument("experiment", help="the protocol's name (its results are in RESULTS_DIR/EXPERIMENT)")
    tables.add_argument(
        "--format", choices=("latex", "markdown", "csv"), default="markdown", help="output format (markdown)"
    )
    tables.add_argument(
        "--style",
        choices=("mvfa", "medsad", "segmentation"),
        default=None,
        help="mvfa: AC/AS (AUROCs); medsad: Dice/Acc at the main threshold; segmentation: per-image DSC and NSD "
        "(the default when no image metric was recorded)",
    )
    tables.add_argument("--metrics", type=_csv(str), help="explicit metric columns, e.g. dice,dice_oracle")
    tables.add_argument("--published", action="store_true", help="add the papers' numbers and the difference")
    tables.add_argument(
        "--std", action="store_true", help="LaTeX: add ± std over seeds after each mean (Markdown always has it)"
    )
    tables.add_argument(
        "--ci",
        action="store_true",
        help="add 95%% bootstrap confidence intervals over test images, and a dagger where the best of a "
        "setting is significantly better than the second (image_auroc, image_accuracy, dice)",
    )
    tables.add_argument(
        "--efficiency",
        action="store_true",
        help="per method: parameters, GFLOPs, fit time, ms per image, images/s and peak memory, with the precision "
        "and device, beside average AUROC (MCMIAD Table 2's layout)",
    )
    tables.add_argument("--results-dir", default="results", help="the folder runs wrote to (results)")
    tables.add_argument("--out", help="write the table to this file instead of printing it")
    comp = sub.add_parser(
        "compare", help="confidence intervals and paired tests between an experiment's methods, rank diagrams"
    )
    comp.add_argument("experiment", help="the protocol's name (its results are in RESULTS_DIR/EXPERIMENT)")
    comp.add_argument(
        "--metric",
        default="image_auroc",
        choices=("image_auroc", "image_accuracy", "dice"),
        help="the metric to compare (image_auroc)",
    )
    comp.add_argument("--baseline", help="compare every method with this method entry (default: the best mean)")
    comp.add_argument(
        "--resamples", type=int, default=4000, help="bootstrap resamples and permutations of the tests (4000)"
    )
    comp.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    comp.add_argument("--alpha", type=float, default=0.05, help="significance level after Holm's correction (0.05)")
    comp.add_argument(
        "--format", choices=("markdown", "latex", "csv"), default="markdown", help="what to print (markdown)"
    )
    comp.add_argument("--results-dir", default="results", help="the folder runs wrote to (results)")
    rep = sub.add_parser("report", help="one self-contained HTML page: tables, comparisons, curves, maps")
    rep.add_argument("experiment", help="the protocol's name (its results are in RESULTS_DIR/EXPERIMENT)")
    rep.add_argument("--out", help="the HTML file to write (RESULTS_DIR/EXPERIMENT/report.html)")
    rep.add_argument("--resamples", type=int, default=4000, help="bootstrap resamples of the comparisons (4000)")
    rep.add_argument("--results-dir", default="results", help="the folder runs wrote to (results)")
    paper = sub.add_parser(
        "paper-table", help="a published table in its paper's layout, our numbers where runs cover it"
    )
    try:
        published = published_tables()  # what the command reads: results/published/published_results.csv
    except OSError:  # the help names none; paper-table itself says what is missing
        published = {}
    listed = "; ".join(f"{name}: " + ", ".join(f'"{t}"' for t in tables) for name, tables in published.items())
    paper.add_argument("paper", nargs="?", help=f"a paper with published tables: {', '.join(published)}")
    paper.add_argument("table", nargs="?", help=f"its table, quoted ({listed})")
    paper.add_argument(
        "--from", dest="experiments", type=_csv(str), help="experiments holding our runs (a,b); none: the paper's alone"
    )
    paper.add_argument(
        "--format", choices=("latex", "markdown", "csv"), default="markdown", help="output format (markdown)"
    )
    paper.add_argument("--delta", action="store_true", help="add ours minus the paper's number to each cell")
    paper.add_argument(
        "--coverage", action="store_true", help="per published table: rows the shipped protocols reproduce"
    )
    paper.add_argument("--results-dir", default="results", help="the folder runs wrote to (results)")
    paper.add_argument("--out", help="write the table to this file instead of printing it")
    listing = sub.add_parser("list", help="methods, datasets and protocols")
    listing.add_argument(
        "--data-table", action="store_true", help="the README's table of datasets (source, licence, counts) in Markdown"
    )
    synth = sub.add_parser("synth", help="write the synthetic data sets")
    synth.add_argument("--out", default="data/synthetic", help="folder to write them to (data/synthetic)")
    synth.add_argument("--seed", type=int, default=0, help="generator seed (0)")
    fetch = sub.add_parser(
        "fetch-weights",
        help="download open_clip (or timm:MODEL) weights, or a method's authors' checkpoint, into the cache (needs "
        "internet)",
    )
    fetch.add_argument(
        "model",
        help="an open_clip model name (ViT-L-14-336), timm:NAME (timm:tf_efficientnet_b6) or a method whose authors' "
        "checkpoints we import (medclipseg; mvfa, april_gan, anomalyclip: where they are published)",
    )
    fetch.add_argument("tag", help="its pretrained tag (openai, laion400m_e31, aa_in1k) or the checkpoint (BUSI_25)")
    fetch_data = sub.add_parser(
        "fetch-data",
        help="download a dataset its card names on the Hugging Face Hub, check its SHA-256 and unpack it (needs "
        "internet); for the others, where to get them",
    )
    fetch_data.add_argument("name", help="a dataset card's name (`list` shows them), e.g. Kvasir")
    fetch_data.add_argument("--to", default="data", help="the data root to unpack it under (data)")
    fetch_data.add_argument("--cards", action="append", default=[], help="a folder of extra dataset cards")
    verify = sub.add_parser(
        "verify-data", help="check local copies of datasets against their cards (layout, counts; --deep: every file)"
    )
    verify.add_argument("names", nargs="*", help="dataset card names (`list` shows them)")
    verify.add_argument("--all", action="store_true", help="every dataset card")
    verify.add_argument("--data-root", default="data", help="folder holding the datasets (data)")
    verify.add_argument("--deep", action="store_true", help="decode every image and mask as a run does")
    verify.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes (the CPUs "
                        "this process may use)")  # fmt: skip
    verify.add_argument(
        "--lock", nargs="?", const="", metavar="FILE",
        help="write a lock (every file's SHA-256 and the test-set content hash) to FILE, or to FOLDER/NAME.lock.json "
        "(default: ./NAME.lock.json)"
    )  # fmt: skip
    verify.add_argument("--against", metavar="LOCK", help="name every file added, missing or changed since LOCK")
    verify.add_argument("--cards", action="append", default=[], help="a folder of extra dataset cards")
    sync = sub.add_parser("sync", help="bring MLflow up to date with a protocol's local records")
    sync.add_argument("protocol", help="the protocol file whose records MLflow should hold")
    sync.add_argument("--results-dir", help="overrides the protocol's results_dir")
    return p


def _cmd_run(args) -> int:
    import dataclasses

    from benchmark.cells import expand, skipped_note, skipped_pairs
    from benchmark.data.catalog import load_catalog
    from benchmark.protocol import load_protocol

    protocol = load_protocol(args.protocol)
    changes = {}
    if args.data_root:
        changes["data_root"] = args.data_root
    if args.results_dir:
        changes["results_dir"] = args.results_dir
    protocol = dataclasses.replace(protocol, **changes)
    catalog = load_catalog([Path(p) for p in protocol.dataset_cards])
    cells = expand(protocol, catalog, args.methods, args.datasets, args.seeds, args.settings, args.shots)
    root = Path(protocol.data_root)
    note = skipped_note(skipped_pairs(protocol, catalog, args.methods, args.datasets), catalog)
    if args.dry_run:
        return _dry_run(protocol, catalog, cells, root, note)
    from benchmark.runner import next_commands, run_protocol, summary_table, sync_command

    print(f"{protocol.name} (protocol version {protocol.version}): {len(cells)} cells, data root '{root}'")
    if note:
        print(f"note: {note}")
    if not args.resume and (again := _rerun_note(protocol, cells)):
        print(again)
    executor = _executor(args, protocol)
    print(f"cells run on: {executor.describe()}")
    summary = run_protocol(
        protocol, catalog, cells, root, resume=args.resume, save_predictions=args.save_predictions, executor=executor,
        refit=args.refit, log_fits=args.save_fits == "mlflow",
    )  # fmt: skip
    if summary.rows:
        print("\n" + summary_table(summary.rows) + "\n")
    print(
        f"finished {len(summary.finished)}, skipped {len(summary.skipped)}, failed {len(summary.failed)}; "
        f"results in {Path(protocol.results_dir) / protocol.name}"
    )
    if summary.finished or summary.skipped:
        print("next:\n" + "\n".join(f"  {line}" for line in next_commands(protocol, summary.experiment_id)))
    if summary.elsewhere:
        from benchmark.claims import claims_file
        from benchmark.store import ResultStore

        claims = claims_file(ResultStore(protocol.results_dir, protocol.name))
        print(f"{len(summary.elsewhere)} cells were being run by another invocation of '{protocol.name}'; once it "
              f"has ended, run the same command with --resume for any it did not finish (its claims are in "
              f"{claims}, void once it has died on this host or shown no life for a day)")  # fmt: skip
    if summary.mlflow_behind:
        print(f"MLflow is behind the local records ({summary.mlflow_behind}); catch it up with: "
              f"{sync_command(protocol)}")  # fmt: skip
    if summary.failed:
        return 2 if summary.bad_input else 1
    return 0


def _executor(args, protocol):
    """The executor the flags ask for: by default local workers that use the machine (``default_workers``), in
    this process where that is one; serial, local with --workers, or ray when asked."""
    from benchmark import executors

    if args.workers is not None and args.workers < 1:
        raise BenchmarkError(f"--workers: expected a number of processes >= 1, got {args.workers}")
    if args.address and args.executor != "ray":
        raise BenchmarkError("--address: only with --executor ray")
    if args.workers and args.workers > 1 and args.executor not in (None, "local"):
        raise BenchmarkError(
            f"--workers {args.workers}: only with --executor local (not '{args.executor}', which ignores it)"
        )
    if args.executor == "ray":
        from benchmark.cells import cell_resources

        return executors.RayExecutor(args.address, lambda cell: cell_resources(protocol, cell))
    if args.executor == "serial":
        return executors.SerialExecutor()
    devices = []
    if protocol.device != "cpu":
        import torch

        if protocol.device.startswith("cuda:"):
            devices = [protocol.device]
        elif torch.cuda.is_available():
            devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    workers = args.workers or executors.default_workers(devices)
    if workers == 1 and args.executor is None:
        return executors.SerialExecutor()
    return executors.LocalExecutor(workers, devices)


def _cmd_sync(args) -> int:
    """Bring MLflow up to date with ``results.jsonl`` (after MLflow was down, or a run was killed)."""
    import dataclasses

    from benchmark.protocol import load_protocol
    from benchmark.recording import Recorder
    from benchmark.store import ResultStore
    from benchmark.tracking import Tracker, check_server, tracking_uri

    protocol = load_protocol(args.protocol)
    if args.results_dir:
        protocol = dataclasses.replace(protocol, results_dir=args.results_dir)
    uri = tracking_uri(protocol)
    problem = check_server(uri)
    if problem:
        raise BenchmarkError(problem)
    store = ResultStore(protocol.results_dir, protocol.name)
    if not store.records():
        raise BenchmarkError(
            f"{store.path}: no records of experiment '{protocol.name}' to sync; pass the --results-dir the run used"
        )
    tracker = Tracker(
        uri, protocol.name, Path(protocol.results_dir) / "mlartifacts" / protocol.name, protocol.description
    )
    parent = tracker.start(f"{protocol.name}-sync-{time.strftime('%Y%m%d-%H%M%S')}", {"sync": "true"})
    done = Recorder(store, tracker, parent).reconcile()
    tracker.end(parent, "FINISHED")
    if tracker.behind:
        raise BenchmarkError(f"MLflow at '{uri}' failed during the sync ({tracker.behind})")
    print(f"MLflow at '{uri}' is up to date with {store.path}: " + (
        ", ".join(f"{n} runs {what}" for what, n in done.items()) or "nothing to do"))  # fmt: skip
    return 0


def _dry_run(protocol, catalog, cells, root: Path, skipped: str) -> int:
    """The grid, the skipped pairs and, where the data are there, each cell's samples; writes nothing (not
    even the synthetic data a real run would write first)."""
    from benchmark.data.locks import read_lock
    from benchmark.errors import PreflightError
    from benchmark.preflight import check_splits

    splits, problems, missing = check_splits(protocol, catalog, cells, root)
    here = Path.cwd()
    for name, why in missing.items():
        if catalog[name].synthetic:
            print(f"data: '{name}' is synthetic and not written yet: a run writes it under '{root}' first")
        else:
            print(f"data: {why}")
    for name, path in protocol.data_locks.items():
        try:
            print(f"data: '{name}' is locked by {read_lock(path, catalog[name]).label()} (a run hashes the copy first)")
        except BenchmarkError as exc:
            problems.append(f"data_locks.{name}: {exc}")
    for cell in cells:
        split = splits.get(cell.cell_id)
        head = f"{cell.cell_id}  backbone={cell.backbone.label()}  image_size={cell.image_size}"
        if split is None:
            print(f"{head}  (no samples: data missing)")
            continue
        print(f"{head}  train={len(split.train)} from {split.train_source}  test={len(split.test)}")
        if cell.setting in ("few_shot", "few_normal"):
            for s in split.train:
                print(f"    {'anomalous' if s.label else 'normal   '}  {s.path}")
    if skipped:
        print(f"note: {skipped}")
    print(
        f"{len(cells)} cells (dry run: nothing was run, written or recorded). Relative paths are relative to the "
        f"current folder '{here}': data root '{root}', results '{Path(protocol.results_dir) / protocol.name}'"
    )
    if problems:
        raise PreflightError(problems)
    return 0


def _emit(text: str, out: str | None) -> int:
    """``text`` to the file ``out`` (its folder made), else to standard output."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text, encoding="utf-8")
        print(f"wrote {out}")
    else:
        sys.stdout.write(text)
    return 0


def _cmd_tables(args) -> int:
    from benchmark.reports import tables
    from benchmark.store import ResultStore

    store = ResultStore(args.results_dir, args.experiment)
    frame = store.frame()
    if frame["metric"].dropna().empty:
        raise BenchmarkError(f"{store.path}: no finished cells for experiment '{args.experiment}'")
    if args.metrics:
        metrics = tuple(args.metrics)
    elif args.style:
        metrics = tables.STYLES[args.style]
    else:
        metrics = tables.STYLES["mvfa"]
    recorded = set(frame["metric"].dropna())
    segmentation = tables.STYLES["segmentation"]
    if not args.metrics and not args.style and not set(metrics) <= recorded and set(segmentation) <= recorded:
        metrics = segmentation  # segmentation sets only: no image metrics to show

    if unknown := [m for m in metrics if m not in recorded]:
        raise BenchmarkError(f"--metrics: '{unknown[0]}' was not recorded (recorded: {sorted(recorded)})")
    caption = tables.caption_for(frame, args.experiment, metrics, std=args.std or args.format != "latex")
    if args.published and args.format != "csv" and not tables.has_published(tables.build(frame, metrics, True)[0]):
        raise BenchmarkError(
            f"--published: no published number matches a row of '{args.experiment}' (the papers report their "
            "methods on the BMAD and MedSAD-CLIP datasets in their settings; see results/published/README.md)"
        )
    ci = None
    if args.ci:
        from benchmark.reports.compare import load_entries, table_intervals

        ci = table_intervals(load_entries(args.results_dir, args.experiment), metrics)
    if args.efficiency:
        records = list(store.latest().values())
        text = tables.render_efficiency(records, args.format, tables.efficiency_caption(args.experiment, records))
    elif args.format == "latex":
        text = tables.render_latex(frame, metrics, caption, f"tab:{args.experiment}", args.published, args.std, ci)
    elif args.format == "markdown":
        text = tables.render_markdown(frame, metrics, caption, args.published, ci)
    else:
        text = tables.render_csv(frame, args.published)
    return _emit(text, args.out)


def _cmd_compare(args) -> int:
    """Tables with CIs and significance marks, and critical-difference diagrams, under EXPERIMENT/compare/."""
    from benchmark.reports import compare
    from benchmark.reports.figures import to_png

    if args.resamples < 100:
        raise BenchmarkError(f"--resamples: expected at least 100, got {args.resamples}")
    if not 0 < args.alpha < 1:
        raise BenchmarkError(f"--alpha: expected a level in (0, 1), got {args.alpha}")
    started = time.perf_counter()
    entries = compare.load_entries(args.results_dir, args.experiment)
    result = compare.compare(entries, args.metric, args.baseline, args.resamples, args.seed, args.alpha)
    out = Path(args.results_dir) / args.experiment / "compare"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt, suffix in (("markdown", "md"), ("latex", "tex"), ("csv", "csv")):
        path = out / f"{args.metric}.{suffix}"
        path.write_text(compare.render(result, args.experiment, fmt, args.resamples), encoding="utf-8")
        written.append(path)
    for group, test in result.ranks.items():
        fig = compare.cd_figure(test, f"{args.experiment}, {group}, {args.metric}")
        stem = out / f"cd_{args.metric}_{group.replace(', ', '_').replace(' ', '_').replace('=', '')}"
        fig.savefig(stem.with_suffix(".pdf"))
        stem.with_suffix(".png").write_bytes(to_png(fig))
        written += [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    sys.stdout.write(compare.render(result, args.experiment, args.format, args.resamples))
    logged = _log_analysis(args.results_dir, args.experiment, written, "compare", f"compare {args.metric}")
    print(f"wrote {', '.join(str(p) for p in written)} ({time.perf_counter() - started:.1f} s); {logged}")
    return 0


def _rerun_note(protocol, cells) -> str:
    """The line saying how many of ``cells`` finished before (computed again without ``--resume``); "" if none."""
    from benchmark.store import ResultStore

    store = ResultStore(protocol.results_dir, protocol.name)
    done = store.finished_hashes()
    again = sum(c.config_hash(protocol) in done for c in cells)
    if not again:
        return ""
    return (
        f"note: {again} of these {len(cells)} cells finished before ({store.path}): they are computed again and "
        "appended, and tables show their newest lines; --resume skips them"
    )


def _log_analysis(results_dir: str, experiment: str, files: list[Path], folder: str, what: str) -> str:
    """Log ``files`` under ``folder`` in an MLflow run of their own in the experiment, named for what they cover
    (``what`` and the finished cells they read): an analysis belongs to no one invocation's run. What was done,
    in words."""
    from benchmark.store import ResultStore
    from benchmark.tracking import Tracker, results_uri

    uri = results_uri(results_dir)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return f"no MLflow store at {uri}: nothing logged"
    tracker = Tracker(uri, experiment, Path(results_dir) / "mlartifacts" / experiment)
    cells = len(ResultStore(results_dir, experiment).finished_hashes())
    name = f"{what}: {experiment}, {cells} finished cells"
    run = tracker.start(name, {"analysis": folder, "cells": str(cells)}) if tracker.experiment_id else None
    for path in files:
        tracker.log_artifact(run, path, folder)
    tracker.end(run, "FINISHED")
    if run is None or tracker.behind:
        return f"not logged to MLflow ({tracker.behind or 'the experiment has no run'})"
    return f"logged to MLflow run '{name}' ({run}) under {folder}/"


def _cmd_report(args) -> int:
    from benchmark.reports.report import build_report

    if args.resamples < 100:
        raise BenchmarkError(f"--resamples: expected at least 100, got {args.resamples}")
    started = time.perf_counter()
    page, figures = build_report(args.results_dir, args.experiment, args.resamples)
    out = Path(args.out) if args.out else Path(args.results_dir) / args.experiment / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    folder = out.parent / f"{out.stem}_figures"
    folder.mkdir(exist_ok=True)
    for name, png in figures.items():
        (folder / name).write_bytes(png)
    logged = _log_analysis(args.results_dir, args.experiment, [out, *sorted(folder.iterdir())], "report", "report")
    took = time.perf_counter() - started
    print(f"wrote {out} ({len(page) / 1e6:.1f} MB, {len(figures)} figures, {took:.1f} s); {logged}")
    return 0


def _cmd_paper(args) -> int:
    from benchmark.reports import paper

    if args.coverage:
        sys.stdout.write(paper.render_coverage(paper.coverage(PROTOCOLS_DIR)))
        return 0
    if not args.paper or not args.table:
        raise BenchmarkError("paper-table: expected PAPER TABLE [--from EXPERIMENT[,...]] (or --coverage)")
    if args.delta and not args.experiments:
        raise BenchmarkError("paper-table: --delta needs --from EXPERIMENT[,...] (ours minus the paper's number)")
    table = paper.paper_table(args.paper, args.table, args.results_dir, args.experiments or [])
    if args.experiments and not any(c.ours is not None for c in table.cells.values()):
        raise BenchmarkError(
            f"{args.paper} {args.table}: {', '.join(args.experiments)} reproduce none of its "
            f"{sum(c.published is not None for c in table.cells.values())} "
            "numbers (no run matches a row's method, setting, dataset, metric and backbone); "
            "paper-table --coverage lists the protocols that do"
        )
    text = paper.render(table, args.format, args.delta)
    return _emit(text, args.out)


def _cmd_list(args) -> int:
    from benchmark.data.catalog import data_table, load_catalog
    from benchmark.method import METHODS

    if args.data_table:
        print(data_table(load_catalog()), end="")
        return 0
    print("methods:")
    for name in METHODS.names():
        cls = METHODS.get(name)
        print(f"  {name:14s} settings: {', '.join(sorted(cls.settings))}")
    for family in METHODS.families():
        print(
            f'  {family}:<Model>  any anomalib model (e.g. {family}:Patchcore; pip install -e ".[anomalib]"); '
            "settings: few_normal, few_shot, full_normal, supervised (one-class: the normal images only)"
        )
    print("datasets:")
    for spec in load_catalog().values():
        masks = "masks" if spec.masks else "image labels"
        masks += ", segmentation only, MedCLIPSeg layout" if spec.segmentation_only else ""
        synthetic = " (synthetic)" if spec.synthetic else ""
        print(f"  {spec.name:19s} {spec.folder:20s} organ '{spec.organ}', {masks}{synthetic}")
    print("protocols:")
    for path in sorted(PROTOCOLS_DIR.glob("*.yaml")):
        print(f"  {path.relative_to(PROTOCOLS_DIR.parent)}")
    return 0


def _cmd_synth(args) -> int:
    from benchmark.data.catalog import load_catalog
    from benchmark.data.synthetic import SYNTHETIC_SETS, SyntheticConfig, write_synthetic

    catalog = load_catalog()
    for name in SYNTHETIC_SETS:
        print(write_synthetic(Path(args.out), catalog[name], SyntheticConfig(seed=args.seed)))
    return 0


def _cmd_fetch(args) -> int:
    from benchmark.backbones.weights import fetch_checkpoint, fetch_weights
    from benchmark.method import METHODS

    if args.model in METHODS:  # a method's authors' checkpoint, or where it is published
        print(fetch_checkpoint(METHODS.get(args.model), args.tag))
    else:
        print(fetch_weights(args.model, args.tag))
    return 0


def _cmd_fetch_data(args) -> int:
    from benchmark.data.catalog import load_catalog
    from benchmark.data.fetching import fetch_data
    from benchmark.data.verify import verify

    spec = _card(load_catalog([Path(d) for d in args.cards]), args.name)
    target = fetch_data(spec, Path(args.to))
    there = Path(args.to) / spec.folder
    print(f"{spec.name}: unpacked into {target}" if target else f"{spec.name}: '{there}' is there already (not "
          "downloaded again; remove it to fetch again)")  # fmt: skip
    check = verify(Path(args.to), spec)
    print(check.line())
    return 0 if check.ok else 2


def _card(catalog, name: str):
    same = [n for n in catalog if n.lower() == name.lower()]
    if name not in catalog and len(same) == 1:
        return catalog[same[0]]
    if name not in catalog:
        close = difflib.get_close_matches(name, list(catalog), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (expected one of {', '.join(catalog)})"
        raise BenchmarkError(f"no dataset card named '{name}'{hint}")
    return catalog[name]


def _cmd_verify(args) -> int:
    from benchmark.data.catalog import load_catalog
    from benchmark.data.locks import check_lock, read_lock, write_lock
    from benchmark.data.verify import verify

    catalog = load_catalog([Path(d) for d in args.cards])
    if args.all == bool(args.names):
        raise BenchmarkError("verify-data: name one or more datasets, or --all")
    specs = list(catalog.values()) if args.all else [_card(catalog, n) for n in args.names]
    into_folder = args.lock is not None and (args.lock.endswith(("/", os.sep)) or Path(args.lock or ".").is_dir())
    if len(specs) > 1 and (args.against or (args.lock and not into_folder)):
        raise BenchmarkError("verify-data: --against LOCK and --lock FILE take one dataset (--lock FOLDER/ takes many)")
    if args.workers < 1:
        raise BenchmarkError(f"verify-data: --workers must be 1 or more, got {args.workers}")
    root, progress, failed = Path(args.data_root), sys.stderr.isatty(), False
    if args.against:
        read_lock(args.against, specs[0])  # a bad lock file: said before any file is hashed
    for spec in specs:
        check = verify(root, spec, args.deep, args.workers, progress)
        print(check.line(), flush=True)
        failed |= not check.ok
        if args.against and (root / spec.folder).is_dir():
            lock, differences = check_lock(root, spec, args.against, args.workers)
            if differences:
                print(f"{spec.name}: differs from lock {lock.label()}: {differences.counted()}")
                print("\n".join(differences.lines()))
                failed = True
            else:
                print(f"{spec.name}: every file as in lock {lock.label()} ({len(lock.files)} files)")
        if args.lock is not None and (root / spec.folder).is_dir():
            out = Path(args.lock or ".") / f"{spec.name}.lock.json" if into_folder else Path(args.lock)
            snap = write_lock(root, spec, out, args.workers, progress)
            print(f"{spec.name}: wrote lock {out} ({len(snap.files)} files, test content hash "
                  f"{snap.test_content_hash[:12]})")  # fmt: skip
    return 2 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {
        "run": _cmd_run,
        "sync": _cmd_sync,
        "tables": _cmd_tables,
        "compare": _cmd_compare,
        "report": _cmd_report,
        "paper-table": _cmd_paper,
        "list": _cmd_list,
        "synth": _cmd_synth,
        "fetch-weights": _cmd_fetch,
        "fetch-data": _cmd_fetch_data,
        "verify-data": _cmd_verify,
    }[args.command]
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return handler(args)
    except BenchmarkError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted) as exc:
        name, code = ("SIGTERM", Interrupted.exit_code) if isinstance(exc, Interrupted) else ("SIGINT", 130)
        print(
            f"interrupted ({name}): finished cells are recorded, running ones are not; run the same command "
            "with --resume to go on",
            file=sys.stderr,
        )
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(_signum, _frame) -> None:
    raise Interrupted()
