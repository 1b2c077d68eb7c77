"""AA-CLIP: anomaly-aware CLIP by two-stage adaptation (Ma et al., CVPR 2025; official code Mwxinnn/AA-CLIP).

The plugin's declaration: its parameters (validated on load), settings and defaults, importable without torch.
The maths, the training and the notes on fidelity to the paper and the official code: ``methods/models/aaclip.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.method import METHODS, Method, param
from benchmark.protocol import BackboneSpec


@dataclass(frozen=True)
class AACLIPParams:
    mode: str = param("official", choices=("official", "paper"))  # see the module docstring
    levels: tuple[int, ...] = param(
        (6, 12, 18, 24), ge=1, increasing=True
    )  # features_list: patch tokens compared with the anchors
    image_adapt_until: int = param(6, ge=1)  # residual adapters after vision blocks 1..N
    text_adapt_until: int = param(3, ge=1)  # residual adapters after text blocks 1..N
    image_adapt_weight: float = param(0.1, ge=0, le=1)
    text_adapt_weight: float = param(0.1, ge=0, le=1)
    vv_blocks: int = param(19, ge=0)  # stage 1: V-V attention in the last N vision blocks (its surgery_until_layer 20)
    orth_weight: float = param(0.1, ge=0)  # text_norm_weight: the anchors' orthogonality term
    text_epochs: int = param(5, ge=0)
    text_lr: float = param(1e-5, gt=0)
    text_batch_size: int = param(16, ge=1)
    image_epochs: int = param(20, ge=1)
    image_lr: float = param(5e-4, gt=0)
    image_batch_size: int = param(2, ge=1)
    lr_milestones: tuple[int, ...] = param((16000, 32000), ge=1)  # stage 2: the rate halves at these iterations
    blur_kernel: int = param(9, ge=1)  # test maps: Gaussian blur on the patch grid (its medical setting 9 / 1.5)
    blur_sigma: float = param(1.5, ge=0)
    augment: bool = True  # rotations, shifts, flips (both stages); colour jitter (stage 2)
    cache_features: bool = True  # stage 1's frozen V-V tokens on disk (paper mode, augment off: else never the same)
    progress: bool = True


@METHODS.register("aaclip")
class AACLIP(Method):
    name = "aaclip"
    published_name = "AA-CLIP"
    settings = frozenset({"zero_shot_loo", "few_shot", "supervised"})
    Params = AACLIPParams
    default_backbone = BackboneSpec("ViT-L-14-336", "openai")
    default_image_size = 518
    implementation = "methods.models.aaclip:AACLIPImpl"
    fit_state = ("text_adapters", "image_adapters", "anchor", "stats", "history", "text_history")

    def published_as(self) -> str:
        return "AA-CLIP" if self.params.mode == "official" else f"AA-CLIP ({self.params.mode})"
