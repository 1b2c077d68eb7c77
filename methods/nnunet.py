"""nnU-Net (Isensee et al., Nature Methods 2021) through ``nnunetv2`` itself: its own planning, preprocessing,
training and prediction on the cell's training split, as a 2-D dataset of PNG images.

The plugin's declaration: parameters (validated on load), settings and defaults, importable without torch. How a
cell runs nnU-Net, and the notes on fidelity: ``methods/models/nnunet.py``.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmark.method import METHODS, param
from methods.segmenters import Segmenter


@dataclass(frozen=True)
class NnUNetParams:
    trainer: str = "nnUNetTrainer"  # a trainer class of nnunetv2's own (its variants: nnUNetTrainer_250epochs, ...)
    epochs: int | None = param(None, ge=1, kind=int)  # None: the trainer's (nnUNetTrainer: 1000)
    iterations_per_epoch: int | None = param(None, ge=1, kind=int)  # None: the trainer's (250)
    val_iterations: int | None = param(None, ge=1, kind=int)  # None: the trainer's (50)
    fold: str = param("all", choices=("all", "0", "1", "2", "3", "4"))  # all: trained on every training image
    mirroring: bool = True  # test-time mirroring, nnU-Net's default
    intensity_samples: int = param(100_000, ge=1)  # foreground pixels its fingerprint samples (see the module)
    # processes augmenting its training batches; None: none on the CPU (then reproducible), nnU-Net's own number on a
    # GPU (its speed; its workers are unseeded, so a GPU fit varies as nnU-Net's own does)
    augmentation_processes: int | None = param(None, ge=0, kind=int)


@METHODS.register("nnunet")
class NnUNet(Segmenter):
    """nnU-Net's 2d configuration, planned, trained and applied by nnunetv2."""

    name = "nnunet"
    published_name = "nnU-Net"
    Params = NnUNetParams
    backbone_free = True
    reference_precision = "fp16"  # its trainer and predictor autocast to fp16 on CUDA, whatever a protocol says
    default_resize = None  # nnU-Net takes the images as given (no resampling of 2-D PNGs): PIL's bicubic resize here
    implementation = "methods.models.nnunet:NnUNetImpl"
    fit_state = ("weights", "plans", "dataset_json", "mirror_axes", "history")
    libraries = ("nnunetv2", "dynamic_network_architectures", "batchgeneratorsv2")
    package = "nnunetv2"
    test_params = Segmenter.test_params | {"mirroring"}

    @classmethod
    def requirements(cls, params: dict[str, Any]) -> list[str]:
        """The extra, and a trainer class of that name in nnunetv2's trainer folder (its source read, not
        imported: importing its trainers takes seconds)."""
        spec = importlib.util.find_spec(cls.package)
        if spec is None:
            return [cls.missing_extra()]
        name = params.get("trainer", "nnUNetTrainer")
        folder = Path(next(iter(spec.submodule_search_locations))) / "training" / "nnUNetTrainer"
        pattern = re.compile(rf"^class {re.escape(name)}\b", re.MULTILINE)
        if any(pattern.search(f.read_text(encoding="utf-8")) for f in folder.rglob("*.py")):
            return []
        return [f"nnunet: trainer: no trainer class '{name}' in nnunetv2.training.nnUNetTrainer"]
