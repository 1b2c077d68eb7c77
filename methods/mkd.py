"""MKD: multiresolution knowledge distillation (Salehi et al., "Multiresolution Knowledge Distillation for Anomaly
Detection", CVPR 2021).

The plugin's declaration: its parameters (validated on load), settings and defaults, importable without torch.
The maths, the training and the notes on fidelity to the paper: ``methods/models/mkd.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.method import METHODS, Method, param
from benchmark.protocol import BackboneSpec

# its smaller cloner ('B'): 3 x 3 convolutions of these widths, 0 a 2 x 2 max-pool (Fig. 2)
CLONER = (16, 16, 0, 16, 128, 0, 16, 16, 256, 0, 16, 16, 512, 0, 16, 16, 512, 0)


@dataclass(frozen=True)
class MKDParams:
    levels: tuple[int, ...] = param((1, 2, 3, 4), ge=0, increasing=True)  # timm indices; each max-pooled: pool2-5
    cloner: tuple[int, ...] = param(CLONER, ge=0)
    batch_norm: bool = True  # its code's cloner (the paper's figure shows none)
    normalise: bool = True  # ImageNet mean/std on both networks' input (BMAD's run; its MVTec pipeline: none)
    value_weight: float = param(0.01, ge=0)  # of L_val (Eq. 1); its code's lamda for datasets other than MVTec (0.5)
    direction_weight: float = param(1.0, ge=0)  # of L_dir (Eq. 3)
    score_levels: tuple[int, ...] = param((0, 1, 2, 3), ge=0, increasing=True)  # critical layers scored at test
    sigma: float = param(4.0, ge=0)  # Eq. 6's Gaussian, in pixels
    opening: bool = True  # Eq. 6's morphological opening (3 x 3 ellipse)
    epochs: int = param(201, ge=1)  # its code's last checkpoint (after epoch 200; its loop runs on to 201)
    lr: float = param(1e-3, gt=0)
    batch_size: int = param(64, ge=1)
    progress: bool = True


@METHODS.register("mkd")
class MKD(Method):
    """A small cloner learns a frozen VGG-16's activations at four resolutions; the discrepancy scores, its input
    gradient localises."""

    name = "mkd"
    published_name = "MKD"
    settings = frozenset({"full_normal", "few_normal"})
    Params = MKDParams
    default_backbone = BackboneSpec("vgg16", "tv_in1k")  # torchvision's ImageNet VGG-16, as its code loads
    default_image_size = 224  # BMAD's run (its MVTec pipeline: 128)
    implementation = "methods.models.mkd:MKDImpl"
    fit_state = ("cloner", "stats", "history")
    one_class = True
    reads_valid = False  # its epochs are fixed; statistics from the training images
