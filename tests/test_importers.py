"""The authors' checkpoints: files written by each official code (tiny configuration, random weights; how, in
``tests/data/official/README.md``) load through our importers, and our predictions equal the official code's
predictions from the same file."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from benchmark.backbones import unimedclip
from benchmark.backbones.cache import FeatureCache
from benchmark.data.loading import ImageBatch
from benchmark.errors import BenchmarkError
from benchmark.importers import load_checkpoint, torch_file
from benchmark.method import METHODS, MethodContext, TrainSet
from benchmark.protocol import BackboneSpec
from methods.models.mvfa import augment
from tests.conftest import LocalHub

OFFICIAL = Path(__file__).parent / "data" / "official"
TINY = BackboneSpec("tiny-vit", "random-init", 0)
APRIL_GAN = {"layers": [1, 2, 3, 4], "memory_layers": [2, 4]}


def _method(catalog, name: str, params: dict, backbone: BackboneSpec = TINY, setting: str = "zero_shot_loo"):
    cls = METHODS.get(name)
    context = MethodContext(
        catalog["SynthBrain"], setting, None, 0, 32, torch.device("cpu"), backbone, FeatureCache(None)
    )
    return cls.build(cls.parse_params({**params, "progress": False}, name), context)


def _imported(catalog, name, params, file, backbone=TINY):
    method = _method(catalog, name, params, backbone)
    source = load_checkpoint(method, str(OFFICIAL / file), "official", TrainSet((), "zero_shot_loo", None, 32))
    assert source == "authors' checkpoint"
    return method


def _predict(method, images):
    keys = tuple(f"image{i}" for i in range(len(images)))
    with torch.no_grad():
        return method.predict(ImageBatch(images, keys))


def test_april_gan_official_file_predicts_as_its_test_code(catalog):
    expected = torch.load(OFFICIAL / "april_gan_expected.pt", weights_only=True)
    method = _imported(catalog, "april_gan", APRIL_GAN, "april_gan_official_tiny.pth")
    out = _predict(method, expected["images"])
    # zero-shot: its image score, and its map summed over the 4 layers (ours: their mean)
    assert (out.image_scores - expected["zs_image_score"]).abs().max() < 1e-6
    assert (out.maps * 4 - expected["zs_anomaly_map"]).abs().max() < 1e-5


def test_anomalyclip_official_file_predicts_as_its_test_code(catalog):
    expected = torch.load(OFFICIAL / "anomalyclip_expected.pt", weights_only=True)
    params = {"layers": [1, 2, 3, 4], "dpam_blocks": 3, "deep_depth": 2, "sigma": 1.0}
    quick = BackboneSpec("tiny-vit", "random-init", 0, quick_gelu=True)  # its CLIP always runs QuickGELU
    method = _imported(catalog, "anomalyclip", params, "anomalyclip_official_tiny.pth", quick)
    out = _predict(method, expected["images"])
    assert (out.image_scores - expected["image_scores"]).abs().max() < 1e-5
    # its maps sum the 4 layers (ours: their mean); its text encoder casts the deep prompts to fp16 (ours keeps
    # fp32): 5.2e-5 at most on these maps, 7e-7 with that rounding applied to ours (the README's fidelity table)
    assert (out.maps - expected["anomaly_maps"] / 4).abs().max() < 1e-4


def test_mvfa_official_file_predicts_as_its_test_code(catalog):
    expected = torch.load(OFFICIAL / "mvfa_expected.pt", weights_only=True)
    layers = expected["features"].tolist()  # its --features_list: adapters after blocks 2 and 4
    method = _method(catalog, "mvfa", {"mode": "official", "layers": layers}, setting="few_shot")
    method.import_official(torch_file(OFFICIAL / "mvfa_official_tiny.pth"), "mvfa file")
    support = expected["support"]  # its few-shot memory: the K normal images 11x augmented, as our fit builds it
    method._build_memory(augment(support, torch.zeros(len(support), 32, 32, dtype=torch.bool))[0])
    raw = method.raw(expected["images"])  # the test-set min-max its test code applies next is not the file's
    for ours, theirs in (("map_zero", "seg_map_zero"), ("map_few", "seg_map_few"), ("img_zero", "det_score_zero"),
                         ("img_few", "det_score_few")):  # fmt: skip
        assert (raw[ours] - expected[theirs]).abs().max() < 1e-5, ours


def test_medclipseg_official_file_predicts_as_its_test_code(catalog):
    expected = torch.load(OFFICIAL / "medclipseg_expected.pt", weights_only=True)
    # the tiny UniMedCLIP file its run loaded too (a backbone of this test's own: its weights are replaced)
    spec = BackboneSpec("tiny-unimedclip", "random-init", 28, quick_gelu=True)
    params = {"backbone_variant": "unimedclip", "layers": [0, 1], "adapter_dim": 4, "upscale_blocks": 2, "samples": 3}
    method = _method(catalog, "medclipseg", params, spec)
    unimedclip.load_into(method.backbone.model, str(OFFICIAL.parent / "unimedclip_tiny.pt"))
    method.backbone.tokenizer = lambda texts: expected["token_ids"]  # the ids of its run's two prompts
    source = load_checkpoint(
        method, str(OFFICIAL / "medclipseg_official_tiny.pth"), "official", TrainSet((), "", None, 32)
    )
    assert source == "authors' checkpoint"
    images = expected["images"]
    torch.manual_seed(5)  # its eval: one discarded forward, then 3 Monte Carlo samples (the same noise draws)
    method.model.encode(method.inputs(images), expected["token_ids"])
    out = method.predict(ImageBatch(images, ("a", "b"), ("a prompt", "another")))
    assert (out.maps - expected["mean_prob"]).abs().max() < 1e-6
    assert (out.uncertainty - expected["uncertainty"]).abs().max() < 1e-6


def test_a_medclipseg_file_of_another_backbone_is_refused(catalog):
    """Its file holds its frozen backbone: a backbone of the same shapes but other weights is not the one it
    was trained on."""
    spec = BackboneSpec("tiny-unimedclip", "random-init", 29, quick_gelu=True)  # random, not the file's weights
    params = {"backbone_variant": "unimedclip", "layers": [0, 1], "adapter_dim": 4, "upscale_blocks": 2}
    method = _method(catalog, "medclipseg", params, spec)
    with pytest.raises(BenchmarkError, match=r"key 'vision_model\.conv1\.weight' differs from this cell's backbone"):
        load_checkpoint(method, str(OFFICIAL / "medclipseg_official_tiny.pth"), "official", TrainSet((), "", None, 32))


@pytest.mark.parametrize(
    ("name", "params", "file", "message"),
    [
        ("anomalyclip", {"layers": [1, 2, 3, 4], "dpam_blocks": 3, "deep_depth": 2}, "april_gan_official_tiny.pth",
         "expected a state dict under 'prompt_learner', found \\['trainable_linearlayer'\\]"),
        ("mvfa", {"mode": "paper", "layers": [2, 4]}, "mvfa_official_tiny.pth", "this entry has mode: paper"),
        ("april_gan", {**APRIL_GAN, "layers": [1, 2]}, "april_gan_official_tiny.pth",
         "key 'fc.2.weight' has no place in April-GAN's projections"),
        ("anomalyclip", {"layers": [1, 2, 3, 4], "dpam_blocks": 3, "deep_depth": 2, "prompt_length": 8},
         "anomalyclip_official_tiny.pth", "key 'ctx_pos' has shape \\(12, 128\\), AnomalyCLIP's prompts here needs "
         "\\(8, 128\\)"),
    ],
)  # fmt: skip
def test_a_file_of_another_method_or_configuration_is_refused_naming_the_key(catalog, name, params, file, message):
    method = _method(catalog, name, params)
    with pytest.raises(BenchmarkError, match=message):
        load_checkpoint(method, str(OFFICIAL / file), "official", TrainSet((), "zero_shot_loo", None, 32))


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.target),))


def test_a_pickle_that_would_run_code_is_refused_and_never_run(tmp_path):
    _Payload.target = str(tmp_path / "ran")
    crafted = tmp_path / "crafted.pth"
    with open(crafted, "wb") as f:
        pickle.dump({"trainable_linearlayer": _Payload()}, f)
    with pytest.raises(BenchmarkError, match=f"checkpoint '{crafted}': refused, it holds objects other than tensors"):
        torch_file(crafted)
    assert not (tmp_path / "ran").exists()
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes((OFFICIAL / "april_gan_official_tiny.pth").read_bytes()[:5000])
    with pytest.raises(BenchmarkError, match=f"checkpoint '{truncated}' cannot be read"):
        torch_file(truncated)


def test_fetch_weights_downloads_medclipseg_checkpoints_and_says_where_the_others_are(tmp_path):
    name = "BUSI_25/trained_models/seed666/MedCLIPSeg_unimedclip_ViT-B-16_latest.pth"
    data = (OFFICIAL / "medclipseg_official_tiny.pth").read_bytes()
    hub = LocalHub({"TahaKoleilat/MedCLIPSeg": {name: data}})
    fetched = hub.run(tmp_path, "-m", "benchmark", "fetch-weights", "medclipseg", "BUSI_25")
    assert fetched.returncode == 0, fetched.stderr
    path, *rest = fetched.stdout.splitlines()
    assert Path(path).read_bytes() == data and path.startswith(str(tmp_path / "hub"))
    entry = f"medclipseg_authors: {{method: medclipseg, checkpoint: {{BUSI: {path}}}, checkpoint_format: official}}"
    assert entry in rest[1]
    elsewhere = hub.run(tmp_path, "-m", "benchmark", "fetch-weights", "mvfa", "Brain")
    assert elsewhere.returncode == 0 and "https://drive.google.com/" in elsewhere.stdout
    assert "mvfa_authors: {method: mvfa, checkpoint: {Brain: PATH}, checkpoint_format: official}" in elsewhere.stdout
    unknown = hub.run(tmp_path, "-m", "benchmark", "fetch-weights", "medclipseg", "BUSI_7")
    assert unknown.returncode == 2 and "no such checkpoint (expected one of BUSI, BUSI_10" in unknown.stderr
