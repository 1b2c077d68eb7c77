import shutil

import pytest
import torch
import torch.nn.functional as F

from benchmark.backbones.cache import FeatureCache
from benchmark.backbones.clip import load_clip
from benchmark.data.loading import ImageBatch
from benchmark.data.splits import make_split
from benchmark.method import MethodContext, TrainSet
from benchmark.protocol import BackboneSpec
from methods.april_gan import AprilGAN, AprilGANParams
from methods.models.april_gan import LinearProjections, reference_distance, text_logits

TINY = BackboneSpec("tiny-vit", "random-init", 0)
OTHERS = ("SynthLiver", "SynthRetina")


def _method(catalog, setting="few_normal", epochs=2, cache=None, **kw) -> AprilGAN:
    context = MethodContext(catalog["SynthBrain"], setting, 2, 0, 32, torch.device("cpu"), TINY, FeatureCache(cache))
    params = AprilGANParams(layers=(1, 2, 3, 4), memory_layers=(2, 4), epochs=epochs, progress=False, **kw)
    return AprilGAN.build(params, context)


def _train(catalog, root, setting="few_normal", shots=2) -> TrainSet:
    split = make_split(root, catalog, "SynthBrain", setting, shots, 0, OTHERS)
    names = {s.dataset for s in (*split.train, *split.auxiliary)} | {"SynthBrain"}
    specs = {name: catalog[name] for name in names}
    return TrainSet(split.train, setting, shots, 32, specs, split.valid, auxiliary=split.auxiliary)


def test_parameter_count_at_the_default_configuration():
    # ViT-L-14-336: width 1024 into the 768-d text space, one linear layer (with bias) per layer 6, 12, 18, 24
    projections = LinearProjections(1024, 768, len(AprilGANParams().layers))
    assert sum(p.numel() for p in projections.parameters()) == 4 * (1024 * 768 + 768) == 3_148_800


def test_zero_shot_map_is_the_upsampled_softmax_of_projected_patches():
    torch.manual_seed(0)
    patches = torch.randn(2, 16, 8)
    text = F.normalize(torch.randn(1, 2, 8), dim=-1)
    logits = text_logits(patches, text, 12)
    cos = F.normalize(patches, dim=-1) @ text[0].T  # [2, 16, 2]
    assert logits.shape == (2, 2, 12, 12)
    # corners aligned: the upsampled corners are the corner patches' logits
    torch.testing.assert_close(logits[:, :, 0, 0], 100 * cos[:, 0])
    torch.testing.assert_close(logits[:, :, -1, -1], 100 * cos[:, -1])


def test_reference_distance_is_zero_on_a_reference_and_positive_elsewhere():
    torch.manual_seed(0)
    memory = torch.randn(16, 8)
    same = reference_distance(memory.unsqueeze(0), memory, 8)
    other = reference_distance(-memory.unsqueeze(0), memory, 8)
    assert same.abs().max() < 1e-6 and other.min() > 0


@pytest.mark.parametrize("setting", ["zero_shot_loo", "few_shot", "few_normal"])
def test_each_setting_trains_on_what_it_may_and_predicts_in_range(catalog, synth_root, setting):
    shots = None if setting == "zero_shot_loo" else 2
    method = _method(catalog, setting=setting, epochs=1)
    train = _train(catalog, synth_root, setting, shots)
    if setting == "zero_shot_loo":
        assert {s.dataset for s in train.samples} == set(OTHERS) and not train.auxiliary
    else:  # the official few-shot mode: other datasets train the projections, target normals are references
        assert {s.dataset for s in train.auxiliary} == set(OTHERS)
        assert {s.dataset for s in train.samples} == {"SynthBrain"}
    method.fit(train)
    expected = len(train.samples) + len(train.auxiliary)
    assert method.trained_on == expected
    assert (method.memory is None) == (setting == "zero_shot_loo")
    if method.memory is not None:  # K normal references x patches, per memory layer
        assert [m.shape[0] for m in method.memory] == [2 * 16] * 2
    test = make_split(synth_root, catalog, "SynthBrain", setting, shots, 0, OTHERS).test
    batch = train.subset(test[:3]).load()
    out = method.predict(ImageBatch(batch.images, batch.keys))
    assert out.maps.shape == (3, 32, 32) and out.image_scores.shape == (3,)
    assert out.maps.min() >= 0 and out.maps.max() <= 1
    assert 0 <= out.image_scores.min() <= out.image_scores.max() <= 1


def test_training_lowers_the_loss_on_a_fixed_batch(catalog, synth_root):
    method = _method(catalog, setting="zero_shot_loo", epochs=8, lr=1e-2)
    train = _train(catalog, synth_root, "zero_shot_loo", None)
    fixed = train.subset(train.samples[:8])  # normal and anomalous images with masks, one batch
    assert {s.label for s in fixed.samples} == {0, 1}
    method.fit(fixed)
    assert method.history[-1] < method.history[0]


def test_a_target_without_masks_trains_on_the_others_and_zero_shot_reads_no_target_file(catalog, synth_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    shutil.rmtree(root / "SynthBrain_AD" / "train")
    shutil.rmtree(root / "SynthBrain_AD" / "valid")
    method = _method(catalog, setting="zero_shot_loo", epochs=1)
    method.fit(_train(catalog, root, "zero_shot_loo", None))
    assert {"liver", "retinal OCT"} <= set(method.text_cache)


def test_frozen_tokens_come_from_the_cache_on_a_second_pass(catalog, synth_root, tmp_path):
    method = _method(catalog, setting="zero_shot_loo", epochs=2, cache=tmp_path / "cache")
    train = _train(catalog, synth_root, "zero_shot_loo", None)
    method.fit(train.subset(train.samples[:8]))
    cache = method.context.cache
    assert cache.misses == 8 and cache.hits == 8  # epoch 1 computes, epoch 2 reads
    fresh = _method(catalog, setting="zero_shot_loo", epochs=2)
    fresh.fit(train.subset(train.samples[:8]))
    assert fresh.history == pytest.approx(method.history, abs=1e-6)


def test_projected_tokens_are_the_raw_block_outputs(catalog):
    backbone = load_clip(TINY, 32)
    method = _method(catalog)
    images = torch.rand(2, 3, 32, 32)
    features = method.encode(images)
    _, outputs = backbone.run_blocks(backbone.embed(backbone.normalize(images)), layers=(2,))
    torch.testing.assert_close(features["layer2"], outputs[2])  # no ln_post, no projection
