from pathlib import Path

import pytest
import torch

from benchmark.backbones.cache import FeatureCache
from benchmark.backbones.clip import load_clip
from benchmark.data.loading import ImageBatch
from benchmark.data.splits import make_split
from benchmark.errors import BenchmarkError
from benchmark.method import MethodContext
from benchmark.protocol import BackboneSpec
from methods.madclip import MadCLIP, MadCLIPParams
from methods.models.madclip import ContextPrompts, MadAdapter, MadAdapters, augment, contrast, det_loss

TINY = BackboneSpec("tiny-vit", "random-init", 0)


def _method(catalog, setting="supervised", cache=None, **kw) -> MadCLIP:
    context = MethodContext(
        catalog["SynthBrain"], setting, 2, 0, 32, torch.device("cpu"), TINY, cache or FeatureCache(None)
    )
    params = MadCLIPParams(**{"layers": (1, 2, 3, 4), "epochs": 1, "batch_size": 8, "progress": False, **kw})
    return MadCLIP.build(params, context)


def test_parameter_count_at_the_default_configuration_equals_the_official_code():
    # its CLIP_Inplanted + two PromptMakers on ViT-L-14-336: 8 MFCFC x 2,621,440 + 6 x [7, 8, 768]
    backbone = load_clip(BackboneSpec("ViT-L-14-336", "random-init", 0), 240)
    adapters = MadAdapters((6, 12, 18, 24), backbone.width, backbone.embed_dim)
    prompts = ContextPrompts(backbone, MadCLIPParams().context_length)
    assert sum(q.numel() for q in adapters.parameters()) == 20_971_520
    assert sum(q.numel() for q in prompts.parameters()) == 258_048
    assert set(MadAdapter(4, 2).state_dict()) == {"fc1.0.weight", "fc2.0.weight", "fc3.0.weight"}


def test_adapter_norm_is_a_per_token_layer_norm_without_affine():
    # its InstanceNorm1d(width) on sequence-first tokens [L, B, C]: each token over its features
    adapter = MadAdapter(16, 8)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        hidden = adapter.fc1(x).permute(1, 0, 2)  # [L, B, C]
        theirs = torch.nn.InstanceNorm1d(16)(hidden).permute(1, 0, 2)
        ours = torch.nn.functional.layer_norm(adapter.fc1(x), (16,))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_contrast_and_sigmoid_loss_follow_the_code():
    text = torch.nn.functional.normalize(torch.randn(1, 8, 2), dim=1)
    y_n = torch.nn.functional.normalize(torch.randn(2, 5, 8), dim=-1)
    y_a = torch.nn.functional.normalize(torch.randn(2, 5, 8), dim=-1)
    scores = contrast(y_n, y_a, text)
    torch.testing.assert_close(scores[..., 0], y_n @ text[0, :, 0] - y_n @ text[0, :, 1])
    torch.testing.assert_close(scores[..., 1], y_a @ text[0, :, 1] - y_a @ text[0, :, 0])
    labels = torch.tensor([0, 1])
    by_hand = (
        -(
            torch.nn.functional.logsigmoid(scores[0, :, 0]).mean()
            + torch.nn.functional.logsigmoid(-scores[0, :, 1]).mean()
            + torch.nn.functional.logsigmoid(-scores[1, :, 0]).mean()
            + torch.nn.functional.logsigmoid(scores[1, :, 1]).mean()
        )
        / 2
    )
    torch.testing.assert_close(det_loss(scores, labels), by_hand)


def test_prompts_take_three_positions_and_encode_without_the_causal_mask():
    backbone = load_clip(TINY, 32)
    torch.manual_seed(0)
    prompts = ContextPrompts(backbone, 4)
    x, eot = prompts.sequences("abnormal", "brain")
    assert x.shape[0] == 21 and torch.equal(eot[:7], eot[7:14]) and torch.equal(eot[:7], eot[14:])
    # the same state at the end, front and middle positions: its context in three places
    ctx = prompts.ctx["abnormal_end"][0]
    torch.testing.assert_close(x[0, 1:5], ctx)
    with torch.no_grad():
        text = prompts("brain")
        causal = backbone.text_pool(backbone.run_text(x, eot), eot)
        free = backbone.text_pool(backbone.run_text(x, eot, causal=False), eot)
    assert text.shape == (64, 2) and (causal - free).abs().max() > 1e-3
    torch.testing.assert_close(text[:, 1], torch.nn.functional.normalize(free.mean(0), dim=-1))


def test_augmentation_gives_sixteen_views_with_masks_that_follow():
    images = torch.rand(2, 3, 32, 32)
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[:, 8:24, 8:24] = True
    views, view_masks = augment(images, masks, torch.Generator().manual_seed(0))
    assert views.shape == (32, 3, 32, 32) and view_masks.shape == (32, 32, 32)
    assert torch.equal(views[:2], images) and torch.equal(view_masks[-2:], masks)  # the jitter keeps the masks
    assert view_masks[22:24].sum() > masks.sum()  # the 1.3 zoom enlarges the lesion


@pytest.mark.parametrize("setting", ["zero_shot_loo", "few_shot", "supervised"])
def test_each_setting_trains_and_predicts_in_range(catalog, setting, synth_train):
    shots = 2 if setting == "few_shot" else None
    train, split = synth_train(setting, shots)
    method = _method(catalog, setting=setting, epochs=2)
    method.fit(train)
    batch = train.subset(split.test[:3]).load()
    out = method.predict(ImageBatch(batch.images, batch.keys))
    assert out.maps.shape == (3, 32, 32) and out.image_scores.shape == (3,)
    assert out.maps.min() >= 0 and out.maps.max() <= 1
    assert out.image_scores.min() >= 0 and out.image_scores.max() <= 1
    # the epoch is chosen on the target's unused validation images (none in zero-shot)
    assert (method.selected_epoch is not None) == (setting != "zero_shot_loo")


def test_training_lowers_the_loss_on_a_fixed_batch(catalog, synth_train):
    train, _ = synth_train("supervised")
    fixed = train.subset(train.samples[:8])
    assert {s.label for s in fixed.samples} == {0, 1}
    method = _method(catalog, epochs=8, augment=False, lr=1e-2)
    method.fit(fixed)
    assert method.history[-1] < method.history[0]


def test_taps_from_the_cache_equal_uncached_ones(catalog, tmp_path, synth_train):
    train, _ = synth_train("supervised")
    batch = train.subset(train.samples[:3]).load()
    cache = FeatureCache(tmp_path)
    method = _method(catalog, cache=cache)
    first = method.taps(batch.images, batch.keys)
    again = method.taps(batch.images, batch.keys)
    plain = method.encode(batch.images)
    assert cache.hits == 3
    for key in plain:
        torch.testing.assert_close(first[key], plain[key])
        torch.testing.assert_close(again[key], plain[key])


def test_only_adapters_and_prompts_train_and_bad_layers_are_refused(catalog, synth_train):
    train, _ = synth_train("supervised")
    method = _method(catalog)
    frozen = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    start = [q.detach().clone() for q in method.prompts.parameters()]
    method.fit(train.subset(train.samples[:6]))
    assert all(torch.equal(v, method.backbone.state_dict()[k]) for k, v in frozen.items())
    assert all((a - b).abs().max() > 0 for a, b in zip(start, method.prompts.parameters(), strict=True))
    with pytest.raises(BenchmarkError, match="exceed the 4 vision blocks"):
        _method(catalog, layers=(2, 5))


def test_its_seed_files_are_read_through_sampling_manifests(catalog, synth_root, tmp_path):
    """MadCLIP's ``dataset/fewshot_seed/{obj}/my{K}-shot.txt``: MVFA-AD's format (anomalous line first here, a
    trailing space, no final newline), iteration 0 only."""
    pool = make_split(synth_root, catalog, "SynthBrain", "supervised", None, 0).train  # the labelled pool
    normal = [Path(s.path).name for s in pool if s.label == 0][-2:]
    anomalous = [Path(s.path).name for s in pool if s.label == 1][-2:]
    folder = tmp_path / catalog["SynthBrain"].folder.removesuffix("_AD")
    folder.mkdir()
    (folder / "my2-shot.txt").write_text(f"a-0: {' '.join(anomalous)}\nn-0: {' '.join(normal)} ")
    template = str(tmp_path / "{folder}" / "my{shots}-shot.txt")
    drawn = make_split(synth_root, catalog, "SynthBrain", "few_shot", 2, 0, manifests=template)
    assert sorted(Path(s.path).name for s in drawn.train) == sorted(normal + anomalous)
    with pytest.raises(BenchmarkError, match="no 'n-1:' or 'a-1:' line"):
        make_split(synth_root, catalog, "SynthBrain", "few_shot", 2, 1, manifests=template)
