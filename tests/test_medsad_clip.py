import pytest
import torch

from benchmark.backbones.cache import FeatureCache
from benchmark.backbones.clip import load_clip
from benchmark.data.splits import make_split
from benchmark.method import MethodContext, TrainSet
from benchmark.protocol import BackboneSpec
from methods.models.medsad_clip import MedSADCLIP, MedSADParams, TokenPatchCrossAttention, mc_loss

TINY = BackboneSpec("tiny-vit", "random-init", 0)


def _method(catalog, **kw) -> MedSADCLIP:
    params = MedSADParams(layers=(1, 2, 3, 4), heads=4, decoder_hidden=16, progress=False, **kw)
    context = MethodContext(
        catalog["SynthBrain"], "supervised", None, 0, 32, torch.device("cpu"), TINY, FeatureCache(None)
    )
    return MedSADCLIP.build(params, context)


def _count(method: MedSADCLIP) -> int:
    return sum(p.numel() for p in method.trainable())


def test_tpca_shape_and_attention_rows_sum_to_one():
    tpca = TokenPatchCrossAttention(dim=16, heads=4)
    attn = tpca(torch.randn(7, 16), torch.randn(3, 25, 16))
    assert attn.shape == (3, 4, 7, 25)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 4, 7))


def test_mc_loss_zero_when_margin_met_positive_otherwise():
    met = torch.tensor([[0.9, 0.3], [0.1, 0.7]])  # normal: s_n - s_a = 0.6; anomalous: s_a - s_n = 0.6
    labels = torch.tensor([0, 1])
    assert mc_loss(met, labels, margin=0.4).item() == 0.0
    assert mc_loss(met, labels, margin=0.8).item() == pytest.approx(0.2)
    missed = torch.tensor([[0.5, 0.4], [0.5, 0.4]])
    assert mc_loss(missed[:1], labels[:1], 0.4).item() == pytest.approx(0.3)  # normal: 0.4 - 0.1
    assert mc_loss(missed[1:], labels[1:], 0.4).item() == pytest.approx(0.5)  # anomalous: 0.4 - (-0.1)


def test_switches_remove_exactly_their_parameters(catalog):
    full = _method(catalog)
    text_width = load_clip(TINY, 32).model.token_embedding.weight.shape[1]
    dim, hidden = 64, 16  # tiny-vit embedding width, decoder_hidden
    length = full.model.prompts.lengths[1] + 10 + 1  # abnormal prompt tokens: SOT..anchor, 10 learnable, EOT
    tpca = 2 * (dim * dim + dim)
    decoder = (dim + length) * hidden * 9 + hidden + hidden * 2 + 2
    assert _count(full) - _count(_method(catalog, use_tpca=False)) == tpca + decoder
    no_prompt = _method(catalog, use_learnable_prompt=False)
    assert _count(full) - _count(no_prompt) == 2 * 10 * text_width + 10 * hidden * 9  # tokens + decoder inputs
    assert _count(_method(catalog, use_mc_loss=False)) == _count(full)
    assert _count(_method(catalog, n_prompt_tokens=20)) - _count(full) == 2 * 10 * text_width + 10 * hidden * 9
    switched_off = _method(catalog, use_learnable_prompt=False, use_tpca=False, use_mc_loss=False)
    assert switched_off.describe()["variant"] == "MedSAD-CLIP (prompt=off, TPCA=off, MC=off)"
    assert switched_off.published_as() == "" and full.published_as() == "MedSAD-CLIP"  # not the paper's CLIP-adapt


def test_short_training_lowers_the_loss(catalog, synth_root):
    method = _method(catalog, epochs=6, batch_size=8, lr=3e-3)
    split = make_split(synth_root, catalog, "SynthBrain", "supervised", None, 0)
    train = TrainSet(split.train, "supervised", None, 32, {"SynthBrain": catalog["SynthBrain"]}, split.valid)
    backbone_before = {k: v.clone() for k, v in method.model.backbone.state_dict().items()}
    method.fit(train)
    assert method.history[-1] < method.history[0]
    assert all(torch.equal(backbone_before[k], v) for k, v in method.model.backbone.state_dict().items())
    assert method.describe()["variant"] == "MedSAD-CLIP"
