"""SimpleNet: its pieces as its official code computes them and the plugin end to end (parity with the official
code under identical weights: the README's fidelity table)."""

import pytest
import torch
import torch.nn.functional as F

from benchmark.backbones.cache import FeatureCache
from benchmark.backbones.cnn import load_timm
from benchmark.data.loading import load_batch
from benchmark.method import MethodContext
from benchmark.protocol import BackboneSpec
from methods.models.simplenet import discriminator, drift_batch_norm, patch_embedding, truncated_l1
from methods.simplenet import SimpleNet, SimpleNetParams

RESNET = BackboneSpec("resnet18", "random-init", 0)
SMALL = dict(pretrain_dim=64, target_dim=64, dsc_hidden=32, epochs=2, batch_size=4, sigma=1.0, progress=False)


def test_patch_embedding_is_patchcores_local_aggregation():
    torch.manual_seed(0)
    f2, f3 = torch.randn(2, 512, 6, 6), torch.randn(2, 1024, 3, 3)
    ours = patch_embedding([f2, f3], 3, 1536, 1536)
    assert ours.shape == (2 * 36, 1536)
    # with these widths the adaptive poolings divide exactly: means of 6 (layer2) and 12 (layer3) unfolded entries
    p2 = F.unfold(f2, 3, padding=1).transpose(1, 2).reshape(72, -1)
    up = F.interpolate(F.unfold(f3, 3, padding=1).reshape(2, 1024 * 9, 3, 3), (6, 6), mode="bilinear")
    p3 = up.flatten(2).transpose(1, 2).reshape(72, -1)
    by_hand = torch.cat([F.avg_pool1d(p2[:, None], 6)[:, 0], F.avg_pool1d(p3[:, None], 12)[:, 0]], 1)
    torch.testing.assert_close(ours, by_hand, atol=1e-5, rtol=1e-5)
    # the unfolded layer3 is resized entry by entry: not the same as resizing the map, then unfolding
    resized_first = F.unfold(F.interpolate(f3, (6, 6), mode="bilinear"), 3, padding=1).transpose(1, 2).reshape(72, -1)
    assert not torch.allclose(p3, resized_first, atol=1e-3)


def test_discriminator_and_loss_follow_its_code():
    net = discriminator(16, 8)
    assert [type(m).__name__ for m in net] == ["Linear", "BatchNorm1d", "LeakyReLU", "Linear"]
    assert net[3].bias is None and net[2].negative_slope == 0.2
    assert sum(q.numel() for q in discriminator(1536, 1024).parameters()) == 1536 * 1024 + 1024 + 2 * 1024 + 1024
    true, fake = torch.tensor([0.7, 0.2, -1.0]), torch.tensor([-0.7, 0.0, 1.0])
    # normal scores wanted >= 0.5, noisy ones <= -0.5
    assert truncated_l1(true, fake, 0.5).item() == pytest.approx((0 + 0.3 + 1.5) / 3 + (0 + 0.5 + 1.5) / 3)


def test_batch_norm_drift_is_one_training_step_on_an_all_ones_image():
    backbone = load_timm(RESNET, (2, 3))
    bn = backbone.model.layer2[0].bn1
    before_mean, before_var = bn.running_mean.clone(), bn.running_var.clone()
    seen = []
    hook = bn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    x = torch.rand(1, 3, 32, 32)
    reference = backbone(x)
    seen.clear()
    drift_batch_norm(backbone, 32)
    hook.remove()
    assert not backbone.model.training and backbone.variant == "bn-drift-ones-32"
    # momentum 0.1 towards the statistics of what the all-ones image brought to this layer
    (batch,) = seen
    torch.testing.assert_close(bn.running_mean, 0.9 * before_mean + 0.1 * batch.mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var, 0.9 * before_var + 0.1 * batch.var((0, 2, 3), unbiased=True))
    assert not torch.equal(backbone(x)[0], reference[0])


@pytest.mark.parametrize("setting,shots", [("full_normal", None), ("few_normal", 2)])
def test_fit_and_predict(catalog, synth_train, setting, shots):
    train, split = synth_train(setting, shots)
    context = MethodContext(catalog["SynthBrain"], setting, shots, 0, 32, torch.device("cpu"), RESNET,
                            FeatureCache(None))  # fmt: skip
    method = SimpleNet.build(SimpleNetParams(**SMALL), context)
    method.fit(train)
    batch = load_batch(split.test[:4], 32)
    pred = method.predict(batch.unlabelled())
    assert pred.image_scores.shape == (4,) and pred.maps.shape == (4, 32, 32)
    assert ((pred.maps > 0) & (pred.maps < 1)).all() and ((pred.image_scores > 0) & (pred.image_scores < 1)).all()
    assert len(method.history) == 2
