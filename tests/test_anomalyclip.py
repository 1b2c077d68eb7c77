import pytest
import torch

from benchmark.backbones.attention import DualPathAttention, block_attention
from benchmark.backbones.cache import FeatureCache
from benchmark.backbones.clip import load_clip
from benchmark.data.loading import ImageBatch
from benchmark.data.splits import make_split
from benchmark.errors import BenchmarkError
from benchmark.method import MethodContext, TrainSet
from benchmark.protocol import BackboneSpec
from methods.anomalyclip import AnomalyCLIP, AnomalyCLIPParams
from methods.models.anomalyclip import ObjectAgnosticPrompts

TINY = BackboneSpec("tiny-vit", "random-init", 0)


def _method(catalog, setting="supervised", epochs=2, **kw) -> AnomalyCLIP:
    context = MethodContext(catalog["SynthBrain"], setting, 2, 0, 32, torch.device("cpu"), TINY, FeatureCache(None))
    params = AnomalyCLIPParams(
        layers=(1, 2, 3, 4), dpam_blocks=3, deep_depth=2, epochs=epochs, progress=False, **{"sigma": 1.0, **kw}
    )
    return AnomalyCLIP.build(params, context)


def _split(catalog, root, setting, shots=None):
    return make_split(root, catalog, "SynthBrain", setting, shots, 0, ("SynthLiver", "SynthRetina"))


def _train(catalog, split, setting, shots=None) -> TrainSet:
    specs = {name: catalog[name] for name in {s.dataset for s in split.train} | {"SynthBrain"}}
    return TrainSet(split.train, setting, shots, 32, specs, split.valid)


def test_parameter_count_at_the_default_configuration():
    # ViT-L-14-336's text width is 768: 2 prompts x 12 tokens and 8 deep prompts x 4 tokens
    p = AnomalyCLIPParams()
    assert (2 * p.prompt_length + (p.deep_depth - 1) * p.deep_length) * 768 == 43_008
    backbone = load_clip(TINY, 32)  # the same count on the tiny text tower (width 128, 2 blocks)
    prompts = ObjectAgnosticPrompts(backbone, p.prompt_length, 2, p.deep_length)
    assert sum(q.numel() for q in prompts.parameters()) == (2 * 12 + 1 * 4) * 128


def test_block_attention_with_q_k_is_the_block_own_attention():
    backbone = load_clip(TINY, 32)
    block = backbone.blocks[0]
    x = block.ln_1(backbone.embed(torch.rand(2, 3, 32, 32)))
    with torch.no_grad():
        (mine,) = block_attention(block, x)
        theirs = block.attn(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_dpam_changes_only_the_chosen_blocks():
    backbone = load_clip(TINY, 32)
    x0 = backbone.embed(torch.rand(2, 3, 32, 32))
    dpam = DualPathAttention()
    with torch.no_grad():
        plain_last, plain = backbone.run_blocks(x0, layers=(1, 2, 3, 4))
        _, dual = backbone.run_blocks(x0, layers=(1, 2, 3, 4), overrides=dpam.overrides((3, 4)))
        # blocks 1-2 untouched; block 3 adds the V-V attention of its input and skips the FFN
        (vv,) = block_attention(backbone.blocks[2], backbone.blocks[2].ln_1(plain[2]), (("v", "v"),))
    torch.testing.assert_close(dual[1], plain[1], atol=0, rtol=0)
    torch.testing.assert_close(dual[2], plain[2], atol=0, rtol=0)
    torch.testing.assert_close(dual[3], plain[2] + vv)
    assert (dual[3] - plain[3]).abs().max() > 1e-3
    # the original stream is CLIP's own forward, carried beside the V-V stream
    torch.testing.assert_close(dpam.original, plain_last, atol=1e-5, rtol=1e-5)


def test_deep_prompts_enter_the_chosen_text_block_and_change_the_features():
    backbone = load_clip(TINY, 32)
    torch.manual_seed(0)
    prompts = ObjectAgnosticPrompts(backbone, length=6, depth=2, deep_length=3)
    assert list(prompts.hooks()) == [2]
    with torch.no_grad():
        before = prompts()
        prompts.deep[0].add_(torch.randn_like(prompts.deep[0]))  # not a constant: LayerNorm would remove it
        after = prompts()
        prompts.normal.add_(torch.randn_like(prompts.normal))
        moved = prompts()
    assert before.shape == (2, 64) and (after - before).abs().max() > 1e-4
    assert (moved[0] - after[0]).abs().max() > 1e-4 and (moved[1] - after[1]).abs().max() < 1e-6
    with pytest.raises(BenchmarkError, match="deep_depth 3 exceeds the 2 text blocks"):
        ObjectAgnosticPrompts(backbone, depth=3)


@pytest.mark.parametrize("setting", ["zero_shot_loo", "few_shot", "supervised"])
def test_each_setting_trains_and_predicts_in_range(catalog, synth_root, setting):
    shots = 2 if setting == "few_shot" else None
    split = _split(catalog, synth_root, setting, shots)
    method = _method(catalog, setting=setting, epochs=1)
    method.fit(_train(catalog, split, setting, shots))
    batch = _train(catalog, split, setting).subset(split.test[:3]).load()
    out = method.predict(ImageBatch(batch.images, batch.keys))
    assert out.maps.shape == (3, 32, 32) and out.image_scores.shape == (3,)
    assert out.maps.min() >= 0 and out.maps.max() <= 1
    assert 0 <= out.image_scores.min() <= out.image_scores.max() <= 1


def test_training_lowers_the_loss_on_a_fixed_batch(catalog, synth_root):
    split = _split(catalog, synth_root, "supervised")
    train = _train(catalog, split, "supervised")
    fixed = train.subset(train.samples[:8])
    assert {s.label for s in fixed.samples} == {0, 1}
    method = _method(catalog, epochs=8, lr=1e-2)
    method.fit(fixed)
    assert method.history[-1] < method.history[0]


def test_learned_prompts_are_the_only_trainable_part(catalog, synth_root):
    split = _split(catalog, synth_root, "supervised")
    method = _method(catalog, epochs=1)
    frozen = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    start = [q.detach().clone() for q in method.prompts.parameters()]
    method.fit(_train(catalog, split, "supervised").subset(split.train[:8]))
    assert all(torch.equal(v, method.backbone.state_dict()[k]) for k, v in frozen.items())
    assert all((a - b).abs().max() > 0 for a, b in zip(start, method.prompts.parameters(), strict=True))
