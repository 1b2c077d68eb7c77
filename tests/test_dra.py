"""DRA: one test per equation of the paper (its code is AGPL: implemented from the paper), and the plugin end to
end on synthetic images."""

import math

import pytest
import torch

from benchmark.backbones.cache import FeatureCache
from benchmark.method import MethodContext
from benchmark.protocol import BackboneSpec
from methods.dra import DRA, DRAParams
from methods.models.dra import (
    NORMAL,
    PSEUDO,
    SEEN,
    DRANet,
    PatchHead,
    cutmix,
    cycle,
    deviation_loss,
    head_losses,
    top_k_mean,
)
from methods.models.maps import input_gradients

RESNET = BackboneSpec("resnet18", "random-init", 0)
FAST = dict(batch_size=6, steps_per_epoch=2, epochs=1, references=2, progress=False)


def _net(scales: int = 2) -> DRANet:
    import timm

    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0, global_pool="")
    return DRANet(backbone, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 0.1, 16, scales).eval()


def test_eq3_top_k_mean_of_patch_scores():
    patches = torch.arange(40.0).view(2, 4, 5)  # 20 patches: K = 10 % = 2
    assert torch.equal(top_k_mean(patches, 0.1), torch.tensor([18.5, 38.5]))
    assert torch.equal(top_k_mean(patches[:, :1, :3], 0.1), torch.tensor([2.0, 22.0]))  # K at least 1
    head = PatchHead(8, 0.5)
    f = torch.randn(3, 8, 2, 2)
    with torch.no_grad():
        by_hand = torch.einsum("bchw,c->bhw", f, head.scorer.weight.view(8)) + head.scorer.bias
        torch.testing.assert_close(head.patches(f), by_hand.abs())
        torch.testing.assert_close(head(f), by_hand.abs().flatten(1).topk(2, 1).values.mean(1))


def test_eq4_cutmix_pastes_a_jittered_rectangle_of_the_image_into_itself():
    image = torch.rand(3, 40, 40)
    p = DRAParams(jitter=0.0)
    out = cutmix(image, p, torch.Generator().manual_seed(3))
    changed = (out != image).any(0)
    ys, xs = changed.nonzero(as_tuple=True)
    area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    assert changed.any() and area <= 0.15 * 1600 + 40  # the pasted rectangle, at most 15 % (rounding)
    # without jitter the pasted pixels are pixels of the same image, moved
    assert set(out[0][changed].tolist()) <= set(image[0].flatten().tolist())
    jittered = cutmix(image, DRAParams(jitter=0.1), torch.Generator().manual_seed(3))
    assert not torch.equal(jittered, out) and torch.equal(jittered[:, ~changed], image[:, ~changed])


def test_eq7_residual_head_scores_reference_minus_input():
    net = _net(scales=1)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        f = net.features(images, 0)
        ref = torch.randn_like(f[:1])
        scores = net.head_scores(f, ref)
        torch.testing.assert_close(scores["residual"], net.residual(ref - f))
        # M_r = M_x: the residual map is zero, whatever the image
        same = net.head_scores(f, f)["residual"]
        torch.testing.assert_close(same, net.residual(torch.zeros_like(f)))


def test_eq9_normality_head_on_the_mean_patch_vector():
    net = _net(scales=1)
    f = torch.randn(2, 512, 3, 3)
    shuffled = f.flatten(2)[:, :, torch.randperm(9)].view(2, 512, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(net.normal(f), net.normal(shuffled))  # no spatial order: a mean
        torch.testing.assert_close(net.normal(f), net.normal.mlp(f.mean((2, 3))).abs()[:, 0])


def test_eq10_11_deviation_loss():
    scores = torch.tensor([0.5, -2.0, 7.0, 3.0])
    targets = torch.tensor([0.0, 0.0, 1.0, 1.0])
    # mu 0, sigma 1: normal |dev|, anomalous max(0, 5 - dev)
    assert deviation_loss(scores, targets, 5.0, None) == pytest.approx((0.5 + 2.0 + 0.0 + 2.0) / 4)
    prior = torch.tensor([1.0, 3.0])  # mean 2, std sqrt(2)
    dev = (scores - 2) / math.sqrt(2)
    by_hand = ((1 - targets) * dev.abs() + targets * (5 - dev).clamp(min=0)).mean()
    torch.testing.assert_close(deviation_loss(scores, targets, 5.0, prior), by_hand)


def test_eq1_heads_see_their_own_samples_and_targets():
    labels = torch.tensor([NORMAL, SEEN, PSEUDO, NORMAL])
    scores = {k: torch.tensor([1.0, 2.0, 3.0, 4.0]) for k in DRANet.HEADS}
    out = head_losses(scores, labels, 5.0, None)
    assert out["seen"] == pytest.approx((1 + 3 + 4) / 3)  # normal 1, 4 -> |dev|; seen 2 -> 5 - 2
    assert out["pseudo"] == pytest.approx((1 + 2 + 4) / 3)  # pseudo 3 -> 5 - 3
    assert out["residual"] == pytest.approx((1 + 3 + 2 + 4) / 4)  # seen and pseudo positive
    assert out["normal"] == pytest.approx((4 + 2 + 3 + 1) / 4)  # normal positive: 5 - 1, 5 - 4; others |dev|
    # a batch without pseudo anomalies or without seen ones: the head of the other still trains, on normals
    one = {k: v[:1] for k, v in scores.items()}
    assert set(head_losses(one, torch.tensor([PSEUDO]), 5.0, None)) == {"pseudo", "residual", "normal"}


def test_composite_score_over_the_pyramid():
    net = _net(scales=2)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        refs = [net.features(images[:1], s) for s in range(2)]
        parts = [net.head_scores(net.features(images, s), refs[s]) for s in range(2)]
        mean = {k: (parts[0][k] + parts[1][k]) / 2 for k in DRANet.HEADS}
        torch.testing.assert_close(
            net.score(images, refs), mean["seen"] + mean["pseudo"] + mean["residual"] - mean["normal"]
        )
        assert net.features(images, 1).shape[-1] == net.features(images[:, :, :32, :32], 0).shape[-1]


def test_gradient_map_is_each_images_own():
    net = _net(scales=1)
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        refs = [net.features(images[:2], 0).mean(0, keepdim=True)]
    scores, both = input_gradients(lambda x: net.score(x, refs), images)
    _, one = input_gradients(lambda x: net.score(x, refs), images[1:2])
    torch.testing.assert_close(both[1:2], one, atol=1e-6, rtol=1e-5)
    assert both.shape == (3, 64, 64) and (both >= 0).all()
    with torch.no_grad():
        torch.testing.assert_close(scores, net.score(images, refs))  # the scores of the same forward pass


@pytest.mark.parametrize("setting", ["few_shot", "supervised"])
def test_fit_and_predict(catalog, synth_train, setting):
    train, split = synth_train(setting, 2)
    context = MethodContext(catalog["SynthBrain"], setting, 2, 0, 32, torch.device("cpu"), RESNET, FeatureCache(None))
    method = DRA.build(DRAParams(**FAST), context)
    method.fit(train)
    from benchmark.data.loading import load_batch

    batch = load_batch(split.test[:4], 32)
    pred = method.predict(batch.unlabelled())
    assert pred.image_scores.shape == (4,) and pred.maps.shape == (4, 32, 32)
    assert ((pred.maps > 0) & (pred.maps < 1)).all() and ((pred.image_scores > 0) & (pred.image_scores < 1)).all()
    again = method.predict(batch.unlabelled())
    assert torch.equal(pred.image_scores, again.image_scores)  # a fixed reference set: deterministic scores
    assert method.history and math.isfinite(method.history[0])


def test_samplers_cycle_through_random_orders():
    """Its samplers: every normal image (and every seen anomaly) once per random order, then a new order."""
    nxt = cycle(4, torch.Generator().manual_seed(0))
    first, second = [nxt() for _ in range(4)], [nxt() for _ in range(4)]
    assert sorted(first) == sorted(second) == [0, 1, 2, 3] and first != second
