import pytest
import torch

from benchmark.backbones.cache import FeatureCache
from benchmark.data.loading import ImageBatch
from benchmark.data.splits import make_split
from benchmark.method import MethodContext, TrainSet
from benchmark.protocol import BackboneSpec
from methods.models.mcmiad import MCMIAD, MCMIADHead, MCMIADParams, anomaly_scores, image_score

CNN = BackboneSpec("mobilenetv3_small_050", "random-init", 0)


def _method(catalog, **kw) -> MCMIAD:
    params = MCMIADParams(
        text_model="tiny-vit",
        text_weights="random-init",
        dim=32,
        heads=4,
        ffn=64,
        neighbourhood=3,
        progress=False,
        **kw,
    )
    context = MethodContext(
        catalog["SynthLiver"], "full_normal", None, 0, 64, torch.device("cpu"), CNN, FeatureCache(None)
    )
    return MCMIAD.build(params, context)


def test_single_text_key_cross_attention_adds_one_vector_to_every_token():
    torch.manual_seed(0)
    head = MCMIADHead(channels=12, grid=(3, 3), text_dim=8, dim=16, heads=4, ffn=32, blocks=1, neighbourhood=1)
    tokens = torch.randn(2, 9, 16)
    text = torch.randn(8)
    added = head.fuse(tokens, text) - tokens
    attn = head.cross_attn
    t = head.text_proj(text)
    v = t @ attn.in_proj_weight[32:].T + attn.in_proj_bias[32:]
    expected = attn.out_proj(v)
    torch.testing.assert_close(added, expected.expand(2, 9, 16), atol=1e-5, rtol=1e-5)


def test_perfect_reconstruction_scores_zero_and_image_score_formula():
    f = torch.randn(2, 5, 4, 4)
    assert anomaly_scores(f, f).abs().max() < 1e-6
    assert anomaly_scores(f, f + 1).min() > 0
    known = torch.zeros(1, 4, 4)
    known[0, 0, :] = torch.tensor([1.0, 0.8, 0.6, 0.4])
    known[0, 1, 0] = 0.2
    expected = 0.5 * 1.0 + 0.3 * (3.0 / 16) + 0.2 * (1.0 + 0.8 + 0.6 + 0.4 + 0.2) / 5
    assert image_score(known).item() == pytest.approx(expected)


def test_a_decoder_token_cannot_see_its_own_window():
    """Changing the input inside a token's 3x3 window leaves that token's reconstruction unchanged; changing
    it outside does not (UniAD's neighbour mask, in both attentions of every block)."""
    torch.manual_seed(0)
    head = MCMIADHead(channels=6, grid=(5, 5), text_dim=4, dim=16, heads=2, ffn=16, blocks=1, neighbourhood=3).eval()
    text = torch.randn(4)
    features = torch.randn(1, 6, 5, 5)
    base = head(features, text)
    inside, outside = features.clone(), features.clone()
    inside[0, :, 1:4, 1:4] += 3.0  # the 3x3 window of token (2, 2)
    outside[0, :, 4, 4] += 3.0
    assert torch.allclose(head(inside, text)[0, :, 2, 2], base[0, :, 2, 2], atol=1e-6)
    assert not torch.allclose(head(outside, text)[0, :, 2, 2], base[0, :, 2, 2], atol=1e-3)


def test_text_fusion_switch_keeps_parameter_count(catalog):
    on, off = _method(catalog), _method(catalog, use_text_fusion=False)
    assert sum(p.numel() for p in on.head.parameters()) == sum(p.numel() for p in off.head.parameters())
    assert off.text.abs().sum() == 0 and on.text.abs().sum() > 0
    assert on.describe()["head_flops"] > 0


def test_training_lowers_loss_and_backbone_stays_frozen(catalog, synth_root):
    method = _method(catalog, epochs=8, lr=2e-3, batch_size=4)
    before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    split = make_split(synth_root, catalog, "SynthLiver", "full_normal", None, 0)
    train = TrainSet(split.train, "full_normal", None, 64, {"SynthLiver": catalog["SynthLiver"]}, split.valid)
    method.fit(train)
    assert method.history[-1] < method.history[0]
    assert all(p.grad is None and not p.requires_grad for p in method.backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in method.backbone.state_dict().items())
    assert any(p.grad is not None for p in method.head.parameters())
    batch = train.subset(train.samples[:2]).load()
    pred = method.predict(ImageBatch(batch.images, batch.keys))
    assert pred.maps.shape == (2, 64, 64) and pred.maps.max() <= 0.5 + 1e-6  # training images: within calibration
    # Eq. 7 on the raw score map, then calibrated (the paper's order), not Eq. 7 on the calibrated map
    with torch.no_grad():
        raw = method.raw_scores(method.features(batch.images, batch.keys), (64, 64))
    eq7 = image_score(raw)
    torch.testing.assert_close(pred.image_scores, eq7 / (eq7 + method.calibration[1]))
    assert not torch.allclose(pred.image_scores, image_score(pred.maps), atol=1e-4)
