"""DRA: disentangled representations of seen, pseudo and latent-residual anomalies (Ding, Pang, Shen, "Catching
Both Gray and Black Swans: Open-set Supervised Anomaly Detection", CVPR 2022).

The plugin's declaration: its parameters (validated on load), settings and defaults, importable without torch.
The maths, the training and the notes on fidelity to the paper: ``methods/models/dra.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.method import METHODS, Method, param
from benchmark.protocol import BackboneSpec


@dataclass(frozen=True)
class DRAParams:
    top_k: float = param(0.1, gt=0, le=1)  # K of Eq. 3 as a fraction of the patches (DevNet's 10 %)
    references: int = param(5, ge=1)  # N_r of Eq. 6
    scales: int = param(2, ge=1)  # the image pyramid (App. B.1): the image, then halved
    normal_hidden: int = param(256, ge=1)  # g_n's hidden layer (App. B.1: 512 -> 256 -> 1)
    margin: float = param(5.0, gt=0)  # a of Eq. 11 (DevNet's)
    prior_samples: int = param(5000, ge=0)  # |R| of Eq. 10, drawn from N(0, 1) at every loss; 0: mu 0, sigma 1
    pseudo_prob: float = param(0.5, ge=0, le=1)  # a normal slot becomes a CutMix pseudo anomaly (Eq. 4)
    cutmix_area: tuple[float, ...] = param((0.02, 0.15), gt=0, le=1, increasing=True)
    cutmix_aspect: float = param(0.3, gt=0, le=1)  # aspect ratio log-uniform in [a, 1/a]
    jitter: float = param(0.1, ge=0, le=0.5)  # ColorJitter of the pasted patch: brightness, contrast, saturation, hue
    rotation: float = param(180.0, ge=0, le=180)  # RandomRotation of every training image, in degrees
    batch_size: int = param(48, ge=3)  # a third seen anomalies, the rest normal or pseudo
    steps_per_epoch: int = param(20, ge=1)
    epochs: int = param(30, ge=1)
    lr: float = param(2e-4, gt=0)  # the code's (the paper: 1e-3)
    weight_decay: float = param(1e-5, ge=0)  # the code's (the paper: 1e-2)
    lr_step: int = param(10, ge=1)  # StepLR, stepped at the start of each epoch as the code
    lr_gamma: float = param(0.1, gt=0, le=1)
    grad_clip: float = param(1.0, gt=0)
    map: str = param("gradient", choices=("gradient", "patches"))  # see the module docstring
    sigma: float = param(4.0, ge=0)  # Gaussian blur of the map, in pixels
    progress: bool = True


@METHODS.register("dra")
class DRA(Method):
    """Four heads on a fine-tuned ResNet-18: seen, pseudo and latent-residual abnormality, and normality."""

    name = "dra"
    published_name = "DRA"
    settings = frozenset({"few_shot", "supervised"})
    Params = DRAParams
    default_backbone = BackboneSpec("resnet18", "tv_in1k")  # torchvision's ImageNet weights, as its code loads
    default_image_size = 448
    implementation = "methods.models.dra:DRAImpl"
    fit_state = ("model", "reference", "stats", "history")
