"""April-GAN: zero-/few-shot anomaly classification and segmentation (Chen et al., VAND 2023 workshop
winner; official code ByChelsea/VAND-APRIL-GAN).

The plugin's declaration: its parameters (validated on load), settings and defaults, importable without torch.
The maths, the training and the notes on fidelity to the official code: ``methods/models/april_gan.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.method import METHODS, Method, Released, param
from benchmark.protocol import BackboneSpec


@dataclass(frozen=True)
class AprilGANParams:
    layers: tuple[int, ...] = param((6, 12, 18, 24), ge=1)  # features_list: projected into the text space
    memory_layers: tuple[int, ...] = param((6, 12, 18, 24), ge=1)  # few_shot_features: the reference memory
    epochs: int = param(15, ge=1)  # its VisA run (the checkpoint tested on MVTec AD)
    lr: float = param(1e-3, gt=0)
    batch_size: int = param(8, ge=1)
    cache_features: bool = True  # frozen tokens on disk: 4 x 1370 x 1024 floats (22 MB) an image at the defaults
    progress: bool = True


@METHODS.register("april_gan")
class AprilGAN(Method):
    name = "april_gan"
    published_name = "APRIL-GAN"
    settings = frozenset({"zero_shot_loo", "few_shot", "few_normal"})
    auxiliary_settings = frozenset({"few_shot", "few_normal"})  # its few-shot mode: a zero-shot model + references
    Params = AprilGANParams
    default_backbone = BackboneSpec("ViT-L-14-336", "openai")
    reference_precision = "fp16"  # test.py / train.py: fp32 weights under torch.cuda.amp.autocast()
    default_image_size = 518
    implementation = "methods.models.april_gan:AprilGANImpl"
    fit_state = ("projections", "memory", "stats", "history", "trained_on")
    released = Released(
        where="https://github.com/ByChelsea/VAND-APRIL-GAN/tree/master/exps/pretrained",
        files="mvtec_pretrained.pth (trained on MVTec AD), visa_pretrained.pth (trained on VisA)",
        configuration="backbone ViT-L-14-336 / openai, image_size 518, layers [6, 12, 18, 24]",
    )
