"""WinCLIP and WinCLIP+ (Jeong et al., CVPR 2023): zero-/few-normal-shot anomaly detection with CLIP.

The plugin's declaration: its parameters (validated on load), settings and defaults, importable without torch.
The maths, the training and the notes on fidelity to the paper and the official code: ``methods/models/winclip.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.method import METHODS, Method, param
from benchmark.protocol import BackboneSpec


@dataclass(frozen=True)
class WinCLIPParams:
    scales: tuple[int, ...] = param((2, 3), ge=1)
    temperature: float = param(0.07, gt=0)
    reference_images: bool = True  # WinCLIP+: use the cell's normal target images as reference memory
    batch_size: int = param(16, ge=1)


@METHODS.register("winclip")
class WinCLIP(Method):
    """Zero-shot WinCLIP; WinCLIP+ when the cell gives normal images of the target dataset.

    In ``few_shot`` and ``supervised`` cells only the normal training images are used (as references);
    WinCLIP has no use for labelled anomalies. In ``zero_shot_loo`` nothing of the training data is used.
    """

    name = "winclip"
    published_name = "WinCLIP"
    settings = frozenset({"zero_shot_loo", "few_normal", "few_shot", "full_normal", "supervised"})
    seed_free_settings = settings  # nothing is trained: the scores follow from the backbone and the images
    one_class = True  # its reference images are the normal ones (few_shot's anomalies are never read)
    setting_blind = True  # it reads the setting only to tell zero-shot LOO apart
    reads_valid = False
    Params = WinCLIPParams
    default_backbone = BackboneSpec("ViT-B-16-plus-240", "laion400m_e31")
    # the common reimplementation (caoyunkang/WinClip, model.py) casts the model to fp16 (open_clip precision='fp16')
    reference_precision = "fp16"
    default_image_size = 240
    implementation = "methods.models.winclip:WinCLIPImpl"
