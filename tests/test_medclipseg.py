import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SMALL, relabel_backbone

from benchmark.cli import main
from benchmark.data.splits import make_split
from benchmark.data.synthetic import write_segmentation_dataset
from benchmark.errors import BenchmarkError
from benchmark.metrics import CalibrationMetrics, SegmentationMetrics
from benchmark.store import ResultStore
from methods.models.medclipseg import ProbabilisticCrossAttention, PVLAdapter, ScaleBlock, soft_contrastive

TINY = {"model": "tiny-vit-bert", "weights": "random-init", "seed": 0}  # UniMedCLIP's shape: BERT text tower
FAST = {"layers": [1, 2], "adapter_dim": 16, "epochs": 1, "batch_size": 8, "samples": 2, "progress": False}


def test_parameter_count_at_the_default_configuration():
    # ViT-B-16: vision width 768, text width 512, joint space 512; 10 PVL adapters of width 256
    adapters = 10 * sum(p.numel() for p in PVLAdapter(768, 512, 256).parameters())
    head = 3 * (512 * 512 + 512)
    upscale = 2 * sum(p.numel() for p in ScaleBlock(512).parameters())
    # per adapter: 4 bias-free projections; 2 attentions of q, out (256 -> 256), k, v (256 -> 512), 2 LayerNorms, gate
    attention = 2 * (256 * 256 + 256) + 2 * (256 * 512 + 512) + 2 * 2 * 256 + 1
    assert adapters == 10 * (2 * (768 + 512) * 256 + 2 * attention)
    assert upscale == 2 * (512 * 512 * 4 + 512 + 512 * 9 + 2 * 512)
    assert adapters + head + upscale == 17_366_548


def test_key_uncertainty_lowers_attention_and_values_are_sampled():
    torch.manual_seed(0)
    attn = ProbabilisticCrossAttention(8, beta=2.35)
    query, context = torch.randn(1, 3, 8), torch.randn(1, 5, 8)
    torch.manual_seed(1)
    a = attn(query, context)
    torch.manual_seed(1)
    assert torch.equal(a, attn(query, context))  # the same noise, the same output
    assert (attn(query, context) - a).abs().max() > 1e-4  # fresh noise: another sample
    with torch.no_grad():  # the gate at 0 mixes half the attention into the query
        attn.gate.fill_(-30.0)
    torch.testing.assert_close(attn(query, context), query)


def test_soft_contrastive_is_smallest_for_matching_pairs():
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1) * 3
    matching = text[:, None, :].expand(4, 9, 16)
    shuffled = text[[1, 2, 3, 0], None, :].expand(4, 9, 16)
    assert soft_contrastive(matching, text, 0.2) < soft_contrastive(shuffled, text, 0.2)


def test_dsc_and_nsd_equal_a_direct_computation_on_known_masks():
    """Per image: Dice from the pixel counts; NSD at 2 px is 1 when every surface point lies within 2 px of
    the other surface (a 1-pixel shift), 0 when none does (10 px apart), in between otherwise, and follows
    MedCLIPSeg's rules for empty masks."""
    truth = torch.zeros(5, 32, 32, dtype=torch.bool)
    maps = torch.zeros(5, 32, 32)
    truth[0, 8:20, 8:20] = True
    maps[0, 9:21, 8:20] = 0.9  # shifted by one pixel
    truth[1, 2:8, 2:8] = True
    maps[1, 18:24, 18:24] = 0.7  # 10 px apart: no surface point within 2 px
    truth[2, 4:12, 4:12] = True
    maps[2, 8:20, 8:20] = 0.6  # partly overlapping
    maps[3, 3, 3] = 0.8  # an empty mask, one false pixel
    metrics = SegmentationMetrics(0.5, tolerance=2.0)  # image 4: both empty
    metrics.update(maps, truth)
    pred = (maps >= 0.5).numpy()
    for i in range(3):
        inter = (pred[i] & truth[i].numpy()).sum()
        assert metrics.dice[i] == pytest.approx(2 * inter / (pred[i].sum() + truth[i].sum().item()))
    assert metrics.dice[1] == 0.0 and metrics.nsd[:2] == [pytest.approx(1.0), pytest.approx(0.0)]
    assert 0 < metrics.nsd[2] < 1
    assert metrics.dice[3:] == [0.0, 1.0] and metrics.nsd[3:] == [0.0, 1.0]  # MedCLIPSeg's empty-mask rules
    assert metrics.mean_dice() == pytest.approx(np.mean(metrics.dice))


def test_native_size_scoring_upsamples_the_binary_prediction_as_cv2_nearest():
    """MedCLIPSeg's eval: the 0/255 prediction saved at the model's size, ``cv2.resize(..., INTER_NEAREST)`` to
    the ground truth's size, then DSC and NSD there."""
    import cv2

    torch.manual_seed(0)
    maps = torch.rand(2, 32, 32)
    native = [torch.rand(75, 50) > 0.6, torch.zeros(40, 96, dtype=torch.bool)]
    metrics = SegmentationMetrics(0.5)
    metrics.update(maps, torch.zeros(2, 32, 32, dtype=torch.bool), native)
    for i, truth in enumerate(native):
        saved = ((maps[i] >= 0.5).numpy() * 255).astype(np.uint8)
        pred = cv2.resize(saved, truth.shape[::-1], interpolation=cv2.INTER_NEAREST) > 127
        t = truth.numpy()
        expected = 2 * (pred & t).sum() / (pred.sum() + t.sum()) if pred.sum() + t.sum() else 1.0
        assert metrics.dice[i] == pytest.approx(expected, abs=1e-12)
    assert metrics.nsd[1] == 0.0  # an empty mask under a non-empty prediction


def test_calibration_error_of_a_calibrated_and_a_confident_map():
    truth = torch.zeros(1, 10, 10, dtype=torch.bool)
    truth[0, :3] = True  # 30 % positive
    calibrated, confident = CalibrationMetrics(), CalibrationMetrics()
    calibrated.update(torch.full((1, 10, 10), 0.3), truth)
    confident.update(torch.full((1, 10, 10), 0.95), truth, torch.full((1, 10, 10), 0.2))
    assert calibrated.ece() == pytest.approx(0.0, abs=1e-6) and confident.ece() == pytest.approx(0.65)
    assert calibrated.uncertainty_mean() is None and confident.uncertainty_mean() == pytest.approx(0.2)


def test_validation_thresholds_on_a_segmentation_set_need_its_lesions_only(seg_root, catalog):
    """A segmentation set's validation images all hold lesions: enough to pick a Dice threshold."""
    split = make_split(seg_root, catalog, "SynthBrainSeg", "data_fraction", 50, 0, need_valid=True)
    assert split.valid and {s.label for s in split.valid} == {1}
    with pytest.raises(BenchmarkError, match="validation is not available with domain_generalization"):
        make_split(seg_root, catalog, "SynthLiverSeg", "domain_generalization", None, 0, ("SynthBrainSeg",), None, True)


def test_data_fraction_uses_exactly_the_listed_images(seg_root, catalog):
    prompts = seg_root / "SynthBrainSeg" / "Prompts_Folder"
    for p in (10, 25, 50):
        split = make_split(seg_root, catalog, "SynthBrainSeg", "data_fraction", p, 0)
        listed = pd.read_excel(prompts / f"Train_text_{p}.xlsx")
        assert sorted(s.path.rsplit("/", 1)[1] for s in split.train) == sorted(listed["Image"])
        assert [s.text for s in sorted(split.train, key=lambda s: s.path)] == [
            t.strip() for _, t in sorted(zip(listed["Image"], listed["Description"], strict=True))
        ]
        valid = pd.read_excel(prompts / f"Val_text_{p}.xlsx")
        assert sorted(s.path.rsplit("/", 1)[1] for s in split.valid) == sorted(valid["Image"])
    full = make_split(seg_root, catalog, "SynthBrainSeg", "data_fraction", 100, 0)
    assert len(full.train) == len(pd.read_excel(prompts / "Train_text.xlsx"))
    design = make_split(seg_root, catalog, "SynthBrainSeg", "supervised", None, 0, design="contradictory")
    assert all(s.text.startswith("The brain appears normal, yet") for s in design.test)


def test_cells_train_predict_and_log_uncertainty_without_image_metrics(write_protocol, seg_root, tmp_path):
    """Both MedCLIPSeg settings through ``run`` on segmentation-only sets: pixel metrics, per-image DSC and
    NSD, calibration and uncertainty are recorded, image metrics are absent (not NaN), the uncertainty map is
    an artifact, and the out-of-domain cell trained on the source set alone."""
    path = write_protocol(
        data_root=str(seg_root),
        datasets=["SynthBrainSeg", "SynthLiverSeg"],
        settings=[{"name": "data_fraction", "fractions": [50]},
                  {"name": "domain_generalization", "source": "SynthBrainSeg"}],
        backbone=TINY,
        methods={"medclipseg": FAST},
    )  # fmt: skip
    assert main(["run", str(path), "--save-predictions"]) == 0
    store = ResultStore(tmp_path / "results", "t")
    latest = store.latest()
    assert len(latest) == 4 and all(r["status"] == "finished" for r in latest.values())
    for rec in latest.values():
        metrics = rec["metrics"]
        assert not any(k.startswith("image_") for k in metrics)
        assert {"pixel_auroc", "dice", "dice_per_image", "nsd", "pixel_ece", "uncertainty_mean"} <= set(metrics)
        assert all(np.isfinite(v) for v in metrics.values())
        assert 0 < metrics["uncertainty_mean"] <= np.log(2)
        predictions = np.load(store.dir / rec["cell_id"] / "predictions.npz")
        assert predictions["uncertainty"].shape == predictions["maps"].shape
        evidence = np.load(store.dir / rec["cell_id"] / "evidence.npz")  # logged to MLflow with the figures
        assert evidence["example_uncertainty"].shape == evidence["example_maps"].shape
    ood = next(
        r for r in latest.values() if r["setting"] == "domain_generalization" and r["dataset"] == "SynthLiverSeg"
    )
    manifest = json.loads((store.dir / ood["cell_id"] / "manifest.json").read_text())
    assert all(s["path"].startswith("SynthBrainSeg/") for s in manifest["train"])
    # statistics and the report on sets without normal images: Dice is resampled in one stratum; image
    # metrics are refused in one line; the report leaves them out
    results = ["--results-dir", str(tmp_path / "results")]
    assert main(["compare", "t", "--metric", "dice", "--resamples", "100", *results]) == 0
    assert main(["compare", "t", *results]) == 2
    assert main(["report", "t", "--resamples", "100", *results]) == 0


def test_an_in_domain_generalisation_cell_is_the_full_data_fraction_cell(write_protocol, seg_root, catalog):
    """MedCLIPSeg reads the data a setting brings, not its name: trained and tested on the same files, its
    in-domain generalisation cell and its 100 % data-fraction cell compute one result; the out-of-domain cell
    and another fraction do not."""
    from benchmark.cells import expand
    from benchmark.preflight import cell_split
    from benchmark.protocol import load_protocol
    from benchmark.runner import result_identity

    settings = [
        {"name": "data_fraction", "fractions": [50, 100]},
        {"name": "domain_generalization", "source": "SynthBrainSeg"},
    ]
    path = write_protocol(
        data_root=str(seg_root), datasets=["SynthBrainSeg", "SynthLiverSeg"], backbone=TINY, settings=settings,
        methods={"medclipseg": FAST},
    )  # fmt: skip
    protocol = load_protocol(path)
    cells = {c.cell_id: c for c in expand(protocol, catalog)}
    identity = {i: result_identity(c, cell_split(c, protocol, catalog, seg_root), False) for i, c in cells.items()}
    same = {frozenset(a for a in identity if identity[a] == identity[b]) for b in identity}
    assert {len(group) for group in same} == {1, 2}
    (pair,) = [group for group in same if len(group) == 2]
    assert pair == {
        "medclipseg-SynthBrainSeg-data_fraction-p100-seed0",
        "medclipseg-SynthBrainSeg-domain_generalization-from-SynthBrainSeg-seed0",
    }


def test_native_evaluation_size_is_recorded_and_changes_only_dsc_and_nsd(write_protocol, seg_root, tmp_path, capsys):
    common = {"data_root": str(seg_root), "datasets": ["SynthBrainSeg"], "backbone": TINY,
              "settings": [{"name": "data_fraction", "fractions": [50]}], "methods": {"medclipseg": FAST}}  # fmt: skip
    for size in ("model", "native"):
        assert main(["run", str(write_protocol(name=size, evaluation_size=size, **common))]) == 0
    model, native = (next(iter(ResultStore(tmp_path / "results", n).latest().values())) for n in ("model", "native"))
    assert native["evaluation_size"] == "native" and model["evaluation_size"] == "model"
    assert native["config_hash"] != model["config_hash"]
    for key in ("pixel_auroc", "dice"):  # the same model and noise: pixel metrics at the model's size agree
        assert native["metrics"][key] == model["metrics"][key]
    assert (native["metrics"]["dice_per_image"], native["metrics"]["nsd"]) != (
        model["metrics"]["dice_per_image"], model["metrics"]["nsd"])  # fmt: skip
    capsys.readouterr()
    assert main(["tables", "native", "--results-dir", str(tmp_path / "results")]) == 0
    assert "DSC and NSD: at each mask's native size" in capsys.readouterr().out
    assert main(["run", str(write_protocol(name="bad", evaluation_size="mask", **common))]) == 2
    err = capsys.readouterr().err
    assert "evaluation_size: expected one of model, native, got 'mask'" in err and err.count("\n") == 1


def test_paper_table_averages_the_six_efficiency_sets(write_protocol, tmp_path, catalog, capsys):
    root = tmp_path / "medclipseg"
    sets = ("BUSI", "BTMRI", "ISIC", "Kvasir", "Covid19", "EUS")
    for name in sets:  # the synthetic brain set written under each efficiency set's folder
        write_segmentation_dataset(
            root, dataclasses.replace(catalog["SynthBrainSeg"], folder=catalog[name].folder), SMALL
        )
    path = write_protocol(name="eff", data_root=str(root), datasets=list(sets), backbone=TINY,
                          settings=[{"name": "data_fraction", "fractions": [10]}],
                          methods={"medclipseg": {**FAST, "image_size": 32}})  # fmt: skip
    assert main(["run", str(path)]) == 0
    ours = [r["metrics"]["dice_per_image"] for r in ResultStore(tmp_path / "results", "eff").latest().values()]
    capsys.readouterr()
    args = [
        "paper-table",
        "medclipseg",
        "README: Data-Efficiency",
        "--from",
        "eff",
        "--results-dir",
        str(tmp_path / "results"),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("| Method")).strip("|").split("|")]
    group = lines.index(next(line for line in lines if line.startswith("| *data_fraction_10*")))

    def cells(name: str) -> list[str]:
        row = next(line for line in lines[group:] if line.strip("|").split("|")[0].strip() == name)
        return [c.strip().replace("**", "") for c in row.strip("|").split("|")]

    # a tiny BERT-tower backbone is not UniMedCLIP: its own row, the README's number stays copied
    column = header.index("avg_efficiency_sets DSC")
    assert cells("MedCLIPSeg")[column] == "81.10†"
    assert cells("MedCLIPSeg (ours, on tiny-vit-bert / random-init)")[column] == f"{np.mean(ours) * 100:.2f}"
    assert "which used UniMedCLIP-ViT-B-16 / unimedclip" in lines[0]
    # the same records as on UniMedCLIP: in place, one seed, no ± std; and tables --published beside them
    relabel_backbone(tmp_path / "results", "eff", "eff_unimed", "UniMedCLIP-ViT-B-16 / unimedclip (pretrained)")
    assert main([*args[:3], "--from", "eff_unimed", *args[5:]]) == 0
    lines = capsys.readouterr().out.splitlines()
    group = lines.index(next(line for line in lines if line.startswith("| *data_fraction_10*")))
    assert cells("MedCLIPSeg")[column] == f"{np.mean(ours) * 100:.2f}" and "(ours, on" not in "\n".join(lines)
    assert main(["tables", "eff_unimed", "--published", "--results-dir", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    published = next(line for line in out.splitlines() if "published (medclipseg README" in line)
    assert "81.10" in published  # MedCLIPSeg, 10 % of the data, averaged over the six sets
    header = next(line for line in out.splitlines() if line.startswith("| Method"))
    assert "avg_efficiency_sets DSC" in header and f"{np.mean(ours) * 100:.2f}" in out


def test_a_bmad_dataset_trains_on_the_organ_prompt_and_scores_images(catalog, synth_root):
    """On an anomaly-detection set (BMAD layout, normal images with empty masks) the prompt is built from the
    card's organ word, and the image score is the mean map's maximum."""
    from benchmark.backbones.cache import FeatureCache
    from benchmark.method import MethodContext, TrainSet
    from benchmark.protocol import BackboneSpec
    from methods.medclipseg import MedCLIPSeg, MedCLIPSegParams

    spec = catalog["SynthBrain"]
    context = MethodContext(
        spec, "supervised", None, 0, 32, torch.device("cpu"), BackboneSpec(**TINY), FeatureCache(None)
    )
    method = MedCLIPSeg.build(MedCLIPSegParams(**{**FAST, "layers": (1, 2), "epochs": 3}), context)
    split = make_split(synth_root, catalog, "SynthBrain", "supervised", None, 0)
    train = TrainSet(split.train, "supervised", None, 32, {"SynthBrain": spec}, split.valid)
    assert {s.label for s in train.samples} == {0, 1} and not any(s.text for s in train.samples)
    assert method.prompts((), ["brain"]) == ["brain lesion."]
    method.fit(train)
    assert len(method.history) == 3 and all(np.isfinite(method.history))
    batch = train.subset(split.test[:4]).load()
    out = method.predict(batch.unlabelled())
    torch.testing.assert_close(out.image_scores, out.maps.flatten(1).amax(-1))
    assert out.uncertainty.shape == out.maps.shape and float(out.uncertainty.max()) <= np.log(2) + 1e-6


def test_a_prompt_table_without_descriptions_is_said_once(seg_root, catalog, tmp_path, capsys):
    # every image silently got the default prompt
    import shutil

    from benchmark.data.layout import prompt_file, read_segmentation_split

    root = tmp_path / "blank"
    shutil.copytree(seg_root / "SynthBrainSeg", root / "SynthBrainSeg")
    listing = prompt_file(root, catalog["SynthBrainSeg"], "train")
    rows = pd.read_excel(listing)
    rows["Description"] = None
    rows.loc[0, "Description"] = "   "  # blank too
    rows.to_excel(listing, index=False)
    capsys.readouterr()
    for _ in range(2):
        samples = read_segmentation_split(root, catalog["SynthBrainSeg"], "train")
    assert all(s.text is None for s in samples)
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"note: {listing}: {len(samples)} of {len(samples)} images have no Description; they are given the "
        "method's default prompt"
    ]


def _context(catalog, name: str, backbone: dict):
    from benchmark.backbones.cache import FeatureCache
    from benchmark.method import MethodContext
    from benchmark.protocol import BackboneSpec

    spec = catalog[name]
    return MethodContext(spec, "data_fraction", 100, 0, 32, torch.device("cpu"), BackboneSpec(**backbone),
                         FeatureCache(None))  # fmt: skip


@pytest.mark.parametrize(
    ("variant", "model"),
    [("unimedclip", "tiny-vit-bert"), ("biomedclip", "tiny-timm-bert"), ("clip", "tiny-vit-twin"),
     ("pubmedclip", "tiny-vit-twin")],
)  # fmt: skip
def test_each_backbone_variant_trains_and_predicts_on_its_kind_of_towers(variant, model, catalog, seg_root):
    """The BERT variants' patch features are the last block's full tokens (normed and projected), their text the
    [CLS] token through the MLP; the CLIP variants' the value path and the EOT token."""
    from benchmark.method import TrainSet
    from methods.medclipseg import MedCLIPSeg, MedCLIPSegParams

    context = _context(catalog, "SynthBrainSeg", {"model": model, "weights": "random-init", "seed": 0})
    method = MedCLIPSeg.build(MedCLIPSegParams(**{**FAST, "backbone_variant": variant}), context)
    backbone = method.backbone
    images = torch.rand(2, 3, 32, 32)
    tokens = backbone.tokenize(["brain lesion.", "a lesion"])
    patches, text = method.model.encode(images, tokens)
    with torch.no_grad():  # with the adapters' outputs zeroed, the features are the frozen backbone's own
        for adapter in method.model.adapters:
            adapter.vision_up.weight.zero_()
            adapter.text_up.weight.zero_()
        patches, text = method.model.encode(images, tokens)
        x, _ = backbone.run_blocks(backbone.embed((images - method.model.mean) / method.model.std))
        own_text = backbone.model.encode_text(tokens)
    torch.testing.assert_close(text, own_text)
    full = backbone.project_tokens(x[:, 1:])
    assert torch.allclose(patches, full) == (variant in ("unimedclip", "biomedclip"))
    split = make_split(seg_root, catalog, "SynthBrainSeg", "data_fraction", 100, 0)
    train = TrainSet(split.train[:8], "data_fraction", 100, 32, {"SynthBrainSeg": catalog["SynthBrainSeg"]})
    method.fit(train)
    assert len(method.history) == 1 and np.isfinite(method.history[0])
    assert not backbone.model.training and not any(m.training for m in backbone.model.modules())
    out = method.predict(train.subset(split.test[:2]).load().unlabelled())
    assert out.maps.shape == (2, 32, 32)


def test_a_variant_on_the_wrong_kind_of_towers_is_refused_in_one_line(catalog):
    from methods.medclipseg import MedCLIPSeg, MedCLIPSegParams

    context = _context(catalog, "SynthBrainSeg", TINY | {"model": "tiny-vit-twin"})
    with pytest.raises(BenchmarkError) as info:
        MedCLIPSeg.build(MedCLIPSegParams(**FAST), context)  # unimedclip, the default
    assert "backbone_variant 'unimedclip' runs on a BERT text tower" in str(info.value)
    assert "\n" not in str(info.value)


def test_its_configs_per_dataset_values_and_the_colour_order(catalog, seg_root):
    """EUS trains 10 epochs and Covid19's gates start at -0.02 (its configs) unless set; BGR by default."""
    import dataclasses as dc

    from benchmark.method import TrainSet
    from methods.medclipseg import VARIANT_BACKBONES, MedCLIPSeg, MedCLIPSegParams

    assert MedCLIPSeg.backbone_for(MedCLIPSegParams()) == VARIANT_BACKBONES["unimedclip"]
    fast = {k: v for k, v in FAST.items() if k != "epochs"}
    for name, epochs, gate in (("EUS", 10, 0.0), ("Covid19", 100, -0.02)):
        spec = dc.replace(catalog["SynthBrainSeg"], name=name)
        params = MedCLIPSegParams(**fast, lr=0.0, lr_min=0.0)
        method = MedCLIPSeg.build(params, _context(catalog, "SynthBrainSeg", TINY))
        split = make_split(seg_root, catalog, "SynthBrainSeg", "data_fraction", 100, 0)
        samples = [dc.replace(s, dataset=name) for s in split.train[:2]]
        if name == "EUS":
            method.fit(TrainSet(samples, "data_fraction", 100, 32, {name: spec}))
            assert len(method.history) == 10
        else:  # the gates at fit's start, before a step
            method.params = dc.replace(method.params, epochs=1)
            method.fit(TrainSet(samples, "data_fraction", 100, 32, {name: spec}))
        assert method.effective_params()["epochs"] == (epochs if name == "EUS" else 1)
        assert method.effective_params()["gate_init"] == gate
        gates = [float(m.gate) for m in method.model.modules() if isinstance(m, ProbabilisticCrossAttention)]
        assert gates and all(g == pytest.approx(gate) for g in gates)  # lr 0: as they started
    images = torch.rand(1, 3, 8, 8)
    assert torch.equal(method.inputs(images), images[:, [2, 1, 0]])
    method.params = dc.replace(method.params, colour="rgb")
    assert torch.equal(method.inputs(images), images)
