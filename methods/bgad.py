"""BGAD: boundary-guided semi-push-pull normalizing flows (Yao et al., CVPR 2023; code xcyao00/BGAD).

The plugin's declaration: its parameters (validated on load), settings and defaults, importable without torch.
The maths, the training and the notes on fidelity to the paper and the official code: ``methods/models/bgad.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.method import METHODS, Method, param
from benchmark.protocol import BackboneSpec


@dataclass(frozen=True)
class BGADParams:
    levels: tuple[int, ...] = param((1, 2, 3), ge=0)
    coupling_blocks: int = param(8, ge=1)
    clamp_alpha: float = param(1.9, gt=0)
    pos_embed_dim: int = param(128, ge=4)
    pos_beta: float = param(0.01, gt=0, le=1)  # the README's command (config.py's default: 0.05)
    margin_tau: float = param(0.1, ge=0)
    normalizer: float = param(10.0, gt=0)
    bgspp_lambda: float = param(1.0, ge=0)
    focal_weighting: bool = True  # the README's command (config.py's default: off)
    anomaly_repeats: int = param(5, ge=1)  # the few-shot loader's reuse_times
    lr: float = param(2e-4, gt=0)
    meta_epochs: int = param(25, ge=1)
    sub_epochs: int = param(8, ge=1)
    warmup_epochs: int = param(2, ge=0)
    n_batch: int = param(4096, ge=1)
    reference_quantile: float = param(1.0, ge=0, le=1)
    progress: bool = True


@METHODS.register("bgad")
class BGAD(Method):
    """Supervised BGAD: few labelled anomalies with masks push the flows' likelihoods apart."""

    name = "bgad"
    published_name = "BGAD"
    settings = frozenset({"few_shot", "supervised"})
    requires_masks = True
    Params = BGADParams
    default_backbone = BackboneSpec("tf_efficientnet_b6", "aa_in1k")
    default_image_size = 256
    implementation = "methods.models.bgad:BGADImpl"
    fit_state = ("model", "reference", "history")
