"""AnomalyCLIP: object-agnostic prompt learning for zero-shot anomaly detection (Zhou et al., ICLR 2024;
official code zqhang/AnomalyCLIP).

The plugin's declaration: its parameters (validated on load), settings and defaults, importable without torch.
The maths, the training and the notes on fidelity to the official code: ``methods/models/anomalyclip.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.method import METHODS, Method, Released, param
from benchmark.protocol import BackboneSpec


@dataclass(frozen=True)
class AnomalyCLIPParams:
    layers: tuple[int, ...] = param((6, 12, 18, 24), ge=1)  # features_list (train.py's default)
    dpam_blocks: int = param(19, ge=0)  # DPAM in the last N vision blocks (its DPAM_layer = 20: N = 19)
    prompt_length: int = param(12, ge=1)  # n_ctx: learnable tokens of each object-agnostic prompt
    deep_depth: int = param(9, ge=1)  # depth: deep text prompts enter text blocks 2..depth
    deep_length: int = param(4, ge=1)  # t_n_ctx: tokens of each deep text prompt
    epochs: int = param(15, ge=1)
    lr: float = param(1e-3, gt=0)
    batch_size: int = param(8, ge=1)
    seg_weight: float = param(4.0, ge=0)  # lam: weight of the focal + Dice terms against the image CE
    sigma: float = param(4.0, ge=0)  # Gaussian smoothing of the test map, in pixels
    cache_features: bool = True  # frozen DPAM tokens on disk (4 x 1370 x 768 floats an image at the defaults)
    progress: bool = True


@METHODS.register("anomalyclip")
class AnomalyCLIP(Method):
    name = "anomalyclip"
    published_name = "AnomalyCLIP"
    settings = frozenset({"zero_shot_loo", "few_shot", "supervised"})
    Params = AnomalyCLIPParams
    default_backbone = BackboneSpec("ViT-L-14-336", "openai")
    default_image_size = 518
    implementation = "methods.models.anomalyclip:AnomalyCLIPImpl"
    fit_state = ("prompts", "text", "history")
    released = Released(
        where="https://github.com/zqhang/AnomalyCLIP/tree/main/checkpoints",
        files="9_12_4_multiscale/epoch_15.pth (trained on VisA: the one its scripts test every other set with), "
        "9_12_4_multiscale_visa/epoch_15.pth (trained on MVTec AD)",
        configuration="backbone ViT-L-14-336 / openai, image_size 518, layers [24], sigma 4 (its test.sh)",
    )
    test_params = Method.test_params | {"sigma"}  # the maps' smoothing, at test time only
