import pytest
import torch

from benchmark.backbones.attention import block_attention, value_attention_block
from benchmark.backbones.cache import FeatureCache
from benchmark.backbones.clip import load_clip
from benchmark.data.loading import ImageBatch
from benchmark.errors import BenchmarkError
from benchmark.method import MethodContext
from benchmark.protocol import BackboneSpec
from methods.aaclip import AACLIP, AACLIPParams
from methods.models import calibration
from methods.models.aaclip import ImageAdapters, TextAdapters, gaussian_blur

TINY = BackboneSpec("tiny-vit", "random-init", 0)
SMALL = dict(levels=(1, 2, 3, 4), image_adapt_until=2, text_adapt_until=1, vv_blocks=3, blur_kernel=3, blur_sigma=1.0)


def _method(catalog, setting="supervised", cache=None, **kw) -> AACLIP:
    context = MethodContext(
        catalog["SynthBrain"], setting, 2, 0, 32, torch.device("cpu"), TINY, cache or FeatureCache(None)
    )
    params = AACLIPParams(**{**SMALL, "text_epochs": 1, "image_epochs": 1, "progress": False, **kw})
    return AACLIP.build(params, context)


def test_parameter_counts_at_the_default_configuration_equal_the_official_code():
    # its AdaptedCLIP on ViT-L-14-336 (text width 768, vision width 1024, D 768): 2,359,296 + 10,223,616
    backbone = load_clip(BackboneSpec("ViT-L-14-336", "random-init", 0), 336)
    p = AACLIPParams()
    text = TextAdapters(backbone, p.text_adapt_until, p.text_adapt_weight)
    image = ImageAdapters(backbone, p.levels, p.image_adapt_until, p.image_adapt_weight)
    assert sum(q.numel() for q in text.parameters()) == 2_359_296
    assert sum(q.numel() for q in image.parameters()) == 10_223_616
    # its checkpoints' names
    assert set(text.state_dict()) == {
        "layers.0.fc.0.weight",
        "layers.1.fc.0.weight",
        "layers.2.fc.0.weight",
        "layers.3.fc.0.weight",
    }
    assert {"layer_adapters.5.fc.0.weight", "seg_proj.3.fc.weight", "det_proj.fc.weight"} <= set(image.state_dict())


def test_value_attention_block_across_the_batch_mixes_images_and_per_image_does_not():
    backbone = load_clip(TINY, 32)
    x = backbone.embed(torch.rand(3, 3, 32, 32))
    block = backbone.blocks[0]
    with torch.no_grad():
        alone = value_attention_block()(block, x[:1])
        together = value_attention_block()(block, x)
        mixed = value_attention_block(across_batch=True)(block, x)
        mixed_alone = value_attention_block(across_batch=True)(block, x[:1])
        (vv,) = block_attention(block, block.ln_1(x[:1]), (("v", "v"),))
    torch.testing.assert_close(together[:1], alone, atol=1e-6, rtol=1e-6)
    assert (mixed[:1] - mixed_alone).abs().max() > 1e-3  # official: another image changes image 0's tokens
    h = x[:1] + vv
    torch.testing.assert_close(alone, h + block.mlp(block.ln_2(h)))  # FFN kept, one stream


def test_gaussian_blur_equals_a_dense_reflect_padded_convolution():
    maps = torch.rand(2, 9, 9)
    out = gaussian_blur(maps, 5, 1.5)
    t = torch.arange(5.0) - 2
    w = torch.exp(-(t**2) / (2 * 1.5**2))
    kernel = torch.outer(w, w) / w.sum() ** 2
    padded = torch.nn.functional.pad(maps[:, None], (2, 2, 2, 2), mode="reflect")
    dense = torch.nn.functional.conv2d(padded, kernel[None, None])[:, 0]
    torch.testing.assert_close(out, dense)
    assert torch.equal(gaussian_blur(maps, 1, 1.5), maps)


@pytest.mark.parametrize("setting", ["zero_shot_loo", "few_shot", "supervised"])
@pytest.mark.parametrize("mode", ["official", "paper"])
def test_each_setting_and_mode_trains_and_predicts_in_range(catalog, setting, mode, synth_train):
    shots = 2 if setting == "few_shot" else None
    train, split = synth_train(setting, shots)
    method = _method(catalog, setting=setting, mode=mode)
    method.fit(train)
    batch = train.subset(split.test[:3]).load()
    out = method.predict(ImageBatch(batch.images, batch.keys))
    assert out.maps.shape == (3, 32, 32) and out.image_scores.shape == (3,)
    assert out.maps.min() >= 0 and out.maps.max() <= 1
    torch.testing.assert_close(out.image_scores, out.maps.flatten(1).amax(-1))
    assert method.text_history and method.history


def test_official_stage_one_trains_on_the_last_level_only(catalog, synth_train):
    train, _ = synth_train("supervised")
    batch = train.subset(train.anomalous[:4]).load()
    assert batch.masks.any()
    losses = {}
    for mode in ("official", "paper"):
        method = _method(catalog, mode=mode)
        features = method.stage1_encode(batch.images)
        anchors = torch.stack([method.text_adapters.anchors("brain")] * 4)
        flags = torch.ones(4, dtype=torch.bool)
        losses[mode] = method.stage1_loss(features, anchors, batch.masks, flags)
        grads = torch.autograd.grad(losses[mode], list(method.text_adapters.parameters()), allow_unused=True)
        assert all(g is not None for g in grads)
    assert losses["paper"] > losses["official"] + 0.5  # four levels' seg losses against one


def test_training_lowers_the_loss_on_a_fixed_batch(catalog, synth_train):
    train, _ = synth_train("supervised")
    fixed = train.subset(train.samples[:8])
    assert {s.label for s in fixed.samples} == {0, 1}
    method = _method(catalog, image_epochs=8, image_lr=1e-2, image_batch_size=8, augment=False, text_epochs=0)
    method.fit(fixed)
    assert method.history[-1] < method.history[0]


def test_stage_one_features_from_the_cache_equal_uncached_ones(catalog, tmp_path, synth_train):
    train, _ = synth_train("supervised")
    batch = train.subset(train.samples[:3]).load()
    cache = FeatureCache(tmp_path)
    method = _method(catalog, cache=cache, mode="paper")
    first = method.stage1_features(batch.images, batch.keys)
    again = method.stage1_features(batch.images, batch.keys)
    plain = method.stage1_encode(batch.images)
    assert cache.hits == 3
    for key in plain:
        torch.testing.assert_close(first[key], plain[key])
        torch.testing.assert_close(again[key], plain[key])
    # official: a feature depends on the batch's other images, so the batch runs whole (never padded or chunked)
    official = _method(catalog, cache=cache, mode="official")
    nine = train.subset(train.samples[:9]).load()
    whole = official.stage1_features(nine.images, nine.keys)
    for key, value in official.stage1_encode(nine.images).items():
        torch.testing.assert_close(whole[key], value)


def test_only_the_adapters_train_and_bad_sizes_are_refused(catalog, synth_train):
    train, _ = synth_train("supervised")
    method = _method(catalog)
    frozen = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    start = [q.detach().clone() for q in method.image_adapters.parameters()]
    method.fit(train.subset(train.samples[:6]))
    assert all(torch.equal(v, method.backbone.state_dict()[k]) for k, v in frozen.items())
    assert all((a - b).abs().max() > 0 for a, b in zip(start, method.image_adapters.parameters(), strict=True))
    with pytest.raises(BenchmarkError, match="text_adapt_until 3 exceeds the 2 text blocks"):
        _method(catalog, text_adapt_until=3)
    with pytest.raises(BenchmarkError, match="blur_kernel must be odd"):
        _method(catalog, blur_kernel=4)


def test_calibrated_scores_keep_the_order_beyond_the_calibration_range():
    # the code min-max normalises over the test set (no ties); ours over calibration images, strictly increasing
    raw = torch.tensor([-3.0, 0.0, 1.0, 2.0, 3.0, 5.0, 9.0])
    out = calibration.squash(raw, (1.0, 5.0))
    assert (out[1:] > out[:-1]).all() and out.min() > 0 and out.max() < 1
    torch.testing.assert_close(out[3], torch.tensor(0.25 * (1 - 2e-3) + 1e-3))  # linear inside the range
    assert calibration.squash(torch.tensor([3.0]), (1.0, 5.0)).item() == pytest.approx(0.5)
