import shutil

import pytest
import torch

from benchmark.backbones.cache import FeatureCache
from benchmark.backbones.clip import load_clip
from benchmark.data.loading import ImageBatch
from benchmark.data.splits import make_split
from benchmark.method import MethodContext, TrainSet
from benchmark.protocol import BackboneSpec
from methods.models.losses import dice_loss, focal_loss
from methods.models.mvfa import MVFA, MVFAModel, MVFAParams, augment

TINY = BackboneSpec("tiny-vit", "random-init", 0)


def _method(catalog, setting="few_shot", mode="official", epochs=2, **kw) -> MVFA:
    context = MethodContext(catalog["SynthBrain"], setting, 2, 0, 32, torch.device("cpu"), TINY, FeatureCache(None))
    return MVFA.build(MVFAParams(mode=mode, layers=(1, 2, 3, 4), epochs=epochs, progress=False, **kw), context)


def _train(catalog, root, setting="few_shot", shots=2) -> TrainSet:
    split = make_split(root, catalog, "SynthBrain", setting, shots, 0, ("SynthLiver", "SynthRetina"))
    specs = {name: catalog[name] for name in {s.dataset for s in split.train} | {"SynthBrain"}}
    return TrainSet(split.train, setting, shots, 32, specs, split.valid)


def test_adapters_change_next_block_input_exactly():
    backbone = load_clip(TINY, 32)
    model = MVFAModel(backbone, layers=(2,), bottleneck=16)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        model(images)
        x0 = backbone.embed(images)
        _, plain = backbone.run_blocks(x0, layers=(2,), end=2)
        x2 = plain[2]
        seg_hidden, seg_out = model.adapters.seg[0](x2)
        _, det_out = model.adapters.det[0](x2)
        expected_in = 0.8 * x2 + 0.1 * seg_out + 0.1 * det_out
        expected_out3 = backbone.blocks[2](expected_in)
        _, adapted = backbone.run_blocks(x0, layers=(3,), adapters=model.adapters.hooks(), end=3)
    torch.testing.assert_close(adapted[3], expected_out3)
    torch.testing.assert_close(model.adapters.seg_features[0], seg_hidden)
    assert seg_hidden.shape[-1] == 16


def test_losses_on_known_values():
    # channels [normal, anomalous] of two pixels: pixel 0 says anomalous, pixel 1 says normal
    probs = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).view(1, 2, 1, 2)
    target = torch.tensor([[[1, 0]]])
    assert focal_loss(probs, target) < 1e-6
    assert focal_loss(probs, 1 - target) > 5  # both pixels confidently wrong
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    t = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert dice_loss(p, t).item() == pytest.approx(1 - (2 * 1.0 + 1) / (1.0 + 2.0 + 1))


def test_augment_is_elevenfold_and_keeps_masks_aligned():
    images = torch.zeros(1, 3, 16, 16)
    masks = torch.zeros(1, 16, 16, dtype=torch.bool)
    images[..., 2:6, 3:8] = 1.0
    masks[..., 2:6, 3:8] = True
    out_i, out_m = augment(images, masks)
    assert out_i.shape == (11, 3, 16, 16) and out_m.shape == (11, 16, 16)
    assert ((out_i[:, 0] > 0.5) == out_m).float().mean() > 0.97
    assert torch.equal(out_m[-1], masks[0].flip(-2)) and torch.equal(out_m[-2], masks[0].flip(-1))


@pytest.mark.parametrize("mode", ["official", "paper"])
def test_memory_branch_is_zero_for_a_reference_image(catalog, synth_root, mode):
    method = _method(catalog, mode=mode, epochs=1)
    train = _train(catalog, synth_root)
    method.fit(train)
    reference = train.subset(train.normal[:1]).load().images
    raw = method.raw(reference)
    assert raw["map_few"].abs().max() < 1e-4
    other = train.subset(train.anomalous[:1]).load().images
    assert method.raw(other)["map_few"].max() > 1e-3


@pytest.mark.parametrize("mode", ["official", "paper"])
def test_training_lowers_the_loss_and_scores_are_per_image(catalog, synth_root, mode):
    method = _method(catalog, mode=mode, epochs=6, batch_size=4, lr=3e-3)
    train = _train(catalog, synth_root, setting="supervised", shots=None)
    method.fit(train)
    assert method.history[-1] < method.history[0]
    batch = train.subset(train.samples[:3]).load()
    full = method.predict(ImageBatch(batch.images, batch.keys))
    one = method.predict(ImageBatch(batch.images[:1], batch.keys[:1]))
    torch.testing.assert_close(one.maps[0], full.maps[0], atol=1e-5, rtol=0)
    assert full.maps.min() >= 0 and full.maps.max() <= 1 and full.image_scores.shape == (3,)


def test_zero_shot_loo_trains_on_other_datasets_without_target_files(catalog, synth_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    shutil.rmtree(root / "SynthBrain_AD" / "train")
    shutil.rmtree(root / "SynthBrain_AD" / "valid")
    method = _method(catalog, setting="zero_shot_loo", epochs=1, batch_size=8)
    train = _train(catalog, root, setting="zero_shot_loo", shots=None)
    assert {s.dataset for s in train.samples} == {"SynthLiver", "SynthRetina"} and not train.valid
    method.fit(train)
    # each training image is aligned with its own dataset's organ word (as the official code)
    assert method.memory is None and {"liver", "retinal OCT"} <= set(method.text_cache)
    assert set(method.stats) == {"map_zero", "img_zero"}


def test_official_mode_selects_epoch_on_validation(catalog, synth_root):
    method = _method(catalog, epochs=3)
    method.fit(_train(catalog, synth_root))
    assert method.selected_epoch in (0, 1, 2)
    assert method.describe()["selected_epoch"] == method.selected_epoch
