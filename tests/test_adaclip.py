import pytest
import torch

from benchmark.backbones.cache import FeatureCache
from benchmark.backbones.clip import load_clip
from benchmark.data.loading import ImageBatch
from benchmark.errors import BenchmarkError
from benchmark.method import MethodContext
from benchmark.protocol import BackboneSpec
from methods.adaclip import AdaCLIP, AdaCLIPParams
from methods.models.adaclip import ANOMALOUS_STATES, TEMPLATES, AdaCLIPModel, hybrid_semantic_fusion
from methods.models.winclip import NORMAL_STATES

TINY = BackboneSpec("tiny-vit", "random-init", 0)


def _method(catalog, setting="supervised", cache=None, **kw) -> AdaCLIP:
    context = MethodContext(
        catalog["SynthBrain"], setting, 2, 0, 32, torch.device("cpu"), TINY, cache or FeatureCache(None)
    )
    defaults = {"layers": (1, 2, 3, 4), "prompt_depth": 2, "k_clusters": 3, "epochs": 1, "sigma": 1.0}
    return AdaCLIP.build(AdaCLIPParams(**{**defaults, "progress": False, **kw}), context)


def test_parameter_count_at_the_default_configuration():
    # its AdaCLIP on ViT-L-14-336: 10,665,472, of which its unused static text prompt of block 1 (5 x 768 = 3,840)
    backbone = load_clip(BackboneSpec("ViT-L-14-336", "random-init", 0), 336)
    model = AdaCLIPModel(backbone, AdaCLIPParams())
    assert sum(q.numel() for q in model.parameters()) == 10_665_472 - 3_840
    sizes = {k: v.numel() for k, v in model.named_parameters()}
    assert sizes["prompts.static.vision"] == 4 * 5 * 1024 and sizes["prompts.static.text"] == 3 * 5 * 768


def test_prompts_enter_both_towers_and_change_the_features():
    backbone = load_clip(TINY, 32)
    torch.manual_seed(0)
    model = AdaCLIPModel(backbone, AdaCLIPParams(layers=(2, 4), prompt_depth=2))
    images = backbone.normalize(torch.rand(2, 3, 32, 32))
    embedding = backbone.pool(backbone.run_blocks(backbone.embed(images))[0])
    with torch.no_grad():
        _, tokens = model.encode_image(images, embedding)
        text = model.encode_text("brain", embedding)
        _, plain = backbone.run_blocks(backbone.embed(images), (2, 4))
        model.prompts.static["text"].add_(torch.randn_like(model.prompts.static["text"]))
        moved = model.encode_text("brain", embedding)
    assert tokens[0].shape == (2, 16, 128) and text.shape == (2, 64, 2)  # prompt tokens stripped
    torch.testing.assert_close(text.norm(dim=1), torch.ones(2, 2))
    assert (tokens[1] - plain[4][:, 1:]).abs().max() > 1e-3  # the appended prompts reach the patches
    assert (moved - text).abs().max() > 1e-4
    assert (text[0] - text[1]).abs().max() > 1e-6  # dynamic prompts: each image its own text


def test_text_without_prompts_is_the_frozen_ensemble_of_each_class():
    backbone = load_clip(TINY, 32)
    model = AdaCLIPModel(backbone, AdaCLIPParams(layers=(2, 4), prompt_depth=2, prompt_branch="V"))
    with torch.no_grad():
        text = model.encode_text("brain", torch.zeros(3, 64))
    assert text.shape == (3, 64, 2)
    for column, states in enumerate((NORMAL_STATES, ANOMALOUS_STATES)):  # 28 normal, 20 anomalous sentences
        sentences = [t.format(s.format("brain")) for s in states for t in TEMPLATES]
        expected = torch.nn.functional.normalize(backbone.encode_prompts(sentences).mean(0), dim=-1)
        torch.testing.assert_close(text[1, :, column], expected, atol=1e-5, rtol=1e-5)


def test_hybrid_semantic_fusion_is_seeded_and_follows_the_gradient():
    torch.manual_seed(0)
    patches = [torch.nn.functional.normalize(torch.randn(2, 30, 8), dim=-1).requires_grad_() for _ in range(2)]
    logits = [torch.randn(2, 30, 2) for _ in range(2)]
    first = hybrid_semantic_fusion(patches, logits, 3, seed=0)
    again = hybrid_semantic_fusion(patches, logits, 3, seed=0)
    assert first.shape == (2, 8) and torch.equal(first, again)
    first.sum().backward()
    assert patches[0].grad.abs().sum() > 0
    # fewer distinct features than clusters: as many clusters as there are features, no NaN
    same = [torch.ones(1, 30, 8)] * 2
    assert torch.isfinite(hybrid_semantic_fusion(same, [torch.zeros(1, 30, 2)] * 2, 3, seed=0)).all()


@pytest.mark.parametrize("setting", ["zero_shot_loo", "few_shot", "supervised"])
def test_each_setting_trains_and_predicts_in_range(catalog, setting, synth_train):
    shots = 2 if setting == "few_shot" else None
    train, split = synth_train(setting, shots)
    method = _method(catalog, setting=setting)
    method.fit(train.subset(train.normal[:2] + train.anomalous[:2]))
    batch = train.subset(split.test[:3]).load()
    out = method.predict(ImageBatch(batch.images, batch.keys))
    assert out.maps.shape == (3, 32, 32) and out.image_scores.shape == (3,)
    assert out.maps.min() >= 0 and out.maps.max() <= 1
    assert out.image_scores.min() >= 0 and out.image_scores.max() <= 1


def test_training_lowers_the_loss_on_a_fixed_batch(catalog, synth_train):
    train, _ = synth_train("supervised")
    fixed = train.subset(train.normal[:2] + train.anomalous[:2])
    method = _method(catalog, epochs=6, lr=1e-3, use_hsf=False)
    method.fit(fixed)
    assert method.history[-1] < method.history[0]


def test_embeddings_from_the_cache_equal_uncached_ones(catalog, tmp_path, synth_train):
    train, _ = synth_train("supervised")
    batch = train.subset(train.samples[:3]).load()
    cache = FeatureCache(tmp_path)
    method = _method(catalog, cache=cache)
    first = method.embedding(batch.images, batch.keys)
    again = method.embedding(batch.images, batch.keys)
    plain = method.embed(batch.images)["embedding"]
    assert cache.hits == 3
    torch.testing.assert_close(first, plain)
    torch.testing.assert_close(again, plain)


def test_only_the_prompts_and_projections_train_and_bad_depths_are_refused(catalog, synth_train):
    train, _ = synth_train("supervised")
    method = _method(catalog)
    frozen = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    start = {k: v.detach().clone() for k, v in method.model.named_parameters()}
    method.fit(train.subset(train.normal[:1] + train.anomalous[:2]))
    assert all(torch.equal(v, method.backbone.state_dict()[k]) for k, v in frozen.items())
    moved = {k for k, v in method.model.named_parameters() if (v - start[k]).abs().max() > 0}
    assert moved == set(start)  # prompts (both towers, static and dynamic), patch and [CLS] projections
    with pytest.raises(BenchmarkError, match="prompt_depth 3 or layers"):
        _method(catalog, prompt_depth=3)
