import torch

from benchmark.backbones.clip import load_clip
from benchmark.protocol import BackboneSpec
from methods.models.winclip import (
    WinClipModel,
    harmonic_aggregation,
    prompt_ensemble,
    visual_association,
    window_masks,
)


def _model(scales=(2, 3)):
    model = WinClipModel(load_clip(BackboneSpec("tiny-vit", "random-init", 0), 32), scales)
    model.set_text("brain")
    return model


def test_prompt_ensemble_sizes():
    normal, anomalous = prompt_ensemble("Liver")
    assert len(normal) == 7 * 22 and len(anomalous) == 4 * 22
    assert "a photo of a damaged Liver." in anomalous and "a photo of the Liver without defect." in normal


def test_harmonic_aggregation_on_known_windows():
    masks = window_masks((3, 3), 2)
    out = harmonic_aggregation(torch.tensor([[1.0, 0.75, 0.5, 0.25]]), masks, (3, 3))
    centre = 4 / (1 / 1.0 + 1 / 0.75 + 1 / 0.5 + 1 / 0.25)
    torch.testing.assert_close(out[0, 1, 1], torch.tensor(centre))
    torch.testing.assert_close(out[0, 0, 1], torch.tensor(2 / (1 / 1.0 + 1 / 0.75)))
    assert window_masks((4, 4), 3).shape == (4, 9)


def test_window_embedding_equals_direct_forward_of_window_tokens():
    model = _model()
    images = torch.rand(2, 3, 32, 32)
    feats = model.encode(images)
    bb = model.backbone
    tokens = bb.embed(bb.normalize(images))
    window = model.windows(3)[3]  # the last 3x3 window
    seq = torch.cat([tokens[:, :1], tokens[:, 1 + window]], dim=1)
    with torch.no_grad():
        last, _ = bb.run_blocks(seq)
    torch.testing.assert_close(feats["windows_3"][:, 3], bb.pool(last))
    assert feats["windows_2"].shape == (2, 9, 64) and feats["patches"].shape == (2, 16, 128)


def test_reference_image_scores_zero_few_shot_and_maps_in_range():
    model = _model()
    reference = torch.rand(2, 3, 32, 32)
    model.set_memory(model.encode(reference))
    feats = model.encode(reference[:1])
    few = model.few_shot(feats)
    assert few.abs().max() < 1e-5
    other = model.few_shot(model.encode(torch.rand(1, 3, 32, 32)))
    assert other.max() > 1e-3
    scores, maps = model.score(feats, (32, 32))
    assert scores.shape == (1,) and maps.shape == (1, 32, 32)
    assert maps.min() >= 0 and maps.max() <= 1


def test_visual_association_range():
    f = torch.randn(2, 5, 8)
    assert torch.allclose(visual_association(f, f[0]).min(), torch.tensor(0.0), atol=1e-6)
    assert (visual_association(f, -f[0]) <= 1).all()
