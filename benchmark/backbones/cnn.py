"""A frozen timm CNN giving feature maps of chosen stages, with weights looked up on disk only.

``BackboneSpec.weights`` is a timm pretrained tag of the model (``aa_in1k`` for
``tf_efficientnet_b6.aa_in1k``), a local checkpoint file, or ``random-init`` (tests and the demo use small
timm architectures such as ``mobilenetv3_small_050`` with seeded random weights).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import timm
import torch
from torch import nn

from benchmark.backbones.cache import FeatureCache
from benchmark.backbones.weights import resolve_timm_weights
from benchmark.errors import BenchmarkError
from benchmark.protocol import BackboneSpec


class CnnBackbone(nn.Module):
    """Frozen timm ``features_only`` model; ``forward`` takes images in [0,1] and normalises them itself."""

    def __init__(self, model: nn.Module, spec: BackboneSpec, mean, std, out_indices: Sequence[int] = ()) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.spec = spec
        self.out_indices = tuple(out_indices)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def channels(self) -> list[int]:
        return self.model.feature_info.channels()

    @property
    def reductions(self) -> list[int]:
        return self.model.feature_info.reduction()

    def train(self, mode: bool = True) -> CnnBackbone:
        return super().train(False)  # always frozen: batch-norm statistics never move

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.model((images - self.mean) / self.std)

    def cached(self, cache: FeatureCache, keys: tuple[str, ...], images: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps of a batch, read from the on-disk cache for images seen before (keyed by backbone,
        weights, image size, stages and the image file's hash)."""
        recipe = {
            "features": "timm-features-v1",
            "backbone": self.spec.label(),
            "image_size": images.shape[-1],
            "levels": list(self.out_indices),
        }
        out = cache.cached(recipe, keys, images.to(self.mean.device), lambda x: dict(enumerate(self(x))))
        return [out[i] for i in range(len(self.out_indices))]


def load_timm(spec: BackboneSpec, out_indices: Sequence[int], device: torch.device | str = "cpu") -> CnnBackbone:
    if spec.model not in timm.list_models():
        raise BenchmarkError(f"backbone.model: unknown timm model '{spec.model}'")
    kwargs = {"features_only": True, "out_indices": tuple(out_indices)}
    if spec.random_init:
        torch.manual_seed(spec.seed)
        model = timm.create_model(spec.model, pretrained=False, **kwargs)
    else:
        path = resolve_timm_weights(spec.model, spec.weights)
        name = spec.model if os.path.isfile(spec.weights) else f"{spec.model}.{spec.weights}"
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path}, **kwargs)
    cfg = model.pretrained_cfg
    mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
    return CnnBackbone(model, spec, mean, std, out_indices).to(device)
