"""MedSAD-CLIP: supervised CLIP with Token-Patch Cross-Attention (../shared/papers/medsad-clip.txt, Sec. 3).

The plugin's declaration: its parameters (validated on load), settings and defaults, importable without torch.
The maths, the training and the notes on fidelity to the paper and the official code: ``methods/models/medsad_clip.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.method import METHODS, Method, param
from benchmark.protocol import BackboneSpec


@dataclass(frozen=True)
class MedSADParams:
    layers: tuple[int, ...] = param((6, 12, 18, 24), ge=1)
    n_prompt_tokens: int = param(10, ge=0)
    use_learnable_prompt: bool = True
    use_tpca: bool = True
    use_mc_loss: bool = True
    margin: float = param(0.4, ge=0)
    heads: int = param(8, ge=1)
    decoder_hidden: int = param(256, ge=1)
    gamma: float = param(0.1, ge=0, le=0.5)
    normal_anchor: str = "a photo of a normal {}."
    abnormal_anchor: str = "a photo of a damaged {}."
    loss_weights: tuple[float, ...] = param((1.0, 1.0, 1.0), ge=0)  # BCE, Dice + Focal, MC (Eq. 17)
    lr: float = param(1e-3, gt=0)
    batch_size: int = param(32, ge=1)
    epochs: int = param(50, ge=1)
    hflip: bool = True
    progress: bool = True


@METHODS.register("medsad_clip")
class MedSADCLIP(Method):
    name = "medsad_clip"
    published_name = "MedSAD-CLIP"
    settings = frozenset({"supervised", "few_shot"})
    requires_masks = True
    Params = MedSADParams
    default_backbone = BackboneSpec("ViT-L-14-336", "openai")
    default_image_size = 240
    implementation = "methods.models.medsad_clip:MedSADCLIPImpl"
    fit_state = ("model", "history")
