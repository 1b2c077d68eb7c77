"""A frozen timm CNN giving feature maps of chosen stages, with weights looked up on disk only.

``BackboneSpec.weights`` is a timm pretrained tag of the model (``aa_in1k`` for
``tf_efficientnet_b6.aa_in1k``), a local checkpoint file, or ``random-init`` (tests and the demo use small
timm architectures such as ``mobilenetv3_small_050`` with seeded random weights).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Conv2dSame
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
        self.variant = ""  # a change to the model the cached features depend on (``static_same_padding``)
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
            **({"variant": self.variant} if self.variant else {}),
        }
        out = cache.cached(recipe, keys, images.to(self.mean.device), lambda x: dict(enumerate(self(x))))
        return [out[i] for i in range(len(self.out_indices))]


def timm_model(spec: BackboneSpec, device: torch.device | str = "cpu", **kwargs) -> tuple[nn.Module, tuple, tuple]:
    """A timm model of ``spec`` (``kwargs`` go to ``timm.create_model``), its weights looked up on disk only or
    seeded random-init, and the mean and std its weights expect; the model as built, for methods that train it
    (DRA fine-tunes its ResNet-18)."""
    if spec.model not in timm.list_models():
        raise BenchmarkError(f"backbone.model: unknown timm model '{spec.model}'")
    if spec.random_init:
        torch.manual_seed(spec.seed)
        model = timm.create_model(spec.model, pretrained=False, **kwargs)
    else:
        path = resolve_timm_weights(spec.model, spec.weights)
        name = spec.model if os.path.isfile(spec.weights) else f"{spec.model}.{spec.weights}"
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": path}, **kwargs)
    cfg = model.pretrained_cfg
    mean, std = cfg.get("mean", IMAGENET_DEFAULT_MEAN), cfg.get("std", IMAGENET_DEFAULT_STD)
    return model.to(device), tuple(mean), tuple(std)


def load_timm(spec: BackboneSpec, out_indices: Sequence[int], device: torch.device | str = "cpu") -> CnnBackbone:
    model, mean, std = timm_model(spec, device, features_only=True, out_indices=tuple(out_indices))
    return CnnBackbone(model, spec, mean, std, out_indices).to(device)


def tf_same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's 'SAME' padding (before, after) of one axis of length ``size``."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def static_same_padding(backbone: CnnBackbone, image_size: int) -> CnnBackbone:
    """Fix the padding of every dynamically 'SAME'-padded convolution (timm's ``Conv2dSame``, its ``tf_`` models)
    to what it is for ``image_size`` input, whatever the input then: lukemelas' EfficientNet-PyTorch (UniAD's
    backbone) computes its padding once for the model's native resolution (380 px for B4), so at 224 px one
    stride-2 convolution of B4 pads (2, 2) where TF-'SAME' pads (1, 2), and the stride-8 and stride-16 features
    differ from timm's. A no-op for a model without such convolutions."""
    sizes: dict[str, tuple[int, int]] = {}
    convs = {name: m for name, m in backbone.model.named_modules() if isinstance(m, Conv2dSame)}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            sizes[name] = tuple(args[0].shape[-2:])

        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in convs.items()]
    with torch.no_grad():
        backbone.model(torch.zeros(1, 3, image_size, image_size, device=backbone.mean.device))
    for hook in hooks:
        hook.remove()
    for name, conv in convs.items():
        (h, w), (kh, kw), (sh, sw), (dh, dw) = sizes[name], conv.kernel_size, conv.stride, conv.dilation
        top, bottom = tf_same_padding(h, kh, sh, dh)
        left, right = tf_same_padding(w, kw, sw, dw)
        fixed = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                          conv.groups, conv.bias is not None).to(conv.weight.device)  # fmt: skip
        fixed.load_state_dict(conv.state_dict())
        parent, _, child = name.rpartition(".")
        module = backbone.model.get_submodule(parent) if parent else backbone.model
        setattr(module, child, nn.Sequential(nn.ZeroPad2d((left, right, top, bottom)), fixed).requires_grad_(False))
    if convs:
        backbone.variant = f"same-padding-{image_size}"
    return backbone
