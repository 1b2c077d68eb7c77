import math

import numpy as np
import pytest
import torch

from benchmark.backbones.cache import FeatureCache
from benchmark.data.loading import ImageBatch
from benchmark.data.splits import make_split
from benchmark.method import MethodContext, TrainSet
from benchmark.protocol import BackboneSpec
from methods.models.bgad import (
    BGAD,
    BGADParams,
    bgspp_loss,
    boundaries,
    conditional_flow,
    log_likelihood,
    positional_encoding_2d,
)

CNN = BackboneSpec("mobilenetv3_small_050", "random-init", 0)


def test_log_likelihood_matches_change_of_variables():
    # FrEIA draws its soft permutations from numpy's global generator and stores them in float32, so they
    # are orthogonal to ~1e-7 while it counts their log-determinant as 0: hence the 1e-6 tolerance.
    np.random.seed(0)
    torch.manual_seed(0)
    flow = conditional_flow(4, 4, blocks=2).double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    cond = torch.randn(3, 4, dtype=torch.float64)
    z, log_jac_det = flow(x, c=[cond])
    ours = log_likelihood(z, log_jac_det)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v, i=i: flow(v.unsqueeze(0), c=[cond[i : i + 1]])[0][0], x[i])
        log_det = torch.linalg.slogdet(jac).logabsdet
        direct = (-0.5 * (z[i] ** 2).sum() - 4 * 0.5 * math.log(2 * math.pi) + log_det) / 4
        assert ours[i].item() == pytest.approx(direct.item(), abs=1e-6)


def test_boundaries_and_loss_by_hand():
    logps = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0, 0.5, -2.5, -9.0])
    mask = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    # normal logps sorted: -5, -4, -3, -2, -1; beta 0.4 -> position int(5 * 0.4) = 2 -> -3; / 10
    b_n, b_a = boundaries(logps, mask, beta=0.4, tau=0.1, normalizer=10)
    assert b_n.item() == pytest.approx(-0.3) and b_a.item() == pytest.approx(-0.4)
    loss_n, loss_a = bgspp_loss(logps, mask, (b_n, b_a), normalizer=10)
    # pulled normals: -0.3, -0.4, -0.5 (<= -0.3) -> mean(0, 0.1, 0.2) = 0.1
    assert loss_n.item() == pytest.approx(0.1)
    # pushed anomalies: 0.05 and -0.25 (>= -0.4) -> mean(0.45, 0.15) = 0.3
    assert loss_a.item() == pytest.approx(0.3)


def test_empty_selections_give_zero_not_nan():
    logps = torch.tensor([-1.0, -2.0, -50.0])
    mask = torch.tensor([0, 0, 1])
    bounds = boundaries(logps, mask, beta=0.05)
    loss_n, loss_a = bgspp_loss(logps, mask, bounds)
    assert loss_a.item() == 0.0 and not torch.isnan(loss_n)
    only_normal = bgspp_loss(logps[:2], mask[:2], bounds)
    assert only_normal[1].item() == 0.0


def test_positional_encoding_layout():
    enc = positional_encoding_2d(8, 3, 5)
    assert enc.shape == (8, 3, 5)
    assert torch.equal(enc[0, 0], torch.sin(torch.arange(5.0)))  # first half varies along the width
    assert torch.equal(enc[4, :, 0], torch.sin(torch.arange(3.0)))  # second half along the height


def test_training_lowers_loss_and_backbone_stays_frozen(catalog, synth_root):
    params = BGADParams(
        meta_epochs=4,
        sub_epochs=2,
        n_batch=512,
        coupling_blocks=2,
        pos_embed_dim=16,
        lr=2e-3,
        warmup_epochs=1,
        progress=False,
    )
    context = MethodContext(catalog["SynthBrain"], "few_shot", 2, 0, 64, torch.device("cpu"), CNN, FeatureCache(None))
    method = BGAD.build(params, context)
    before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    split = make_split(synth_root, catalog, "SynthBrain", "few_shot", 2, 0)
    train = TrainSet(split.train, "few_shot", 2, 64, {"SynthBrain": catalog["SynthBrain"]}, split.valid)
    method.fit(train)
    assert method.history[-1] < method.history[1]
    assert all(p.grad is None and not p.requires_grad for p in method.backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in method.backbone.state_dict().items())
    batch = train.load()
    pred = method.predict(ImageBatch(batch.images, batch.keys))
    assert pred.maps.shape == (4, 64, 64) and pred.maps.min() >= 0 and pred.maps.max() <= 1
    assert len(method.reference) == 3


def test_anomalous_images_are_repeated_within_an_epoch():
    from methods.models.bgad import epoch_indices

    normal_image = torch.tensor([True] * 6 + [False] * 2)
    g = torch.Generator().manual_seed(0)
    assert sorted(epoch_indices(normal_image, 0, 5, g).tolist()) == list(range(6))  # first epoch: normal only
    later = epoch_indices(normal_image, 1, 5, g).tolist()
    assert sorted(later) == list(range(6)) + [6] * 5 + [7] * 5
