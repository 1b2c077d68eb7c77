"""The supervised segmenters from libraries (segmentation_models_pytorch, MONAI): the shared recipe's pieces, encoder
weights from disk, and every declared setting through ``run``."""

import re
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from benchmark.cli import main
from benchmark.errors import BenchmarkError
from benchmark.protocol import BackboneSpec
from benchmark.store import ResultStore
from methods.models.augment import rot90_flip, rot_flip
from methods.models.rolling_unet import roll_channels, rolling_unet
from methods.models.segmenters import (
    Normalised,
    TransUNetImpl,
    criterion,
    lesion_probability,
    schedule,
    segmentation_models,
    smp_network,
)
from methods.models.swin_unet import SwinUnet as SwinUnetNet
from methods.models.swin_unet import load_pretrained
from methods.models.transunet import TransUNet as TransUNetNet
from methods.models.transunet import load_encoder, resize_pos_embed
from methods.segmenters import RollingUnetParams, UNet

RESNET = {"model": "resnet18", "weights": "random-init", "seed": 0}
FAST = {"epochs": 1, "batch_size": 4, "progress": False}
TINY = {
    "unet": {**FAST, "backbone": RESNET, "encoder_depth": 3, "decoder_channels": [16, 8, 4]},
    "unetplusplus": {**FAST, "backbone": RESNET, "encoder_depth": 3, "decoder_channels": [16, 8, 4]},
    "deeplabv3": {**FAST, "backbone": RESNET, "encoder_depth": 3, "decoder_channels": 8},
    "attention_unet": {**FAST, "channels": [4, 8, 16], "strides": [2, 2]},
    "rolling_unet": {**FAST, "widths": [4, 8, 8, 16, 16]},
    "transunet": {
        **FAST,
        "backbone": {"model": "vit_base_r50_s16_224", "weights": "random-init"},
        "layers": [1, 1, 1],
        "depth": 1,
        "width": 32,
        "heads": 2,
    },
    "swin_unet": {
        **FAST,
        "backbone": {"model": "swin_tiny_patch4_window7_224", "weights": "random-init"},
        "width": 16,
        "depths": [1, 1, 1, 1],
        "heads": [1, 1, 1, 1],
        "window": 2,
    },
    "swin_unetr": {**FAST, "image_size": 64, "feature_size": 12, "depths": [1, 1, 1, 1], "heads": [1, 1, 1, 1]},
}


def test_every_library_segmenter_runs_every_declared_setting(write_protocol, seg_root, tmp_path):
    """Each network trains and predicts in the four settings: supervised and few-shot on a detection set (normal
    images with empty masks: image metrics from the map's maximum), data fractions and domain generalisation on
    segmentation-only sets; the records name the published method and the backbone (none for the networks
    trained from scratch)."""
    detection = write_protocol(name="detection", datasets=["SynthBrain"], methods=TINY, backbone=None,
                               settings=["supervised", {"name": "few_shot", "shots": [2]}])  # fmt: skip
    assert main(["run", str(detection), "--save-predictions"]) == 0
    segmentation = write_protocol(
        name="segmentation", data_root=str(seg_root), datasets=["SynthBrainSeg", "SynthLiverSeg"], methods=TINY,
        backbone=None, settings=[{"name": "data_fraction", "fractions": [50]},
                                 {"name": "domain_generalization", "source": "SynthBrainSeg"}],
    )  # fmt: skip
    assert main(["run", str(segmentation)]) == 0
    store = ResultStore(tmp_path / "results", "detection")
    latest = [*store.latest().values(), *ResultStore(tmp_path / "results", "segmentation").latest().values()]
    assert len(latest) == len(TINY) * (2 + 4) and all(r["status"] == "finished" for r in latest)
    names = {r["method"]: (r["published_as"], r["backbone"].split(" / ")[0]) for r in latest}
    assert names == {
        "unet": ("UNet", "resnet18"),
        "unetplusplus": ("UNet++", "resnet18"),
        "deeplabv3": ("DeepLabv3", "resnet18"),
        "attention_unet": ("Attention U-Net", "none"),
        "rolling_unet": ("Rolling-UNet", "none"),
        "transunet": ("TransUNet", "vit_base_r50_s16_224"),
        "swin_unet": ("Swin-UNet", "swin_tiny_patch4_window7_224"),
        "swin_unetr": ("", "none"),
    }
    for rec in latest:
        assert 0 <= rec["metrics"]["dice_per_image"] <= 1 and 0 <= rec["metrics"]["pixel_auroc"] <= 1
        assert rec["params"]["param_epochs"] == 1
    for rec in store.latest().values():
        pred = np.load(store.dir / rec["cell_id"] / "predictions.npz")
        assert np.array_equal(pred["image_scores"], pred["maps"].reshape(len(pred["maps"]), -1).max(1))
        assert 0 <= rec["metrics"]["image_auroc"] <= 1


def test_a_method_trained_from_scratch_refuses_a_backbone(write_protocol, seg_root, capsys):
    path = write_protocol(data_root=str(seg_root), datasets=["SynthBrainSeg"], settings=["supervised"],
                          methods={"attention_unet": {**TINY["attention_unet"], "backbone": RESNET}})  # fmt: skip
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "methods.attention_unet.backbone: 'attention_unet' is trained from scratch on no backbone" in err
    assert err.count("\n") == 1


def test_encoder_weights_come_from_the_file_on_disk(tmp_path):
    import timm

    torch.manual_seed(1)
    reference = timm.create_model("resnet18", pretrained=False)
    save_file(reference.state_dict(), tmp_path / "r18.safetensors")
    net = smp_network(UNet, "Unet", BackboneSpec("resnet18", str(tmp_path / "r18.safetensors")), encoder_depth=3,
                      decoder_channels=(8, 8, 8))  # fmt: skip
    ours = net.net.encoder.model.state_dict()
    assert all(torch.equal(ours[k], reference.state_dict()[k]) for k in ours)
    assert net.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_missing_encoder_weights_name_the_fetch_command(write_protocol, seg_root, capsys):
    unet = {**FAST, "backbone": {"model": "resnet18", "weights": "a1_in1k"}}
    path = write_protocol(data_root=str(seg_root), datasets=["SynthBrainSeg"], settings=["supervised"],
                          methods={"unet": unet})  # fmt: skip
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "fetch-weights" in err and "resnet18" in err and err.count("\n") == 1


def test_without_the_extra_an_smp_network_is_one_line(monkeypatch, write_protocol, seg_root, tmp_path, capsys):
    """Without segmentation_models_pytorch: the run stops before anything is recorded, in one line naming the
    extra, and so does building the network."""
    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)  # as if it were not installed
    message = "unet: needs segmentation_models_pytorch, which the segmentation extra installs: "
    message += 'pip install -e ".[segmentation]"'
    with pytest.raises(BenchmarkError, match=f"^{re.escape(message)}$"):
        segmentation_models(UNet)
    path = write_protocol(data_root=str(seg_root), datasets=["SynthBrainSeg"], settings=["supervised"],
                          backbone=None, methods={"unet": TINY["unet"]}, fresh_results=True)  # fmt: skip
    assert main(["run", str(path)]) == 2
    assert capsys.readouterr().err.strip().endswith(message)
    assert not (tmp_path / "results").exists()


def test_lesion_probability_is_the_sigmoid_or_the_foreground_softmax():
    logits = torch.randn(2, 1, 4, 4)
    assert torch.equal(lesion_probability(logits), torch.sigmoid(logits[:, 0]))
    two = torch.randn(2, 2, 4, 4)
    assert torch.allclose(lesion_probability(two), torch.sigmoid(two[:, 1] - two[:, 0]), atol=1e-6)


def test_schedules_are_transunets_poly_and_an_epochs_cosine():
    from methods.segmenters import TrainingParams

    poly = schedule(TrainingParams(schedule="poly", lr=0.01, epochs=3))
    # its trainer sets the rate after each step from the steps done before it: the first two steps at the base rate
    assert poly(0, 0, 4) == poly(0, 1, 4) == 0.01 and poly(1, 2, 4) == pytest.approx(0.01 * (1 - 5 / 12) ** 0.9)
    cosine = schedule(TrainingParams(lr=3e-4, lr_min=1e-4, epochs=4))
    assert [cosine(e, i, 5) for e, i in ((0, 0), (0, 4), (2, 3))] == pytest.approx([3e-4, 3e-4, 2e-4])
    assert schedule(TrainingParams(schedule="constant")) is None


def test_rot_flip_moves_image_and_mask_together_and_reaches_all_eight_symmetries():
    """The mask is the image's first channel thresholded, before and after; every rotation-flip of a square
    occurs, and rotations by other angles keep the pair aligned too."""
    generator = torch.Generator().manual_seed(0)
    image = torch.zeros(3, 9, 9)
    image[:, 1:3, 1:5] = 1.0
    image[:, 6, 2] = 1.0
    seen = set()
    for _ in range(60):
        images, masks = rot_flip(image[None], image[0][None] > 0.5, generator)
        assert torch.equal(masks[0], images[0, 0] > 0.5)
        seen.add(tuple(images[0, 0].flatten().tolist()))
    eight = {tuple(image[0].rot90(k).flip(a).flatten().tolist()) for k in range(4) for a in (0, 1)}
    assert eight <= seen and len(seen) > len(eight)  # also the untouched image and small rotations


def test_transunets_loss_is_its_ce_and_dice():
    """TransUNet's loss (its ``utils.DiceLoss``: per class over the whole batch, squared denominators, background
    included, smooth 1e-5; averaged with its cross-entropy, 0.5 each), as our criterion for it computes it."""
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 8, 8)
    target = torch.rand(3, 8, 8) > 0.7
    score = logits.softmax(1)
    one_hot = torch.stack([~target, target], 1).float()
    dice = 0.0
    for c in range(2):
        intersect = (score[:, c] * one_hot[:, c]).sum()
        z, y = (score[:, c] ** 2).sum(), (one_hot[:, c] ** 2).sum()
        dice += 1 - (2 * intersect + 1e-5) / (z + y + 1e-5)
    theirs = 0.5 * torch.nn.functional.cross_entropy(logits, target.long()) + 0.5 * dice / 2
    ours = criterion(TransUNetImpl.classes, 0.5, 0.5, **TransUNetImpl.dice)(logits, target[:, None].long())
    assert float(ours) == pytest.approx(float(theirs), abs=1e-6)
    plain = criterion(2, 0.5, 0.5)(logits, target[:, None].long())  # without its options: another number
    assert abs(float(plain) - float(theirs)) > 1e-3


def test_rolling_unets_loss_is_its_bce_and_dice():
    """Rolling-UNet's ``BCEDiceLoss`` (its ``losses.py``): 0.5 BCE on the logits + 1 - Dice of the sigmoid per image
    (smooth 1e-5), as our criterion with its recipe's weights computes it."""
    torch.manual_seed(1)
    logits = torch.randn(4, 1, 8, 8)
    target = (torch.rand(4, 1, 8, 8) > 0.6).float()
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = (2 * (p * t).sum(1) + 1e-5) / (p.sum(1) + t.sum(1) + 1e-5)
    theirs = 0.5 * torch.nn.functional.binary_cross_entropy_with_logits(logits, target) + 1 - dice.mean()
    params = RollingUnetParams()
    ours = criterion(1, params.dice_weight, params.ce_weight)(logits, target)
    assert float(ours) == pytest.approx(float(theirs), abs=1e-6)


def test_the_rewritten_networks_have_their_official_parameter_counts():
    """TransUNet R50-ViT-B/16 (2 classes), Swin-Unet at its configuration (9 classes: the paper's 27.17 M) and
    Rolling-UNet S, as their official models (the last less the LayerNorm its code builds and never uses)."""
    assert sum(q.numel() for q in TransUNetNet(2, 224).parameters()) == 105_276_066
    swin = SwinUnetNet(9, 224, 3, 96, (2, 2, 2, 2), (3, 6, 12, 24), 7)
    assert sum(q.numel() for q in swin.parameters()) == 27_168_900
    assert sum(q.numel() for q in rolling_unet("S").parameters()) == 1_783_185 - 1_024


def test_rolling_is_a_shift_of_each_channel_by_its_index():
    x = torch.randn(2, 5, 6, 4)  # channel-last
    for axis, sign in ((1, 1), (2, -1)):
        expected = torch.stack([torch.roll(x[..., c], sign * c, axis) for c in range(4)], -1)
        assert torch.equal(roll_channels(x, axis, sign), expected)


def test_pretrained_weights_go_where_the_official_loaders_put_them():
    """TransUNet: timm's R50+ViT-B/16 in the encoder, the class token's position dropped, the grid resized at
    another size; Swin-Unet: Swin-T in the encoder (its third stage's extra blocks left out) and each decoder
    level's blocks from the encoder blocks of the same resolution."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_base_r50_s16_224", pretrained=False, num_classes=0)
    net = TransUNetNet(2, 224)
    load_encoder(net, vit)
    assert torch.equal(net.encoder.pos_embed, vit.pos_embed[:, 1:])
    assert torch.equal(net.encoder.blocks[11].mlp.fc2.weight, vit.blocks[11].mlp.fc2.weight)
    larger = TransUNetNet(2, 256)
    load_encoder(larger, vit)
    assert larger.encoder.pos_embed.shape == (1, 256, 768)
    assert torch.equal(resize_pos_embed(vit.pos_embed[:, 1:], 196), vit.pos_embed[:, 1:])
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0)
    unet = SwinUnetNet(2, 224, 3, 96, (2, 2, 2, 2), (3, 6, 12, 24), 7)
    load_pretrained(unet, swin)
    assert torch.equal(unet.encoder.layers[2].blocks[1].attn.qkv.weight, swin.layers[2].blocks[1].attn.qkv.weight)
    for level, stage in zip((2, 1, 0), unet.decoder, strict=True):
        depth = len(stage.stage.blocks)  # the model's (2): Swin-T's third stage has 6
        for block, source in zip(stage.stage.blocks, swin.layers[level].blocks[:depth], strict=True):
            assert torch.equal(block.mlp.fc1.weight, source.mlp.fc1.weight)


def test_rolling_unets_official_input_is_bgr_normalised_then_divided_by_255():
    net = Normalised(torch.nn.Identity(), bgr=True, scale=1 / 255)
    image = torch.rand(1, 3, 4, 4)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (image.flip(1) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1) / 255
    assert torch.allclose(net(image), expected)


def test_rot90_flip_moves_image_and_mask_together():
    generator = torch.Generator().manual_seed(0)
    image = torch.zeros(3, 7, 7)
    image[:, 1:3, 1:5] = 1.0
    seen = set()
    for _ in range(40):
        images, masks = rot90_flip(image[None], image[0][None] > 0.5, generator)
        assert torch.equal(masks[0], images[0, 0] > 0.5)
        seen.add(tuple(images[0, 0].flatten().tolist()))
    assert len(seen) == 8  # the square's eight symmetries, the identity among them


def test_a_training_set_too_small_for_a_batch_is_one_error(write_protocol, seg_root, tmp_path):
    """Rolling-UNet drops a last partial batch (its loader's): on 2 + 2 images with batch 8 it would train nothing,
    and the cell fails saying so instead of recording an untrained network."""
    rolling = {**FAST, "batch_size": 8, "widths": [4, 8, 8, 16, 16]}
    path = write_protocol(datasets=["SynthBrain"], settings=[{"name": "few_shot", "shots": [2]}], backbone=None,
                          methods={"rolling_unet": rolling})  # fmt: skip
    assert main(["run", str(path)]) == 2  # a run with a failed cell
    (rec,) = ResultStore(tmp_path / "results", "t").latest().values()
    assert rec["status"] == "failed"
    assert "rolling_unet: batch_size 8 leaves no training step for 4 training images" in rec["error"]


def test_inconsistent_network_parameters_are_one_line_at_load(write_protocol, seg_root, capsys):
    bad = {"attention_unet": {"channels": [4, 8, 16], "strides": [2]}}
    path = write_protocol(data_root=str(seg_root), datasets=["SynthBrainSeg"], settings=["supervised"],
                          backbone=None, methods=bad)  # fmt: skip
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "methods.attention_unet: strides: one per level below the first (2), got [2]" in err
    assert err.count("\n") == 1
