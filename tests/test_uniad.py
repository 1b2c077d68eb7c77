"""UniAD: its pieces as its official code computes them, the backbone's fixed padding, and the plugin end to end."""

import pytest
import torch

from benchmark.backbones.cache import FeatureCache
from benchmark.backbones.cnn import load_timm, static_same_padding, tf_same_padding
from benchmark.data.loading import load_batch
from benchmark.method import MethodContext
from benchmark.protocol import BackboneSpec
from methods.models import calibration
from methods.models.uniad import (
    EncoderBlock,
    LearnedPosition,
    UniADHead,
    jitter,
    neighbourhood_mask,
    pooled_max,
    reconstruction_map,
)
from methods.uniad import UniAD, UniADParams

CNN = BackboneSpec("mobilenetv3_small_050", "random-init", 0)
SMALL = dict(dim=32, heads=4, ffn=64, encoder_blocks=2, decoder_blocks=2, neighbourhood=3, progress=False)


def test_neighbourhood_mask_blocks_each_tokens_own_window():
    mask = neighbourhood_mask(4, 4, 3)
    assert mask.shape == (16, 16)
    assert mask[0].sum() == 4 and mask[5].sum() == 9  # corner: its 2x2 window blocked, inner token: 3x3
    assert mask.diagonal().all()  # no token sees itself
    with pytest.raises(ValueError, match="covers the whole 3x3 token grid"):
        neighbourhood_mask(3, 3, 3)


def test_jitter_follows_uniads_formula():
    """UniAD: noise std = scale * |x| / D per token, about 121 % of a 256-d feature's per-element signal."""
    torch.manual_seed(0)
    x = torch.randn(4, 1000, 256) * 3.0
    noise = jitter(x, 20.0, 1.0) - x
    signal = x.norm(dim=-1) / 256**0.5  # per-element root mean square of each token
    ratio = (noise.std(dim=-1) / signal).mean()
    assert ratio.item() == pytest.approx(20.0 / 256**0.5, rel=0.02)
    assert torch.equal(jitter(x, 20.0, 0.0), x)


def test_parameter_count_at_the_default_configuration_equals_the_official_code():
    head = UniADHead(272, (14, 14), UniADParams())
    assert sum(q.numel() for q in head.parameters()) == 7_717_392
    # the layers are copies of one: equal attention input weights and queries at initialisation, as its clones
    assert torch.equal(head.encoder[0].attn.in_proj_weight, head.encoder[3].attn.in_proj_weight)
    assert torch.equal(head.decoder[0].query, head.decoder[3].query)
    assert head.proj_in.bias.abs().sum() == 0 and head.decoder[1].ffn[3].bias.abs().sum() == 0


def test_learned_position_is_column_then_row():
    pos = LearnedPosition((2, 3), 8)
    table = pos()[0]
    assert table.shape == (6, 8)
    assert torch.equal(table[1 * 3 + 2], torch.cat([pos.col[2], pos.row[1]]))
    assert float(pos.row.detach().min()) >= 0 and float(pos.row.detach().max()) <= 1  # U(0, 1)


def test_map_and_image_score_follow_its_code():
    f = torch.randn(2, 5, 4, 4)
    rec = f + torch.arange(16.0).view(1, 1, 4, 4)  # an error growing across the grid
    maps = reconstruction_map(f, rec, (16, 16))
    error = torch.arange(16.0).view(4, 4) * 5**0.5
    torch.testing.assert_close(maps[0, ::5, ::5], error)  # corners aligned: grid points land on pixels 0, 5, 10, 15
    known = torch.zeros(1, 20, 20)
    known[0, :2, :2] = 64.0  # a 16 x 16 window holds at most these 4 pixels: mean 1
    assert pooled_max(known, 16).item() == pytest.approx(1.0)
    assert pooled_max(known[:, :8, :8], 16).item() == pytest.approx(4.0)  # window clipped to the map


def test_an_encoder_token_cannot_see_its_neighbours():
    """A neighbour inside a token's 3 x 3 window changes nothing of its encoder output; one outside does."""
    torch.manual_seed(0)
    block = EncoderBlock(8, 2, 16, dropout=0.0).eval()
    mask, pos = neighbourhood_mask(5, 5, 3), torch.zeros(1, 25, 8)
    x = torch.randn(1, 25, 8)
    inside, outside = x.clone(), x.clone()
    inside[0, 2 * 5 + 3] += 5  # (2, 3): in the window of (2, 2)
    outside[0, 2 * 5 + 4] += 5  # (2, 4): outside it
    with torch.no_grad():
        base = block(x, pos, mask)[0, 12]
        torch.testing.assert_close(block(inside, pos, mask)[0, 12], base)
        assert not torch.allclose(block(outside, pos, mask)[0, 12], base, atol=1e-4)


def test_jitter_only_in_training():
    torch.manual_seed(0)
    head = UniADHead(6, (4, 4), UniADParams(**{**SMALL, "dropout": 0.0}))
    f = torch.randn(2, 6, 4, 4)
    head.eval()
    assert torch.equal(head(f), head(f))
    head.train()
    assert not torch.equal(head(f), head(f))


def test_fixed_same_padding_of_its_efficientnet():
    assert tf_same_padding(95, 5, 2) == (2, 2) and tf_same_padding(56, 5, 2) == (1, 2)
    spec = BackboneSpec("tf_efficientnet_b4", "random-init", 0)
    dynamic = load_timm(spec, (0, 1, 2, 3))
    fixed = static_same_padding(load_timm(spec, (0, 1, 2, 3)), 380)
    same = static_same_padding(load_timm(spec, (0, 1, 2, 3)), 64)
    x = torch.rand(1, 3, 64, 64)
    a, b, c = dynamic(x), fixed(x), same(x)
    assert all(torch.equal(u, w) for u, w in zip(a, c, strict=True))  # fixed at the input's own size: no change
    assert torch.equal(a[0], b[0]) and not torch.equal(a[2], b[2])  # the stride-8 stage's window moves
    assert fixed.variant == "same-padding-380" and not static_same_padding(load_timm(CNN, (0, 1)), 380).variant


@pytest.mark.parametrize("setting,shots", [("full_normal", None), ("few_normal", 2)])
def test_fit_and_predict(catalog, synth_train, setting, shots):
    train, split = synth_train(setting, shots)
    context = MethodContext(catalog["SynthBrain"], setting, shots, 0, 32, torch.device("cpu"), CNN, FeatureCache(None))
    method = UniAD.build(UniADParams(**SMALL, stride=8, epochs=3, batch_size=4), context)
    method.fit(train)
    batch = load_batch(split.test[:4], 32)
    pred = method.predict(batch.unlabelled())
    assert pred.image_scores.shape == (4,) and pred.maps.shape == (4, 32, 32)
    assert ((pred.maps > 0) & (pred.maps < 1)).all() and ((pred.image_scores > 0) & (pred.image_scores < 1)).all()
    assert len(method.history) == 3 and method.history[-1] < method.history[0]


def test_one_class_scores_keep_their_order_far_beyond_the_training_range():
    """UniAD, SimpleNet and MKD calibrate on their normal training images, which test anomalies exceed: the training
    range lands on [1/3, 1/2], and values 1 % apart stay apart in float32 far beyond it, and with one training image."""
    inside = calibration.beyond(torch.tensor([2.0, 3.0, 6.0]), (2.0, 6.0))
    torch.testing.assert_close(inside, torch.tensor([1 / 3, 1.25 / 3.25, 0.5]))  # t / (t + 2), t = 1 + u
    far = torch.tensor([1e2, 1.01e2, 1e4, 1.01e4, 1e5, 1.01e5], dtype=torch.float32)
    out = calibration.beyond(far, (0.0, 1.0))
    assert (out[1:] > out[:-1]).all() and out.max() < 1
    below = calibration.beyond(torch.tensor([-100.0, -10.0, 0.0, 1.9]), (2.0, 6.0))
    assert (below[1:] > below[:-1]).all() and below.min() > 0
    one = calibration.beyond(torch.tensor([7.3, 7.32, 7.5, 8.0, 14.0, 14.1]), (7.32, 7.32))  # K = 1: no range
    assert (one[1:] > one[:-1]).all() and one[1] == 0.5
    # squash, whose margin is 1e-3, ties these (its users calibrate on images that hold anomalies)
    assert calibration.squash(far[4:], (0.0, 1.0)).unique().numel() == 1
