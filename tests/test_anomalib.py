"""anomalib's models through the bridge: registry family, parameters, runs on synthetic data, and the maps of
calling the anomalib model directly."""

import warnings
from collections import Counter

import pytest
import torch

from benchmark.backbones.cache import FeatureCache
from benchmark.cli import main
from benchmark.data.loading import load_batch
from benchmark.data.splits import make_split
from benchmark.errors import BenchmarkError
from benchmark.method import METHODS, MethodContext, TrainSet
from benchmark.protocol import BackboneSpec
from benchmark.store import ResultStore

RESNET = {"model": "resnet18", "weights": "random-init", "seed": 0}


def test_the_family_resolves_in_the_registry_with_anomalibs_parameters():
    cls = METHODS.get("anomalib:patchcore")  # any case
    assert cls.name == "anomalib:Patchcore" and cls.published_name == "PatchCore"
    assert cls.default_backbone.model == "wide_resnet50_2" and cls.default_backbone.weights == "racm_in1k"
    assert cls.parse_params({"coreset_sampling_ratio": 0.2}, "p").coreset_sampling_ratio == 0.2
    valid = "valid: anomalib_precision, batch_size, "
    with pytest.raises(BenchmarkError, match=rf"^p: methods.pc.coreset: unknown parameter; {valid}"):
        cls.parse_params({"coreset": 0.2}, "p: methods.pc")
    with pytest.raises(BenchmarkError, match="did you mean 'anomalib:Patchcore'"):
        METHODS.get("anomalib:Patchcorr")
    assert "anomalib:Padim" in METHODS and "anomalib:Nothing" not in METHODS


def test_a_parameter_of_the_wrong_type_is_one_line_naming_the_expected_type():
    """Each constructor parameter against its default's type, read from anomalib's source; where the default
    tells nothing (None, or no literal such as PatchCore's precision enum) any value passes."""
    cls = METHODS.get("anomalib:Patchcore")
    for key, value, expected in [
        ("coreset_sampling_ratio", "abc", "float"),
        ("coreset_sampling_ratio", True, "float"),
        ("num_neighbors", 2.5, "int"),
        ("num_neighbors", True, "int"),
        ("layers", "layer2", "list"),
    ]:
        with pytest.raises(BenchmarkError, match=rf"^p: methods.pc.{key}: expected {expected}, got {value!r}$"):
            cls.parse_params({key: value}, "p: methods.pc")
    # anomalib's memory-bank precision is anomalib_precision: the entry's own precision is the cell's
    ok = cls.parse_params({"coreset_sampling_ratio": 1, "layers": ["layer3"], "anomalib_precision": "float16"}, "p")
    assert ok.coreset_sampling_ratio == 1 and ok.layers == ["layer3"] and ok.anomalib_precision == "float16"
    assert METHODS.get("anomalib:Padim").parse_params({"n_features": None}, "p").n_features is None


def test_the_declaration_names_the_bridge_by_a_string_and_never_imports_it():
    """Like every plugin: ``implementation`` names the class and ``Method.build`` imports it when a cell runs;
    only the bridge imports the declaration."""
    import subprocess
    import sys

    cls = METHODS.get("anomalib:Padim")
    assert cls.implementation == "methods.models.anomalib_bridge:AnomalibImpl"
    code = (
        "import sys; from benchmark.method import METHODS; METHODS.get('anomalib:Padim');"
        "import methods.anomalib_models; print('methods.models.anomalib_bridge' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    impl = cls.implementation_class()
    assert impl.model_class == "Padim" and impl.Params is cls.Params and issubclass(impl, cls)


def test_models_run_through_the_harness(write_protocol, tmp_path, capfd):
    """Two memory-bank models (no training) and two trained ones, one epoch, in both one-class settings; the
    output holds our lines only (none of Lightning's tips or device lines)."""
    path = write_protocol(
        datasets=["SynthBrain"],
        settings=["full_normal", {"name": "few_normal", "shots": [2]}],
        methods={
            "patchcore": {"method": "anomalib:Patchcore", "backbone": RESNET, "image_size": 64},
            "padim": {"method": "anomalib:Padim", "backbone": RESNET, "image_size": 64},
            "rd4ad": {"method": "anomalib:ReverseDistillation", "backbone": RESNET, "image_size": 64, "epochs": 1},
            "fastflow": {"method": "anomalib:Fastflow", "backbone": RESNET, "image_size": 64, "epochs": 1},
        },
    )
    assert main(["run", str(path)]) == 0
    records = list(ResultStore(tmp_path / "results", "t").latest().values())
    assert len(records) == 8 and {r["status"] for r in records} == {"finished"}
    by = {(r["method"], r["setting"]): r for r in records}
    assert by[("patchcore", "full_normal")]["published_as"] == "PatchCore"
    assert by[("rd4ad", "few_normal")]["variant"] == "RD4AD" and by[("rd4ad", "few_normal")]["history"]["train_loss"]
    assert by[("padim", "few_normal")]["params"]["train_count"] == 2
    assert by[("patchcore", "full_normal")]["backbone_weights"] == "random-init"
    for r in records:
        assert all(0.0 <= r["metrics"][k] <= 1.0 for k in ("image_auroc", "pixel_auroc", "dice"))
    out, err = capfd.readouterr()
    assert "patchcore" in out
    for word in ("Tip:", "litlogger", "litmodels", "GPU available", "TPU available", "Selecting Coreset"):
        assert word not in out + err


@pytest.mark.parametrize("name", ["Padim", "Patchcore"])
def test_bridge_maps_equal_the_anomalib_models_own(catalog, synth_root, name):
    """The bridge against anomalib's model built and fitted directly (its own training step and fit) with the
    same seed, on the same normalised images: the same raw maps, and ours are a monotone map of them."""
    import anomalib.models as models
    from anomalib.data import ImageBatch as AnomalibBatch
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Resize

    from methods.models.anomalib_bridge import normalise_input

    size, spec = 64, BackboneSpec("resnet18", "random-init", 0)
    extra = {"coreset_sampling_ratio": 1.0} if name == "Patchcore" else {}
    cls = METHODS.get(f"anomalib:{name}")
    context = MethodContext(catalog["SynthBrain"], "full_normal", None, 0, size, torch.device("cpu"), spec,
                            FeatureCache(None))  # fmt: skip
    split = make_split(synth_root, catalog, "SynthBrain", "full_normal", None, 0)
    bridge = cls.build(cls.Params(batch_size=4, **extra), context)
    bridge.fit(TrainSet(split.train, "full_normal", None, size))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct = getattr(models, name)(
            backbone="resnet18", pre_trained=False, post_processor=False, evaluator=False, visualizer=False,
            pre_processor=PreProcessor(transform=Resize((size, size))), **extra,
        )  # fmt: skip
        train = load_batch(split.train, size)
        order = torch.randperm(len(split.train), generator=torch.Generator().manual_seed(0))
        direct.train()
        for i in range(0, len(order), 4):
            direct.training_step(AnomalibBatch(image=normalise_input(train.images[order[i : i + 4]])), 0)
        direct.fit()
    direct.eval()
    test = load_batch(split.test, size)
    with torch.no_grad():
        own = direct.model(normalise_input(test.images))
    scores, maps = bridge.raw(test.images)
    assert torch.allclose(maps, own.anomaly_map[:, 0], atol=1e-5, rtol=1e-5)
    assert torch.allclose(scores, own.pred_score.reshape(-1), atol=1e-5, rtol=1e-5)
    pred = bridge.predict(test.unlabelled())
    assert pred.maps.min() >= 0 and pred.maps.max() < 1
    # ours are our monotone mapping of anomalib's own maps, with the training images' statistics
    assert torch.allclose(pred.maps, bridge._map(own.anomaly_map[:, 0], *bridge.calibration["map"]), atol=1e-6)
    print(f"{name}: max |bridge - anomalib| raw map {float((maps - own.anomaly_map[:, 0]).abs().max()):.3g}")


def test_the_coreset_is_selected_in_buffers_without_autograd(catalog, synth_root):
    """PatchCore's greedy coreset selection through the bridge allocates no temporary per step (anomalib's
    loop made one of the projected bank's size each step; glibc's heap, fragmented by them, grew past 19 GB on
    16 images at 256 px), picks what anomalib's sampler picks, and leaves a bank without autograd graph."""
    import numpy as np
    from anomalib.models.components import KCenterGreedy
    from torch.profiler import ProfilerActivity, profile

    from methods.models.anomalib_bridge import _buffered_k_center_greedy

    size, spec = 64, BackboneSpec("resnet18", "random-init", 0)
    cls = METHODS.get("anomalib:Patchcore")
    context = MethodContext(catalog["SynthBrain"], "full_normal", None, 0, size, torch.device("cpu"), spec,
                            FeatureCache(None))  # fmt: skip
    split = make_split(synth_root, catalog, "SynthBrain", "full_normal", None, 0)
    bridge = cls.build(cls.Params(batch_size=4, coreset_sampling_ratio=0.5), context)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        bridge.fit(TrainSet(split.train, "full_normal", None, size))
    bank = bridge.module.model.memory_bank
    steps = len(bank) - 1
    allocations = Counter(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage >= 64 * 1024)
    assert steps > 100 and max(allocations.values()) < steps / 2, allocations.most_common(3)
    assert not bank.requires_grad and bank.grad_fn is None

    embedding = torch.randn(2000, 64, requires_grad=True)  # as a feature extractor with gradients would give
    picks = []
    for sampler in (KCenterGreedy, _buffered_k_center_greedy()):
        torch.manual_seed(0)
        np.random.seed(0)
        picks.append(sampler(embedding.detach(), 0.1).select_coreset_idxs())
    assert picks[0] == picks[1] and len(set(picks[1])) == 200
    buffered = _buffered_k_center_greedy()(embedding, 0.1)
    buffered.select_coreset_idxs()
    assert not buffered.min_distances.requires_grad


def test_naming_a_model_reads_anomalibs_source_without_importing_it():
    """``list``, ``--dry-run`` and protocol checks stay fast: the family resolves from anomalib's source files;
    the default backbones' timm tags kept in a table equal timm's own."""
    import subprocess
    import sys

    import timm

    from methods.anomalib_models import TIMM_DEFAULT_TAGS, model_signatures

    code = (
        "import sys; from benchmark.method import METHODS; METHODS.get('anomalib:Cflow'); print('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    signatures = model_signatures()
    assert signatures["Patchcore"]["coreset_sampling_ratio"] == 0.1 and len(signatures) > 20
    for model, tag in TIMM_DEFAULT_TAGS.items():
        assert timm.models.get_pretrained_cfg(model).tag == tag


def test_without_the_extra_an_anomalib_method_is_one_line(monkeypatch):
    import sys

    from methods.anomalib_models import anomalib_models

    monkeypatch.setitem(sys.modules, "anomalib.models", None)  # as if anomalib were not installed
    with pytest.raises(
        BenchmarkError, match=r'^anomalib methods need the anomalib extra: pip install -e "\.\[anomalib\]"$'
    ):
        anomalib_models()
