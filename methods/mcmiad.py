"""MCMIAD: frozen CNN features, a CLIP text prior and a denoising Transformer decoder (Lin et al., MIDL 2026

The plugin's declaration: its parameters (validated on load), settings and defaults, importable without torch.
The maths, the training and the notes on fidelity to the paper and the official code: ``methods/models/mcmiad.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.method import METHODS, Method, param
from benchmark.protocol import BackboneSpec


@dataclass(frozen=True)
class MCMIADParams:
    levels: tuple[int, ...] = param((0, 1, 2, 3), ge=0)  # timm indices: strides 2, 4, 8, 16
    stride: int = param(16, ge=1)  # common grid of the concatenated stages
    dim: int = param(256, ge=1)
    heads: int = param(8, ge=1)
    ffn: int = param(1024, ge=1)
    blocks: int = param(2, ge=1)
    neighbourhood: int = param(7, ge=1)
    alpha: float = 1.0
    jitter_scale: float = param(20.0, gt=0)
    jitter_prob: float = param(1.0, ge=0, le=1)
    dropout: float = param(0.1, ge=0, le=0.9)
    use_text_fusion: bool = True
    text_model: str = "ViT-B-16"
    text_weights: str = "openai"
    score_weights: tuple[float, ...] = param((1.0, 1.0), ge=0)
    image_weights: tuple[float, ...] = param((0.5, 0.3, 0.2), ge=0)
    top_k: int = param(5, ge=1)
    calibration_quantile: float = param(1.0, gt=0, le=1)
    epochs: int = param(100, ge=1)
    lr: float = param(2e-4, gt=0)
    weight_decay: float = param(1e-4, ge=0)
    grad_clip: float = param(0.1, gt=0)
    batch_size: int = param(16, ge=1)
    progress: bool = True


@METHODS.register("mcmiad")
class MCMIAD(Method):
    """Reconstruction of frozen CNN features by a text-conditioned denoising decoder; normal images only."""

    name = "mcmiad"
    published_name = "MCMIAD"
    settings = frozenset({"full_normal", "few_normal"})
    Params = MCMIADParams
    default_backbone = BackboneSpec("efficientnet_b4", "ra2_in1k")
    default_image_size = 224
    implementation = "methods.models.mcmiad:MCMIADImpl"
    fit_state = ("head", "calibration", "history")
