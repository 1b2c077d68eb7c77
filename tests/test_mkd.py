"""MKD: one test per equation of the paper (its code has no licence: implemented from the paper), its cloner as its
Fig. 2, and the plugin end to end on synthetic images."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from benchmark.backbones.cache import FeatureCache
from benchmark.data.loading import load_batch
from benchmark.method import MethodContext
from benchmark.protocol import BackboneSpec
from methods.mkd import CLONER, MKD, MKDParams
from methods.models.maps import gaussian, opening
from methods.models.mkd import Cloner, critical_layers, direction_loss, value_loss

RESNET = BackboneSpec("resnet18", "random-init", 0)  # a fast source: its 4 stages max-pooled, strides 8 to 64
RESNET_CLONER = (8, 0, 8, 0, 8, 64, 0, 8, 128, 0, 8, 256, 0, 8, 512, 0)  # 6 pools: the last 4 match them


def _method(catalog, **kw) -> MKD:
    context = MethodContext(catalog["SynthBrain"], "full_normal", None, 0, 64, torch.device("cpu"), RESNET,
                            FeatureCache(None))  # fmt: skip
    params = {"cloner": RESNET_CLONER, "epochs": 2, "batch_size": 4, "sigma": 1.0, "progress": False, **kw}
    return MKD.build(MKDParams(**params), context)


def test_cloner_is_its_smaller_network():
    cloner = Cloner(CLONER, 4)
    # the official 'B' cloner: 343,984 parameters, critical layers at its features' indices 11, 20, 29, 38
    assert sum(q.numel() for q in cloner.parameters()) == 343_984 and cloner.taps == [11, 20, 29, 38]
    assert all(m.bias is None for m in cloner.modules() if isinstance(m, torch.nn.Conv2d))
    shapes = [tuple(m.shape[1:]) for m in cloner(torch.rand(1, 3, 128, 128))]
    assert shapes == [(128, 32, 32), (256, 16, 16), (512, 8, 8), (512, 4, 4)]  # VGG-16's pool2-pool5 at 128 px
    with pytest.raises(ValueError, match="fewer than 4"):
        Cloner((16, 0, 16, 0), 4)


def test_critical_layers_are_vgg16s_pools():
    import timm
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    features = make_layers(cfgs["D"]).eval()  # torchvision's vgg16().features
    points = timm.create_model("vgg16", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4)).eval()
    points.load_state_dict({f"features_{k}": v for k, v in features.state_dict().items()})
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ours = critical_layers(points(x))
        for tap, index in zip(ours, (9, 16, 23, 30), strict=True):  # Fig. 2: S_9, S_16, S_23, S_30
            assert torch.equal(tap, features[: index + 1](x))


def test_eq1_value_loss_is_a_mean_squared_difference_per_layer():
    s = [torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 2, 2)]
    c = [torch.ones(2, 3, 4, 4), torch.full((2, 5, 2, 2), 2.0)]
    c[0][1] = 0
    assert value_loss(s, c).tolist() == [1.0 + 4.0, 0.0 + 4.0]  # (1 / N_i) sum_j per layer, summed over layers


def test_eq3_direction_loss_ignores_scale_and_sees_direction():
    s = [torch.rand(2, 3, 4, 4) + 0.1]
    assert torch.allclose(direction_loss(s, [3 * s[0]]), torch.zeros(2), atol=1e-6)  # same direction: 0
    flipped = [-s[0]]
    assert torch.allclose(direction_loss(s, flipped), torch.full((2,), 2.0))  # opposite: 1 - (-1)
    other = [torch.rand(2, 3, 4, 4)]
    by_hand = 1 - F.cosine_similarity(s[0].flatten(1), other[0].flatten(1), dim=1)
    torch.testing.assert_close(direction_loss(s, other), by_hand)


def test_eq4_total_loss_weights_both_terms(catalog):
    method = _method(catalog, value_weight=0.5, direction_weight=2.0)
    s, c = [torch.rand(2, 3, 4, 4)], [torch.rand(2, 3, 4, 4)]
    torch.testing.assert_close(method.total_loss(s, c), 0.5 * value_loss(s, c) + 2.0 * direction_loss(s, c))


def test_eq5_6_map_is_the_smoothed_opened_input_gradient(catalog):
    method = _method(catalog)
    method.cloner.eval()
    images = torch.rand(2, 3, 64, 64)
    x = method.inputs(images).requires_grad_(True)  # both networks see the normalised images
    (grad,) = torch.autograd.grad(method.score(x).sum(), x)
    _, maps = method.raw(images)
    torch.testing.assert_close(maps, opening(gaussian(grad.abs().sum(1), 1.0)))
    # Eq. 5's full derivative runs through the frozen source as well as the cloner
    keep = method.params.score_levels
    z = x.detach().requires_grad_(True)
    source = [m.detach() for m in critical_layers(method.backbone.model(z))]
    clone = method.cloner(z)
    cloner_only = method.total_loss([source[i] for i in keep], [clone[i] for i in keep])
    (partial,) = torch.autograd.grad(cloner_only.sum(), z)
    assert not torch.allclose(grad, partial, atol=1e-6)
    assert all(not q.requires_grad for q in method.backbone.parameters())
    bump = torch.zeros(1, 5, 5)
    bump[0, 2, 2] = 1.0  # a single pixel: an opening with the 3 x 3 cross removes it
    assert opening(bump).abs().sum() == 0 and opening(torch.ones(1, 5, 5)).min() == 1


def test_cloner_must_match_the_source(catalog):
    with pytest.raises(ValueError, match="do not match the source"):
        _method(catalog, cloner=CLONER)
    with pytest.raises(ValueError, match="score_levels"):
        _method(catalog, score_levels=(3, 4))


def test_fit_and_predict(catalog, synth_train):
    train, split = synth_train("few_normal", 2)
    method = _method(catalog, epochs=3)
    method.fit(dataclasses.replace(train, image_size=64))
    batch = load_batch(split.test[:4], 64)
    pred = method.predict(batch.unlabelled())
    assert pred.image_scores.shape == (4,) and pred.maps.shape == (4, 64, 64)
    assert ((pred.maps > 0) & (pred.maps < 1)).all() and ((pred.image_scores > 0) & (pred.image_scores < 1)).all()
    assert method.history[-1] < method.history[0]
