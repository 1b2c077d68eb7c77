"""UniAD: a unified reconstruction Transformer with neighbourhood-masked attention, learned queries and feature
jittering (You et al., "A Unified Model for Multi-class Anomaly Detection", NeurIPS 2022; code zhiyuanyou/UniAD).

The plugin's declaration: its parameters (validated on load), settings and defaults, importable without torch.
The maths, the training and the notes on fidelity to the official code: ``methods/models/uniad.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.method import METHODS, Method, param
from benchmark.protocol import BackboneSpec


@dataclass(frozen=True)
class UniADParams:
    levels: tuple[int, ...] = param((0, 1, 2, 3), ge=0)  # timm indices: strides 2, 4, 8, 16 (its outlayers 1-4)
    stride: int = param(16, ge=1)  # the common grid of the concatenated stages (14 x 14 at 224 px)
    same_padding: int = param(380, ge=0)  # its EfficientNet's padding, fixed for 380 px; 0: timm's dynamic one
    dim: int = param(256, ge=1)
    heads: int = param(8, ge=1)
    ffn: int = param(1024, ge=1)
    encoder_blocks: int = param(4, ge=1)
    decoder_blocks: int = param(4, ge=1)
    neighbourhood: int = param(7, ge=1)
    jitter_scale: float = param(20.0, ge=0)
    jitter_prob: float = param(1.0, ge=0, le=1)
    dropout: float = param(0.1, ge=0, le=0.9)
    pool: int = param(16, ge=1)  # image score: max of the map average-pooled over pool x pool windows
    epochs: int = param(1000, ge=1)
    lr: float = param(1e-4, gt=0)
    weight_decay: float = param(1e-4, ge=0)
    lr_step: int = param(800, ge=1)  # StepLR, stepped after each epoch
    lr_gamma: float = param(0.1, gt=0, le=1)
    grad_clip: float = param(0.1, gt=0)
    batch_size: int = param(8, ge=1)
    progress: bool = True


@METHODS.register("uniad")
class UniAD(Method):
    """Reconstruction of frozen EfficientNet-B4 features by a neighbourhood-masked Transformer; normal images only."""

    name = "uniad"
    published_name = "UniAD"
    settings = frozenset({"full_normal", "few_normal"})
    Params = UniADParams
    default_backbone = BackboneSpec("tf_efficientnet_b4", "aa_in1k")  # lukemelas' B4: TF's AutoAugment weights
    default_image_size = 224
    implementation = "methods.models.uniad:UniADImpl"
    fit_state = ("head", "stats", "history")
    one_class = True
    reads_valid = False  # its epochs are fixed; statistics from the training images
