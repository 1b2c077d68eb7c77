"""AdaCLIP: CLIP adapted with hybrid learnable prompts for zero-shot anomaly detection (Cao et al., ECCV 2024;
official code caoyunkang/AdaCLIP).

The plugin's declaration: its parameters (validated on load), settings and defaults, importable without torch.
The maths, the training and the notes on fidelity to the official code: ``methods/models/adaclip.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.method import METHODS, Method, param
from benchmark.protocol import BackboneSpec


@dataclass(frozen=True)
class AdaCLIPParams:
    layers: tuple[int, ...] = param(
        (6, 12, 18, 24), ge=1, increasing=True
    )  # output_layers: patch tokens projected into text space
    prompt_length: int = param(5, ge=1)  # prompting_length
    prompt_depth: int = param(4, ge=1)  # prompting_depth: blocks 1..N of each tower receive prompts
    prompt_type: str = param("SD", choices=("S", "D", "SD"))  # static, dynamic or both (hybrid)
    prompt_branch: str = param("VL", choices=("V", "L", "VL"))  # the vision tower, the text tower or both
    use_hsf: bool = True  # hybrid semantic fusion of the image feature
    k_clusters: int = param(20, ge=1)  # HSF: KMeans clusters over the 5 k most anomalous patches
    hsf_alpha: float = param(0.2, ge=0, le=1)
    epochs: int = param(5, ge=1)
    lr: float = param(0.01, gt=0)
    weight_decay: float = param(0.01, ge=0)  # AdamW's default, as its trainer leaves it
    batch_size: int = param(1, ge=1)  # its code runs 1 (the Dice over rows below needs it)
    dice_rows: bool = True  # its Dice at batch 1 averages over the mask's rows (it squeezes the batch away)
    sigma: float = param(4.0, ge=0)  # Gaussian smoothing of the test map, in pixels
    cache_features: bool = True  # the frozen image embedding that drives the dynamic prompts
    progress: bool = True


@METHODS.register("adaclip")
class AdaCLIP(Method):
    name = "adaclip"
    published_name = "AdaCLIP"
    settings = frozenset({"zero_shot_loo", "few_shot", "supervised"})
    Params = AdaCLIPParams
    default_backbone = BackboneSpec("ViT-L-14-336", "openai")
    reference_precision = "fp16"  # its forward runs under torch.cuda.amp.autocast()
    default_image_size = 518
    implementation = "methods.models.adaclip:AdaCLIPImpl"
    fit_state = ("model", "history")
    reads_valid = False  # no model selection, no calibration
    test_params = Method.test_params | {"sigma"}
