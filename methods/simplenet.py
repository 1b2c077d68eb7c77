"""SimpleNet: a feature adaptor and a discriminator of Gaussian-noised features (Liu et al., "SimpleNet: A Simple
Network for Image Anomaly Detection and Localization", CVPR 2023; code DonaldRR/SimpleNet).

The plugin's declaration: its parameters (validated on load), settings and defaults, importable without torch.
The maths, the training and the notes on fidelity to the official code: ``methods/models/simplenet.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.method import METHODS, Method, param
from benchmark.protocol import BackboneSpec


@dataclass(frozen=True)
class SimpleNetParams:
    levels: tuple[int, ...] = param((2, 3), ge=0, increasing=True)  # timm indices: layer2, layer3
    patch_size: int = param(3, ge=1)  # local aggregation: 3 x 3 neighbourhoods
    pretrain_dim: int = param(1536, ge=1)  # each level's patches pooled to this width
    target_dim: int = param(1536, ge=1)  # the levels' stacked widths pooled to this one
    bn_drift: bool = True  # its backbone's batch-norm statistics, moved once by an all-ones image (see docstring)
    noise_std: float = param(0.015, gt=0)
    dsc_hidden: int = param(1024, ge=1)
    margin: float = param(0.5, gt=0)  # the truncated L1 loss's threshold (its dsc_margin)
    lr: float = param(1e-4, gt=0)  # the adaptor's AdamW (its lr 1e-3 times 0.1)
    weight_decay: float = param(0.01, ge=0)  # AdamW's default, the adaptor's
    dsc_lr: float = param(2e-4, gt=0)  # the discriminator's Adam
    dsc_weight_decay: float = param(1e-5, ge=0)
    epochs: int = param(160, ge=1)  # its 40 meta-epochs of 4 passes
    batch_size: int = param(8, ge=1)
    sigma: float = param(4.0, ge=0)  # Gaussian blur of the upsampled map, in pixels
    progress: bool = True


@METHODS.register("simplenet")
class SimpleNet(Method):
    """Normal features against their Gaussian-noised copies; the discriminator scores each patch."""

    name = "simplenet"
    published_name = "SimpleNet"
    settings = frozenset({"full_normal", "few_normal"})
    Params = SimpleNetParams
    default_backbone = BackboneSpec("wide_resnet50_2", "tv_in1k")  # torchvision's IMAGENET1K_V1, as its code loads
    default_image_size = 288
    implementation = "methods.models.simplenet:SimpleNetImpl"
    fit_state = ("adaptor", "discriminator", "stats", "history")
    one_class = True
    reads_valid = False  # its epochs are fixed here; statistics from the training images
