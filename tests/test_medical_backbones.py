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
    backbone.model.load_state_dict(unimedclip.state_dict(str(DATA / "unimedclip_tiny.pt")), strict=True)
    reference = torch.load(DATA / "unimedclip_tiny_reference.pt", weights_only=True)
    with torch.no_grad():
        assert torch.equal(backbone.model.encode_text(reference["text"]), reference["encode_text"])
        assert torch.equal(_text_block_by_block(backbone, reference["text"]), reference["encode_text"])
        image = backbone.model.encode_image(reference["images"])
    # float32 rounding: its fork's attention runs sequence-first, pip open_clip's batch-first
    assert (image - reference["encode_image"]).abs().max() < 2e-6


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
