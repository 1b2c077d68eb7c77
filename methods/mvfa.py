"""MVFA: multi-level visual feature adaptation and comparison (Huang et al., CVPR 2024; MVFA-AD code).

The plugin's declaration: its parameters (validated on load), settings and defaults, importable without torch.
The maths, the training and the notes on fidelity to the paper and the official code: ``methods/models/mvfa.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmark.method import METHODS, Method, Released, param
from benchmark.protocol import BackboneSpec


@dataclass(frozen=True)
class MVFAParams:
    mode: str = param("official", choices=("official", "paper"))  # see the module docstring
    layers: tuple[int, ...] = param((6, 12, 18, 24), ge=1)
    bottleneck: int = param(0, ge=0)  # 0: the backbone's text embedding width
    gamma: float = param(0.1, ge=0, le=0.5)
    epochs: int = param(50, ge=1)
    lr: float | None = param(None, gt=0, kind=float)  # None: the mode's default
    batch_size: int | None = param(None, ge=1, kind=int)  # None: the mode's default
    beta: float = param(0.5, ge=0, le=1)  # beta1 = beta2 (Eq. 6)
    select_on_valid: bool = True  # official mode: best epoch on the validation images, when there are any
    progress: bool = True


@METHODS.register("mvfa")
class MVFA(Method):
    name = "mvfa"
    published_name = "MVFA"
    settings = frozenset({"zero_shot_loo", "few_shot", "supervised"})
    Params = MVFAParams
    default_backbone = BackboneSpec("ViT-L-14-336", "openai")
    reference_precision = "fp16"  # test_few.py / train_few.py: fp32 weights under torch.cuda.amp.autocast()
    default_image_size = 240
    implementation = "methods.models.mvfa:MVFAImpl"
    fit_state = ("model", "memory", "stats", "selected_epoch", "history", "used")
    released = Released(
        where="Google Drive, from the MVFA-AD README: few-shot.zip "
        "https://drive.google.com/file/d/1bV1yzPxJarTRfd8liMIwyHcGywTTEL2k/view and zero-shot.zip "
        "https://drive.google.com/file/d/1nGhcK32CrkgTR5Rav6rNfptUHaASfRnU/view",
        files="few-shot/{Brain,Liver,Retina_RESC,Retina_OCT2017,Chest,Histopathology}.pth and the same in zero-shot/",
        configuration="backbone ViT-L-14-336 / openai, image_size 240, mode official, layers [6, 12, 18, 24]",
        per_dataset=True,
    )
