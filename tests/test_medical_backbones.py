"""Medical CLIP backbones through the block-by-block wrapper: a BERT text tower (UniMedCLIP, BiomedCLIP) and a
timm vision tower (BiomedCLIP) run block by block equal the models' own ``encode_text``/``encode_image``;
UniMedCLIP's checkpoint, in its publishers' format, loads strictly into pip open_clip; missing weights say
how to fetch them in one line."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.backbones import unimedclip
from benchmark.backbones.clip import load_clip
from benchmark.backbones.identity import agrees, of_label
from benchmark.errors import WeightsUnavailableError
from benchmark.protocol import BackboneSpec
from tests.conftest import LocalHub

DATA = Path(__file__).parent / "data"
PROMPTS = ["a photo of a lesion in the brain.", "normal liver", "x"]


def _text_block_by_block(backbone, tokens):
    end = backbone.text_end(tokens)
    x = backbone.embed_text(tokens)
    attention = backbone.text_attention(end, tokens.shape[1])
    for index in range(1, len(backbone.text_blocks) + 1):
        x = backbone.text_block(index, x, attention)
    return backbone.text_pool(x, end)


@pytest.mark.parametrize("model", ["tiny-vit-bert", "tiny-timm-bert"])
def test_bert_and_timm_towers_block_by_block_equal_the_models_own_encoders(model):
    backbone = load_clip(BackboneSpec(model, "random-init", 0), 32)
    assert backbone.hf_text and backbone.timm_vision == (model == "tiny-timm-bert")
    images = backbone.normalize(torch.rand(3, 3, 32, 32))
    tokens = backbone.tokenize(PROMPTS)
    with torch.no_grad():
        last, _ = backbone.run_blocks(backbone.embed(images))
        assert torch.equal(backbone.pool(last), backbone.model.encode_image(images))
        own = backbone.model.encode_text(tokens)
        assert torch.equal(_text_block_by_block(backbone, tokens), own)
        # learnable prompts enter as token embeddings: the same tokens give the same embedding
        embedded = backbone.token_embedding(tokens)
        pooled, projected = backbone.encode_token_embeddings(embedded, backbone.text_end(tokens))
    assert torch.equal(pooled, own) and projected.shape == (3, tokens.shape[1], backbone.embed_dim)
    # the padding is masked: a prompt's embedding does not depend on how much padding follows it
    assert backbone.text_end(tokens).tolist() == [int((t != 0).sum()) - 1 for t in tokens]
    short = backbone.tokenize(PROMPTS[2:])[:, :8]
    with torch.no_grad():
        torch.testing.assert_close(_text_block_by_block(backbone, short)[0], own[2], rtol=0, atol=1e-6)


def test_bert_dropout_runs_only_while_asked():
    backbone = load_clip(BackboneSpec("tiny-vit-bert", "random-init", 0), 32)
    tokens = backbone.tokenize(PROMPTS[:1])
    with torch.no_grad():
        before = _text_block_by_block(backbone, tokens)
        backbone.text_train(True)
        noisy = _text_block_by_block(backbone, tokens)
        backbone.text_train(False)
        after = _text_block_by_block(backbone, tokens)
    assert not torch.equal(before, noisy) and torch.equal(before, after)


def test_unimedclip_checkpoint_loads_strictly_and_equals_its_official_code():
    """``tests/data/unimedclip_tiny.pt`` was written by UniMedCLIP's own code (mbzuai-oryx/UniMed-CLIP at
    6f09177, a tiny configuration with random weights) in its training-checkpoint format: ``module.`` keys, the
    text tower under ``text_encoder.``, an optimizer state with numpy scalars; ``..._reference.pt`` holds that
    code's ``encode_image`` and ``encode_text`` of fixed inputs."""
    backbone = load_clip(BackboneSpec("tiny-unimedclip", "random-init", 0, quick_gelu=True), 32)
    unimedclip.load_into(backbone.model, str(DATA / "unimedclip_tiny.pt"))  # strictly
    reference = torch.load(DATA / "unimedclip_tiny_reference.pt", weights_only=True)
    with torch.no_grad():
        # float32 rounding only: bit equality held on the machine that wrote the reference, not on every CPU's
        # kernels (1.2e-7 seen on another x86_64)
        assert (backbone.model.encode_text(reference["text"]) - reference["encode_text"]).abs().max() < 1e-6
        assert (_text_block_by_block(backbone, reference["text"]) - reference["encode_text"]).abs().max() < 1e-6
        image = backbone.model.encode_image(reference["images"])
    # float32 rounding: its fork's attention runs sequence-first, pip open_clip's batch-first
    assert (image - reference["encode_image"]).abs().max() < 2e-6
    # at another size its positional embedding is resized to the grid, as open_clip resizes pretrained ones
    larger = load_clip(BackboneSpec("tiny-unimedclip", "random-init", 0, quick_gelu=True), 48)
    unimedclip.load_into(larger.model, str(DATA / "unimedclip_tiny.pt"))
    assert larger.model.visual.positional_embedding.shape == (1 + 6 * 6, 64) and larger.grid_size == (6, 6)
    with torch.no_grad():
        assert (larger.model.encode_text(reference["text"]) - reference["encode_text"]).abs().max() < 1e-6
    # a model of other shapes is refused in one line naming the first key that does not fit
    other = load_clip(BackboneSpec("tiny-vit-bert", "random-init", 0), 32)
    with pytest.raises(WeightsUnavailableError, match=r"does not fit UniMedCLIP-ViT-B-16: .* \(and \d+ more\)$"):
        unimedclip.load_into(other.model, str(DATA / "unimedclip_tiny.pt"))


def test_unimedclip_refuses_a_file_that_is_not_its_checkpoint(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, other)
    with pytest.raises(WeightsUnavailableError, match="holds no UniMedCLIP state dict") as info:
        unimedclip.state_dict(str(other))
    assert "\n" not in str(info.value)
    with pytest.raises(WeightsUnavailableError, match="no readable UniMedCLIP checkpoint"):
        unimedclip.state_dict(str(DATA / "unimedclip_tiny_reference.pt")[:-3] + ".missing")


@pytest.mark.parametrize(
    ("model", "weights"),
    [
        ("UniMedCLIP-ViT-B-16", "unimedclip"),
        ("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", "biomedclip"),
        ("ViT-B-32", "pubmedclip"),
    ],
)
def test_missing_medical_weights_say_how_to_fetch_them(model, weights, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(WeightsUnavailableError) as info:
        load_clip(BackboneSpec(model, weights), 224)
    assert f"fetch-weights {model} {weights}" in str(info.value) and "\n" not in str(info.value)


def test_a_local_model_folder_loads_offline(tmp_path):
    """``local-dir:`` a folder with ``open_clip_config.json`` and its weights, as open_clip saves them."""
    import open_clip

    config = {
        "model_cfg": open_clip.get_model_config("ViT-B-32"),
        "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(5)
    model = open_clip.create_model("ViT-B-32")
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    loaded = load_clip(BackboneSpec(f"local-dir:{tmp_path}", "bundled"), 224)
    assert torch.equal(loaded.visual.conv1.weight, model.visual.conv1.weight)
    assert torch.equal(loaded.mean.flatten(), torch.full((3,), 0.5))


def test_without_transformers_a_bert_tower_names_the_extra():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from benchmark.backbones.clip import load_clip\nfrom benchmark.protocol import BackboneSpec\n"
        "from benchmark.errors import BenchmarkError\n"
        "try:\n    load_clip(BackboneSpec('tiny-vit-bert', 'random-init'), 32)\n"
        "except BenchmarkError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'medad-bench[medical]'" in out and out.count("\n") == 1


def test_a_checkpoint_file_is_known_by_its_tag():
    assert of_label("ViT-B-32 / /data/w/PubMedCLIP_ViT32.pth (pretrained)") == ("ViT-B-32", "pubmedclip")
    assert agrees("UniMedCLIP-ViT-B-16 / unimedclip", "UniMedCLIP-ViT-B-16 / /x/unimed_clip_vit_b16.pt (pretrained)")
    assert not agrees("UniMedCLIP-ViT-B-16 / unimedclip", "ViT-B-16 / openai (pretrained)")
    assert agrees("wide_resnet50_2", "wide_resnet50_2 / racm_in1k (pretrained)")  # the paper names no weights
    assert not agrees("wide_resnet50_2", "wide_resnet50_2 / random-init (random-init, seed 0)")
    assert agrees("none", "none / random-init (random-init, seed 0)") and not agrees("", "x / y (pretrained)")


@pytest.mark.parametrize(
    ("method", "raw", "setting"),
    [
        ("winclip", {"scales": [2]}, {"name": "few_normal", "shots": [2]}),
        ("mvfa", {"layers": [1, 2, 3, 4], "epochs": 1}, {"name": "few_shot", "shots": [2]}),
        ("april_gan", {"layers": [2, 4], "memory_layers": [2, 4], "epochs": 1}, {"name": "few_shot", "shots": [2]}),
        ("anomalyclip", {"layers": [4], "dpam_blocks": 2, "deep_depth": 2, "epochs": 1}, "zero_shot_loo"),
        ("medsad_clip", {"layers": [2, 4], "heads": 4, "decoder_hidden": 16, "epochs": 1, "batch_size": 8},
         {"name": "few_shot", "shots": [2]}),
    ],
)  # fmt: skip
def test_the_clip_methods_run_on_a_medical_bert_tower_backbone(method, raw, setting, write_protocol, tmp_path):
    """One protocol key, ``backbone``, puts a medical CLIP under a method: here UniMedCLIP's shape (a BERT text
    tower), tiny and random-init. Its text features are BERT's [CLS] token through the MLP projection."""
    from benchmark.cli import main
    from benchmark.store import ResultStore

    bert = {"model": "tiny-vit-bert", "weights": "random-init", "seed": 0}
    path = write_protocol(backbone=bert, settings=[setting], methods={method: raw})
    assert main(["run", str(path)]) == 0
    latest = list(ResultStore(tmp_path / "results", "t").latest().values())
    assert latest and all(r["status"] == "finished" for r in latest), [r.get("error") for r in latest]
    assert all(r["backbone"].startswith("tiny-vit-bert / random-init") for r in latest)
    assert all(np.isfinite(r["metrics"]["image_auroc"]) for r in latest)


def test_fetch_weights_downloads_unimedclip_and_its_text_towers_files_then_they_resolve(tmp_path):
    bert = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    hub = LocalHub({
        "UzairK/unimed-clip-vit-b16": {"unimed-clip-vit-b16.pt": (DATA / "unimedclip_tiny.pt").read_bytes()},
        bert: {"config.json": b'{"model_type": "bert"}', "vocab.txt": b"[PAD]\n", "pytorch_model.bin": b"0" * 64},
    })  # fmt: skip
    resolve = ("-c", "from benchmark.backbones.weights import resolve_medical as r\n"
               "print(r('UniMedCLIP-ViT-B-16', 'unimedclip'))")  # fmt: skip
    before = hub.run(tmp_path, *resolve)
    assert "fetch-weights UniMedCLIP-ViT-B-16 unimedclip" in before.stderr.splitlines()[-1]
    fetched = hub.run(tmp_path, "-m", "benchmark", "fetch-weights", "UniMedCLIP-ViT-B-16", "unimedclip")
    assert fetched.returncode == 0, fetched.stderr
    found = hub.run(tmp_path, *resolve)
    assert (
        found.returncode == 0 and Path(found.stdout.strip()).read_bytes() == (DATA / "unimedclip_tiny.pt").read_bytes()
    )
    snapshot = tmp_path / "hub" / "models--microsoft--BiomedNLP-BiomedBERT-base-uncased-abstract" / "snapshots"
    assert sorted(p.name for p in snapshot.rglob("*") if p.is_file()) == ["config.json", "vocab.txt"]  # no weights


def test_an_hf_hub_model_is_fetched_then_loaded_from_the_cache_without_the_hub(tmp_path):
    """An ``hf-hub:`` open_clip model (BiomedCLIP's route): fetched once, then read from the cache as a local
    folder; with the hub gone the same load still works."""
    import io

    import open_clip

    vision = {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16}
    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    model_cfg = {"embed_dim": 32, "vision_cfg": vision, "text_cfg": text}
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    torch.manual_seed(7)
    model = open_clip.CLIP(**config["model_cfg"])
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    hub = LocalHub({"lab/tiny-clip": {"open_clip_config.json": json.dumps(config).encode(),
                                  "open_clip_pytorch_model.bin": buffer.getvalue()}})  # fmt: skip
    name = "hf-hub:lab/tiny-clip"
    assert hub.run(tmp_path, "-m", "benchmark", "fetch-weights", name, "bundled").returncode == 0
    hub.server.shutdown()
    code = ("from benchmark.backbones.clip import load_clip\nfrom benchmark.protocol import BackboneSpec\n"
            f"b = load_clip(BackboneSpec('{name}', 'bundled'), 32)\nprint(float(b.visual.conv1.weight.sum()), "
            "float(b.mean.sum()))")  # fmt: skip
    loaded = hub.run(tmp_path, "-c", code)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    weight, mean = map(float, loaded.stdout.split())
    assert weight == pytest.approx(float(model.visual.conv1.weight.sum()), abs=1e-6) and mean == pytest.approx(1.5)


def test_a_named_model_brings_its_own_weights_and_says_so_in_one_line():
    from benchmark.errors import BenchmarkError

    name = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    with pytest.raises(BenchmarkError, match=r"brings its own weights: write 'bundled' or 'biomedclip', not 'openai'"):
        load_clip(BackboneSpec(name, "openai"), 224)
    with pytest.raises(BenchmarkError, match="was trained with QuickGELU; false is not possible"):
        load_clip(BackboneSpec("UniMedCLIP-ViT-B-16", str(DATA / "unimedclip_tiny.pt"), quick_gelu=False), 224)
