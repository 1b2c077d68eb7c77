import pytest
import torch

from benchmark.backbones.cache import CHUNK, FeatureCache
from benchmark.backbones.clip import load_clip
from benchmark.errors import WeightsUnavailableError
from benchmark.protocol import BackboneSpec

TINY = BackboneSpec("tiny-vit", "random-init", 0)


@pytest.fixture(scope="module")
def backbone():
    return load_clip(TINY, 32)


def test_layer_outputs_match_open_clip_forward(backbone):
    images = backbone.normalize(torch.rand(3, 3, 32, 32))
    with torch.no_grad():
        embedding, tokens, layers = backbone.forward_features(images, layers=(1, 2, 3, 4))
        reference = backbone.model.encode_image(images)
        x = backbone.embed(images)
        direct = []
        for block in backbone.blocks:
            x = block(x)
            direct.append(x)
    torch.testing.assert_close(embedding, reference)
    assert sorted(layers) == [1, 2, 3, 4]
    for i in range(4):
        torch.testing.assert_close(layers[i + 1], direct[i])
    assert tokens.shape == (3, 1 + 16, 128)
    assert backbone.grid_size == (4, 4) and backbone.num_layers == 4


def test_adapter_changes_exactly_the_next_block_input(backbone):
    images = backbone.normalize(torch.rand(2, 3, 32, 32))
    shift = torch.randn(128)
    seen = {}

    def adapter(tokens):
        seen["in"] = tokens
        return tokens + shift

    with torch.no_grad():
        last, layers = backbone.run_blocks(backbone.embed(images), layers=(2, 3), adapters={2: adapter})
        plain, plain_layers = backbone.run_blocks(backbone.embed(images), layers=(2, 3))
        expected3 = backbone.blocks[2](plain_layers[2] + shift)
    torch.testing.assert_close(layers[2], plain_layers[2])  # recorded before the adapter
    torch.testing.assert_close(seen["in"], plain_layers[2])
    torch.testing.assert_close(layers[3], expected3)
    assert not torch.allclose(last, plain)


def test_random_init_is_seeded():
    a = load_clip(TINY, 32).visual.conv1.weight
    b = load_clip(TINY, 32).visual.conv1.weight
    c = load_clip(BackboneSpec("tiny-vit", "random-init", 1), 32).visual.conv1.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_missing_weights_fail_with_one_line(tmp_path):
    with pytest.raises(WeightsUnavailableError) as info:
        load_clip(BackboneSpec("ViT-B-16-plus-240", "laion400m_e31"), 240)
    assert "fetch-weights ViT-B-16-plus-240 laion400m_e31" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(WeightsUnavailableError, match=r"checkpoint file .* not found"):
        load_clip(BackboneSpec("ViT-B-16", str(tmp_path / "missing.pt")), 224)


def test_local_checkpoint_loads(tmp_path):
    import open_clip

    torch.manual_seed(3)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    path = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), path)
    loaded = load_clip(BackboneSpec("ViT-B-32", str(path)), 224)
    torch.testing.assert_close(loaded.visual.conv1.weight, model.visual.conv1.weight)


def test_cache_hits_give_identical_features(backbone, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    images = torch.rand(4, 3, 32, 32)
    keys = ("k0", "k1", "k2", "k3")
    calls = []

    def compute(x):
        calls.append(len(x))
        with torch.no_grad():
            emb, tokens, _ = backbone.forward_features(backbone.normalize(x))
        return {"emb": emb, "tokens": tokens}

    recipe = {"backbone": TINY.label(), "image_size": 32, "layers": [4]}
    first = cache.cached(recipe, keys[:2], images[:2], compute)
    both = cache.cached(recipe, keys, images, compute)
    assert calls == [CHUNK, CHUNK] and cache.hits == 2 and cache.misses == 4  # misses padded to one shape
    torch.testing.assert_close(both["emb"][:2], first["emb"], rtol=0, atol=0)
    other = cache.cached({**recipe, "image_size": 64}, keys[:1], images[:1], compute)
    assert calls[-1] == CHUNK and other["emb"].shape == (1, 64)
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 5


@pytest.mark.parametrize("root", ["cache", None])
def test_an_image_has_the_same_features_bit_for_bit_whatever_else_was_computed_with_it(backbone, tmp_path, root):
    # a resumed run recomputes only the entries it lacks: one image alone went through other matrix kernels
    # than in a full batch (its last bits differed), so a resumed run was not bit-identical to an uninterrupted one
    torch.manual_seed(3)
    images = torch.rand(2 * CHUNK + 3, 3, 32, 32)
    keys = tuple(f"k{i}" for i in range(len(images)))

    def compute(x):
        with torch.no_grad():
            return {"emb": backbone.forward_features(backbone.normalize(x))[0]}

    recipe = {"backbone": TINY.label(), "image_size": 32}
    full = FeatureCache(tmp_path / "full" if root else None).cached(recipe, keys, images, compute)["emb"]
    for picked in ([5], [0, CHUNK + 1], [2 * CHUNK + 2]):
        alone = FeatureCache(tmp_path / f"alone{picked}" if root else None)
        got = alone.cached(recipe, tuple(keys[i] for i in picked), images[picked], compute)["emb"]
        torch.testing.assert_close(got, full[picked], rtol=0, atol=0)


def test_image_size_need_not_be_a_patch_multiple():
    # MVFA runs ViT-L/14 at 240 px: a 17 x 17 grid, the strided patch convolution drops the last 2 pixels
    backbone = load_clip(BackboneSpec("tiny-vit", "random-init", 0), 36)
    assert backbone.grid_size == (4, 4)
    with torch.no_grad():
        _, tokens, _ = backbone.forward_features(torch.rand(1, 3, 36, 36))
    assert tokens.shape == (1, 17, 128)
