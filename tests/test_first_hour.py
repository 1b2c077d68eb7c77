"""What a new user meets: a run that talks, errors that name every problem, figures and MLflow views people
read, and ``--published`` that says when nothing matches."""

import argparse
import dataclasses
import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from benchmark.cli import _parser, main
from benchmark.store import ResultStore


def test_a_run_talks_and_ends_with_a_summary_and_the_next_commands(write_protocol, tmp_path, capsys):
    path = write_protocol(
        methods={"winclip": {"scales": [2]}, "mvfa": {"layers": [1, 2, 3, 4], "epochs": 2, "progress": False}},
        settings=[{"name": "few_normal", "shots": [2]}, {"name": "few_shot", "shots": [2]}],
        datasets=["SynthBrain"],
    )
    assert main(["run", str(path), "--methods", "winclip", "--seeds", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    # mvfa does not support few_normal, but it was not asked for: no note about it
    assert not any(line.startswith("note:") for line in out)
    cell = next(line for line in out if line.startswith("[1/2] winclip-SynthBrain-few_normal-k2-seed0: "))
    rec = next(r for r in ResultStore(tmp_path / "results", "t").latest().values() if r["setting"] == "few_normal")
    best = max(range(1, 10), key=lambda t: rec["metrics"][f"dice_t{t / 10:g}"])
    assert f"dice@0.5={rec['metrics']['dice']:.3f} (oracle {rec['metrics']['dice_oracle']:.3f} @{best / 10:g})" in cell
    # WinCLIP+ sees only the normal images: its few-shot cell is its few-normal-shot cell, computed once
    copy = next(line for line in out if line.startswith("[2/2] winclip-SynthBrain-few_shot-k2-seed0: "))
    assert copy.endswith("[same result as winclip-SynthBrain-few_normal-k2-seed0: not computed again]")
    both = ResultStore(tmp_path / "results", "t").latest().values()
    shot = next(r for r in both if r["setting"] == "few_shot")
    assert shot["same_result_as"] == {"cell": rec["cell_id"], "setting": "few_normal", "shots": 2, "method": "winclip"}
    assert shot["metrics"] == rec["metrics"] and shot["duration_s"] == 0
    assert shot["params"]["fit"] == f"same result as {rec['cell_id']}" and shot["params"]["train_count"] == 4
    assert rec["params"]["segmentation_images"] == "anomalous"  # a set with normal test images (DSC rule)
    manifest = json.loads((tmp_path / "results" / "t" / shot["cell_id"] / "manifest.json").read_text())
    assert manifest["setting"] == "few_shot" and len(manifest["train"]) == 4  # its own files, 2 normal 2 anomalous
    # computed on its own, the few-shot cell gives the very numbers recorded for it
    alone = ["run", str(path), "--methods", "winclip", "--seeds", "0", "--settings", "few_shot"]
    assert main([*alone, "--results-dir", str(tmp_path / "alone")]) == 0
    (computed,) = ResultStore(tmp_path / "alone", "t").latest().values()
    assert computed["metrics"] == shot["metrics"] and "same_result_as" not in computed
    assert main(["tables", "t", "--results-dir", str(tmp_path / "results"), "--metrics", "image_auroc"]) == 0
    assert "| WinCLIP+ (few-shot, K=2) [same result as few-normal-shot, K=2] |" in capsys.readouterr().out
    # the closing summary: a line per method variant and setting, means over its cells, time in seconds
    header = next(i for i, line in enumerate(out) if line.startswith("method ") and "dice_oracle (mean)" in line)
    assert out[header].split()[-2:] == ["time", "(s)"]
    assert out[header + 2].split()[:5] == ["WinCLIP+", "few_normal", "K=2", "1", f"{rec['metrics']['image_auroc']:.3f}"]
    assert out[header + 3].split()[:3] == ["WinCLIP+", "few_shot", "K=2"] and out[header + 3].split()[-1] == "0.0"
    following = out[out.index("next:") + 1 :]
    assert following[0].strip().startswith(f"python -m benchmark tables t --results-dir {tmp_path / 'results'}")
    assert following[1].strip().startswith(f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'results'}")
    experiment = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}").get_experiment_by_name("t")
    view = f"# then open http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_"
    assert view in following[1]  # MLflow 3.10 and later open GenAI pages unless the address asks for the runs

    assert main(["run", str(path), "--dry-run"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "mvfa: few_normal" in notes[0]

    # run again without --resume: it says that the finished cells are computed again
    assert main(["run", str(path), "--methods", "winclip", "--seeds", "0", "--settings", "few_normal"]) == 0
    again = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert again == [
        f"note: 1 of these 1 cells finished before ({tmp_path / 'results' / 't' / 'results.jsonl'}): they are computed "
        "again and appended, and tables show their newest lines; --resume skips them"
    ]


def test_run_narrows_to_settings_and_shots(write_protocol, capsys):
    path = write_protocol(
        methods={"winclip": {"scales": [2]}},
        settings=["zero_shot_loo", {"name": "few_normal", "shots": [1, 2]}, {"name": "few_shot", "shots": [2]}],
        datasets=["SynthBrain", "SynthLiver"],
    )

    def cells(*flags: str) -> list[str]:
        assert main(["run", str(path), "--dry-run", "--seeds", "0", "--datasets", "SynthBrain", *flags]) == 0
        return [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("winclip-")]

    assert cells("--settings", "few_normal") == ["winclip-SynthBrain-few_normal-k1-seed0",
                                                 "winclip-SynthBrain-few_normal-k2-seed0"]  # fmt: skip
    assert cells("--shots", "2") == ["winclip-SynthBrain-few_normal-k2-seed0", "winclip-SynthBrain-few_shot-k2-seed0"]
    assert cells("--settings", "few_normal,zero_shot_loo", "--shots", "1") == ["winclip-SynthBrain-few_normal-k1-seed0"]
    assert main(["run", str(path), "--settings", "few_shots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --settings: 'few_shots' is not in the protocol (it lists zero_shot_loo, few_normal, few_shot)"
    ]
    assert main(["run", str(path), "--settings", "few_shot", "--shots", "1"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "error: --shots: 1 is not a K (or fraction) of the settings picked (they list 2)"
    )


def test_run_suggests_the_protocol_file(capsys):
    assert main(["run", "demo"]) == 2
    assert (
        capsys.readouterr().err.strip() == "error: demo: protocol file not found; did you mean 'protocols/demo.yaml'?"
    )


def test_fetch_weights_offline_fails_at_once_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    assert main(["fetch-weights", "ViT-B-16", "openai"]) == 2
    err = capsys.readouterr().err.splitlines()
    # the one connection check answered before any download was tried (no hub retries, no traceback)
    assert len(err) == 1 and err[0].startswith("error: fetch-weights ViT-B-16 / openai: no network to download from")
    assert "127.0.0.1:9 cannot be reached within 3 s" in err[0]


def test_dry_run_without_the_data_writes_nothing(write_protocol, tmp_path, capsys, monkeypatch):
    """Not even the synthetic data a real run writes first; it says what paths are relative to."""
    monkeypatch.chdir(tmp_path)
    path = write_protocol(data_root="data/synthetic", results_dir="results")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert "data: 'SynthBrain' is synthetic and not written yet" in out
    assert "winclip-SynthBrain-few_normal-k2-seed0" in out and "(no samples: data missing)" in out
    assert f"relative to the current folder '{tmp_path}'" in out


def test_every_argument_has_help():
    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.dest} has no help text"


def test_figures_have_the_expected_panels(tmp_path):
    import matplotlib

    from benchmark.reports.figures import (
        Curve,
        SampleView,
        roc_figure,
        sample_panels,
        samples_figure,
        sweep_figure,
        to_png,
    )

    mask = np.zeros((32, 32), bool)
    mask[8:16, 8:16] = True
    amap = np.where(mask, 0.9, 0.2)
    samples = [
        SampleView("a.png", np.zeros((32, 32, 3)), np.zeros((32, 32), bool), np.full((32, 32), 0.2), 0.1, 0),
        SampleView("b.png", np.zeros((32, 32, 3)), mask, amap, 0.8, 1),
    ]
    fig = samples_figure(samples, "t", 0.5)
    mosaic, colorbar = fig.axes  # the panels composed into one image, and the maps' shared colour bar
    assert colorbar.get_ylabel().startswith("anomaly map")
    assert mosaic.images[0].get_array().shape == (2 * (32 + 3 * 2), 3 * (32 + 2) - 2, 3)  # 2 rows, 3 panels
    texts = [t.get_text() for t in mosaic.texts]
    assert [t for t in texts if "score" in t] == ["normal\nscore 0.100", "anomalous\nscore 0.800"]
    assert texts[:3] == ["a.png", "anomaly map", "map >= 0.5 (red), truth (green)"]
    green = np.array([0.0, 1.0, 0.0])
    normal = sample_panels(samples[0], 0.5, 0.2, 0.9, uncertainty=False)
    assert len(normal) == 3 and not any((p == green).all(-1).any() for p in normal)  # no truth to outline
    image, overlay, predicted = sample_panels(samples[1], 0.5, 0.2, 0.9, uncertainty=False)
    edge = mask & ~np.pad(mask, 1)[2:, 1:-1] | mask & ~np.pad(mask, 1)[:-2, 1:-1]
    edge |= mask & ~np.pad(mask, 1)[1:-1, 2:] | mask & ~np.pad(mask, 1)[1:-1, :-2]
    assert all(((p == green).all(-1) == edge).all() for p in (image, overlay, predicted))  # truth outlined
    red = (predicted == [0.6, 0.0, 0.0]).all(-1)  # map >= 0.5 in red at alpha 0.6 over the black image
    assert red.sum() == mask.sum() - edge.sum() and not red[~mask].any()
    assert np.allclose(overlay[0, 0], 0.5 * np.array(matplotlib.colormaps["jet"](0.0)[:3]))  # map at the scale's low
    png = tmp_path / "s.png"
    png.write_bytes(to_png(fig))
    assert Image.open(png).size[0] > 400
    rows = [{"threshold": t / 10, "image_accuracy": 0.5, "dice": t / 20} for t in range(1, 10)]
    title = "threshold sweep | medclipseg-SynthRetina-few_shot-k2-seed0 | backbone tiny-vit / random-init (seed 0)"
    sweep = sweep_figure(rows, title, 0.5)
    assert [line.get_label() for line in sweep.axes[0].get_lines()][:2] == ["Dice", "accuracy"]
    assert sweep.axes[0].get_ylabel() == "Dice / image accuracy"
    assert _inside(sweep, sweep._suptitle)  # a cell's long title is wrapped, not cut at the sides
    # a method with uncertainty maps: their column has a colour bar of its own; the rows say why they were picked
    unsure = [dataclasses.replace(v, uncertainty=np.full((32, 32), 0.3), note="highest score") for v in samples]
    fig = samples_figure(unsure, "t", 0.5)
    mosaic, maps, uncertainty = fig.axes
    assert maps.get_ylabel().startswith("anomaly map") and uncertainty.get_ylabel() == "uncertainty (entropy, nats)"
    assert uncertainty.get_ylim() == pytest.approx((0.0, np.log(2)))
    assert next(t.get_text() for t in mosaic.texts if "score" in t.get_text()) == "normal, highest score\nscore 0.100"
    assert all(_inside(fig, a) for a in fig.axes[1:])
    roc = roc_figure(
        {"image": Curve(np.r_[0, 1.0], np.r_[0, 1.0], 0.5), "pixel": Curve(np.r_[0, 1.0], np.r_[0, 1.0], 0.5)}, "t"
    )
    assert len(roc.axes) == 2 and roc.axes[1].get_legend().get_texts()[0].get_text() == "pixel (AUROC 0.500)"


def _inside(fig, artist) -> bool:
    """Whether ``artist`` (a text or an axes with its labels) is drawn whole within the figure."""
    fig.canvas.draw()
    box = artist.get_tightbbox(fig.canvas.get_renderer())
    return box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1


class _EmptyMaps:
    """A method that finds nothing anywhere: empty maps, image scores in the order of the images."""

    name = "empty_maps"

    def __init__(self) -> None:
        self.seen = 0

    def predict(self, batch):
        import torch

        from benchmark.method import Prediction

        n, size = batch.images.shape[0], batch.images.shape[-1]
        self.seen += n
        scores = torch.arange(self.seen - n, self.seen, dtype=torch.float32) / 100
        return Prediction(scores, torch.zeros(n, size, size))


def test_per_image_dsc_counts_anomalous_images_and_the_figure_shows_the_telling_ones(synth_root, catalog):
    from benchmark.data.splits import make_split
    from benchmark.job import evaluate

    test = make_split(synth_root, catalog, "SynthBrain", "few_normal", 2, 0).test
    ev = evaluate(_EmptyMaps(), test, True, {"dice": 0.5, "accuracy": 0.5}, (0.5,), 32, 4, figure_samples=4)
    # on a set with normal test images, empty maps score 0, not the share of normal images
    assert ev.metrics["dice_per_image"] == 0.0 and ev.metrics["nsd"] == 0.0
    names, labels = list(ev.evidence.names), ev.evidence.labels
    normal = [n for n, label in zip(names, labels, strict=True) if not label]
    anomalous = [n for n, label in zip(names, labels, strict=True) if label]
    # the highest-scored normal images, then the lowest- and the highest-scored anomalous one (scores rise in order)
    assert [(v.name, v.label, v.note) for v in ev.figure] == [
        (normal[-1], 0, "highest score"), (normal[-2], 0, "highest score"),
        (anomalous[0], 1, "lowest score"), (anomalous[-1], 1, "highest score"),
    ]  # fmt: skip
    assert list(ev.evidence.examples["names"]) == [*normal[:2], *anomalous[:2]]  # every method's: the same images


def test_mlflow_shows_effective_params_curves_and_one_sweep_plot(write_protocol, tmp_path):
    path = write_protocol(
        methods={"mvfa": {"mode": "paper", "layers": [1, 2, 3, 4], "epochs": 3, "progress": False}},
        settings=[{"name": "few_shot", "shots": [2]}],
        datasets=["SynthBrain"],
        cell_figures=True,
    )
    assert main(["run", str(path)]) == 0
    rec = next(iter(ResultStore(tmp_path / "results", "t").latest().values()))
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("t")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    run = client.get_run(rec["mlflow_run_id"])
    params = run.data.params
    assert params["param_lr"] == "0.001" and params["param_batch_size"] == "16"  # paper mode's values, not None
    assert params["param_bottleneck"] == "64"  # tiny-vit's text width, not the placeholder 0
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [0, 1, 2] and len(rec["history"]["train_loss"]) == 3
    assert not any(k.startswith("dice_t") for k in run.data.metrics) and "dice_t0.5" in rec["metrics"]
    assert {"pixel_aupro", "pixel_aupr", "image_aupr", "image_f1_max", "dice_oracle"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"samples.png", "sweep.png", "roc.png", "sweep.csv"} <= artifacts


def test_published_without_any_match_says_so(tmp_path, capsys):
    store = ResultStore(tmp_path, "synthetic")
    store.append(
        {
            "config_hash": "a", "status": "finished", "method": "winclip", "variant": "WinCLIP",
            "setting": "few_normal", "shots": 2, "seed": 0, "dataset": "SynthBrain", "backbone": "bb", "threshold": 0.5,
            "metrics": {"image_auroc": 0.5, "pixel_auroc": 0.5},
        }
    )  # fmt: skip
    assert main(["tables", "synthetic", "--results-dir", str(tmp_path), "--published"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: --published: no published number matches a row of 'synthetic'")


@pytest.mark.parametrize("fmt", ["latex", "markdown"])
def test_tables_of_a_run_render(write_protocol, tmp_path, capsys, fmt):
    assert main(["run", str(write_protocol())]) == 0
    capsys.readouterr()
    assert main(["tables", "t", "--results-dir", str(tmp_path / "results"), "--format", fmt, "--std"]) == 0
    assert "WinCLIP+" in capsys.readouterr().out


def test_the_summary_table_stays_aligned_when_every_cell_failed():
    from benchmark.runner import summary_table

    entry = ("winclip", None, None)  # a method entry, its prompt design and precision (runner._row_fields)
    failed = [{"cell": f"winclip-SynthBrain-seed{i}", "entry": entry, "method": None, "setting": "few_normal K=2",
               "error": "out of memory", "seconds": 1.5} for i in range(2)]  # fmt: skip
    lines = summary_table(failed).splitlines()
    header, rule = lines[0], lines[1]
    assert header.split() == ["method", "setting", "cells", "time", "(s)"] and len(rule.split()) == 4
    assert lines[2].split() == ["winclip", "few_normal", "K=2", "2", "(2", "failed)", "3.0"]
    done = {"cell": "winclip-SynthLiver-seed0", "entry": entry, "method": "WinCLIP+", "setting": "few_normal K=2"}
    both = summary_table([*failed, {**done, "image_auroc": 0.5, "seconds": 2.0}, {**done, "image_auroc": 0.7,
                                                                              "seconds": 2.0}])  # fmt: skip
    assert both.splitlines()[0].split() == ["method", "setting", "cells", "image_auroc", "(mean)", "time", "(s)"]
    # the failed cells and the finished ones of an entry share its line, named for the variant that finished
    assert both.splitlines()[2:] == [both.splitlines()[2]]
    assert both.splitlines()[2].split() == ["WinCLIP+", "few_normal", "K=2", "4", "(2", "failed)", "0.600", "7.0"]
