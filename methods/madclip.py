"""MadCLIP: few-shot medical anomaly detection with CLIP (Shiri, Beyan, Murino, MICCAI 2025; official code
mahshid1998/MadCLIP).

The plugin's declaration: its parameters (validated on load), settings and defaults, importable without torch.
The maths, the training and the notes on fidelity to the official code: ``methods/models/madclip.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.method import METHODS, Method, param
from benchmark.protocol import BackboneSpec


@dataclass(frozen=True)
class MadCLIPParams:
    layers: tuple[int, ...] = param((6, 12, 18, 24), ge=1, increasing=True)  # features_list: the adapters' taps
    context_length: int = param(8, ge=1)  # n_ctx: learnable tokens of each prompt
    epochs: int = param(60, ge=1)
    lr: float = param(1e-3, gt=0)
    batch_size: int = param(16, ge=1)
    augment: bool = True  # each training image 16 times (MVFA's 11 views, 4 zooms, a colour jitter)
    select_on_valid: bool = True  # best epoch on the target's unused validation images, when there are any
    cache_features: bool = True  # the frozen taps of un-augmented images on disk (4 x 290 x 1024 floats at 240 px)
    progress: bool = True


@METHODS.register("madclip")
class MadCLIP(Method):
    name = "madclip"
    published_name = "MadCLIP"
    settings = frozenset({"zero_shot_loo", "few_shot", "supervised"})
    Params = MadCLIPParams
    default_backbone = BackboneSpec("ViT-L-14-336", "openai")
    reference_precision = "fp16"  # train.py / test.py: fp32 weights under torch.cuda.amp.autocast()
    default_image_size = 240
    implementation = "methods.models.madclip:MadCLIPImpl"
    fit_state = ("adapters", "prompts", "text", "stats", "selected_epoch", "history")
