"""Frozen text towers encode each prompt list once: the embeddings are cached on disk under the tower's weights
identity and the exact prompts, in their own folder per precision."""

import json

import torch

from benchmark import precision
from benchmark.backbones.cache import FeatureCache
from benchmark.backbones.clip import load_clip
from benchmark.cli import main
from benchmark.protocol import BackboneSpec

PROMPTS = ["a photo of a normal brain", "a photo of a damaged brain"]


def _text_entries(root) -> dict[str, int]:
    """Entries per text recipe folder (its recipe.json says ``features: text``), keyed by its precision."""
    out = {}
    for recipe in root.glob("*/recipe.json"):
        data = json.loads(recipe.read_text())
        if data["features"] == "text":
            out[data.get("precision", "fp32")] = out.get(data.get("precision", "fp32"), 0) + len(
                list(recipe.parent.glob("*/*.pt"))
            )
    return out


def test_a_prompt_list_is_encoded_once_per_tower_and_read_back_bit_for_bit(tmp_path):
    backbone = load_clip(BackboneSpec("tiny-vit", "random-init", 0), 32)
    plain = backbone.encode_prompts(PROMPTS)
    assert torch.equal(backbone.encode_prompts(PROMPTS, FeatureCache(tmp_path)), plain)
    with torch.no_grad():  # the entry is read, not computed again: changed weights under the same recipe show it
        backbone.model.token_embedding.weight.zero_()
    assert torch.equal(backbone.encode_prompts(PROMPTS, FeatureCache(tmp_path)), plain)
    other = load_clip(BackboneSpec("tiny-vit", "random-init", 1), 32)  # other weights: an entry of their own
    assert not torch.equal(other.encode_prompts(PROMPTS, FeatureCache(tmp_path)), plain)
    assert not torch.equal(other.encode_prompts(PROMPTS[:1], FeatureCache(tmp_path)), plain[:1])  # other prompts
    with precision.running("bf16", "cpu"):
        half = other.encode_prompts(PROMPTS, FeatureCache(tmp_path))
    assert half.dtype == torch.bfloat16
    assert _text_entries(tmp_path) == {"fp32": 3, "bf16": 1}


def test_a_grid_encodes_each_ensemble_once(write_protocol, tmp_path):
    settings = ["zero_shot_loo", {"name": "few_normal", "shots": [2]}, {"name": "few_shot", "shots": [2]}]
    assert main(["run", str(write_protocol(settings=settings, seeds=[0, 1]))]) == 0
    # 2 datasets (organs) x (normal, anomalous) ensembles, over 2 x (1 + 2 x 2) cells
    assert _text_entries(tmp_path / "results" / "cache") == {"fp32": 4}
