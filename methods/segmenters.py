"""Supervised segmentation networks, the baselines a vision-language segmenter is compared with: U-Net, UNet++ and
DeepLabv3 (segmentation_models_pytorch), Attention U-Net and SwinUNETR (MONAI), TransUNet, Swin-Unet and
Rolling-UNet (re-written from their official code, equal under identical weights), and nnU-Net (``nnunetv2``
itself, ``methods/nnunet.py``).

The plugins' declarations: parameters (validated on load), settings and defaults, importable without torch. The
training loop they share, the networks and the notes on fidelity: ``methods/models/segmenters.py`` and the
modules it names. These are segmenters: the image score is the probability map's maximum.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, ClassVar

from benchmark.method import METHODS, Method, param
from benchmark.protocol import BackboneSpec

EXTRA = 'pip install -e ".[segmentation]"'
AUGMENTS = ("none", "rotate", "rot_flip", "rot90_flip")  # ``methods.models.augment``
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "poly", "cosine")


@dataclass(frozen=True)
class TrainingParams:
    """The recipe of a trained segmenter (``methods.models.segmenters``). Defaults: MedCLIPSeg's training of its own
    model, whose README says the same instructions apply to the other techniques of its tables (Adam 3e-4, cosine
    to 1e-4 stepped each epoch, batch 24, 100 epochs, 0.5 Dice + 0.5 BCE, half the images rotated); a network with
    an official training script sets that script's values instead."""

    epochs: int = param(100, ge=1)
    batch_size: int = param(24, ge=1)
    optimizer: str = param("adam", choices=OPTIMIZERS)
    lr: float = param(3e-4, gt=0)
    lr_min: float = param(1e-4, ge=0)  # the cosine schedule's floor
    momentum: float = param(0.9, ge=0, le=1)  # SGD's
    weight_decay: float = param(0.0, ge=0)
    schedule: str = param("cosine", choices=SCHEDULES)  # poly: per iteration; cosine: per epoch
    dice_weight: float = param(0.5, ge=0)
    ce_weight: float = param(0.5, ge=0)  # cross-entropy (binary for one output channel)
    augment: str = param("rotate", choices=AUGMENTS)
    progress: bool = True


@dataclass(frozen=True)
class SmpParams(TrainingParams):
    encoder_depth: int = param(5, ge=1, le=5)
    decoder_channels: tuple[int, ...] = param((256, 128, 64, 32, 16), ge=1)  # one per decoder block (encoder_depth)

    def __post_init__(self) -> None:
        if len(self.decoder_channels) != self.encoder_depth:
            raise ValueError(
                f"decoder_channels: one per encoder level ({self.encoder_depth}), got {list(self.decoder_channels)}"
            )


@dataclass(frozen=True)
class DeepLabParams(TrainingParams):
    plus: bool = False  # DeepLabV3+ (its decoder joins the stride-4 features), no published row
    encoder_depth: int = param(5, ge=3, le=5)
    decoder_channels: int = param(256, ge=1)
    output_stride: int | None = param(None, choices=(8, 16), kind=int)  # None: smp's, 8 (DeepLabv3), 16 (v3+)


@dataclass(frozen=True)
class AttentionUnetParams(TrainingParams):
    channels: tuple[int, ...] = param((64, 128, 256, 512, 1024), ge=1)
    strides: tuple[int, ...] = param((2, 2, 2, 2), ge=1)  # one per level below the first
    dropout: float = param(0.0, ge=0, le=1)

    def __post_init__(self) -> None:
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"strides: one per level below the first ({len(self.channels) - 1}), got {list(self.strides)}"
            )


@dataclass(frozen=True)
class SwinUnetrParams(TrainingParams):
    feature_size: int = param(48, ge=12)  # a multiple of 12 (MONAI)
    depths: tuple[int, ...] = param((2, 2, 2, 2), ge=1)
    heads: tuple[int, ...] = param((3, 6, 12, 24), ge=1)

    def __post_init__(self) -> None:
        if self.feature_size % 12:
            raise ValueError(f"feature_size: a multiple of 12, got {self.feature_size}")
        if len(self.heads) != len(self.depths):
            raise ValueError(f"heads: one per stage ({len(self.depths)}), got {list(self.heads)}")


@dataclass(frozen=True)
class RollingUnetParams(TrainingParams):
    """Rolling-UNet's ``train.py``: Adam 1e-4 (L2 1e-4), cosine to 1e-5 over 400 epochs, batch 8 (the last partial
    batch dropped), 0.5 BCE + Dice, ``RandomRotate90`` and ``Flip``, 256 px."""

    variant: str = param("S", choices=("S", "M", "L"))
    widths: tuple[int, ...] | None = param(None, ge=1, kind=tuple)  # five widths instead of the variant's (tests)
    normalise: str = param("official", choices=("official", "imagenet"))  # official: its loader's, see the module
    epochs: int = param(400, ge=1)
    batch_size: int = param(8, ge=1)
    lr: float = param(1e-4, gt=0)
    lr_min: float = param(1e-5, ge=0)
    weight_decay: float = param(1e-4, ge=0)
    dice_weight: float = param(1.0, ge=0)
    augment: str = param("rot90_flip", choices=AUGMENTS)

    def __post_init__(self) -> None:
        if self.widths is not None and len(self.widths) != 5:
            raise ValueError(f"widths: five (three convolutional stages, stage 4, bottleneck), got {list(self.widths)}")


@dataclass(frozen=True)
class SynapseParams(TrainingParams):
    """TransUNet's ``train.py`` and ``trainer.py`` (its Synapse recipe), which Swin-Unet's training reuses: SGD
    (momentum 0.9, weight decay 1e-4), poly decay per iteration, 150 epochs, batch 24, ``rot_flip``, 224 px, no
    mean/std normalisation."""

    epochs: int = param(150, ge=1)
    optimizer: str = param("sgd", choices=OPTIMIZERS)
    lr: float = param(0.01, gt=0)
    weight_decay: float = param(1e-4, ge=0)
    schedule: str = param("poly", choices=SCHEDULES)
    augment: str = param("rot_flip", choices=AUGMENTS)


@dataclass(frozen=True)
class TransUNetParams(SynapseParams):
    """TransUNet's network and its recipe: lr 0.01, 0.5 cross-entropy + 0.5 Dice (softmax over background and lesion,
    over the whole batch, squared denominators)."""

    skips: int = param(3, ge=0, le=3)  # its n_skip
    dropout: float = param(0.1, ge=0, le=1)  # its dropout_rate: after the position embedding and in every MLP
    layers: tuple[int, ...] = param((3, 4, 9), ge=1)  # the blocks of ResNet-50's three stages (smaller: tests)
    depth: int = param(12, ge=1)  # ViT-B's blocks, width and heads
    width: int = param(768, ge=1)
    heads: int = param(12, ge=1)

    def __post_init__(self) -> None:
        if len(self.layers) != 3:
            raise ValueError(f"layers: three stages (its three skips), got {list(self.layers)}")


@dataclass(frozen=True)
class SwinUnetParams(SynapseParams):
    """Swin-Unet as its README runs it (observed: its code has no licence): TransUNet's recipe at lr 0.05 with 0.4
    cross-entropy + 0.6 Dice; its configuration's encoder depths (2, 2, 2, 2), drop path 0.2."""

    depths: tuple[int, ...] = param((2, 2, 2, 2), ge=1)
    heads: tuple[int, ...] = param((3, 6, 12, 24), ge=1)
    width: int = param(96, ge=1)  # embed_dim
    window: int = param(7, ge=1)
    drop_path: float = param(0.2, ge=0, le=1)
    lr: float = param(0.05, gt=0)
    dice_weight: float = param(0.6, ge=0)
    ce_weight: float = param(0.4, ge=0)

    def __post_init__(self) -> None:
        if len(self.depths) != 4 or len(self.heads) != 4:
            raise ValueError(f"depths and heads: four stages each, got {list(self.depths)} and {list(self.heads)}")


class Segmenter(Method):
    """A supervised segmenter: trained on the labelled images and masks its setting brings, nothing else."""

    settings = frozenset({"supervised", "few_shot", "data_fraction", "domain_generalization"})
    requires_masks = True
    default_image_size = 224
    default_resize = "bilinear"  # MedCLIPSeg's loader's cv2.resize (and Rolling-UNet's albumentations Resize)
    fit_state = ("model", "history")
    fit_reads_target = False  # trains on the images and masks alone: one fit per training set
    setting_blind = True
    reads_valid = False  # a fixed number of epochs, the last one kept: no model selection
    libraries: ClassVar[tuple[str, ...]] = ("monai",)  # MONAI's losses train them all
    package: ClassVar[str] = ""  # the optional package it needs (the segmentation extra installs it)

    @classmethod
    def missing_extra(cls) -> str:
        """The one-line error when its package is not installed."""
        return f"{cls.name}: needs {cls.package}, which the segmentation extra installs: {EXTRA}"

    @classmethod
    def requirements(cls, params: dict[str, Any]) -> list[str]:
        return [cls.missing_extra()] if cls.package and importlib.util.find_spec(cls.package) is None else []


@METHODS.register("unet")
class UNet(Segmenter):
    """U-Net (Ronneberger et al., 2015) with a timm encoder, segmentation_models_pytorch's ``Unet``."""

    name = "unet"
    published_name = "UNet"
    Params = SmpParams
    default_backbone = BackboneSpec("resnet34", "tv_in1k")  # smp's default encoder and its ImageNet weights
    libraries = ("monai", "segmentation_models_pytorch")
    package = "segmentation_models_pytorch"
    implementation = "methods.models.segmenters:UNetImpl"


@METHODS.register("unetplusplus")
class UNetPlusPlus(Segmenter):
    """UNet++ (Zhou et al., 2018) with a timm encoder, segmentation_models_pytorch's ``UnetPlusPlus``."""

    name = "unetplusplus"
    published_name = "UNet++"
    Params = SmpParams
    default_backbone = BackboneSpec("resnet34", "tv_in1k")
    libraries = ("monai", "segmentation_models_pytorch")
    package = "segmentation_models_pytorch"
    implementation = "methods.models.segmenters:UNetPlusPlusImpl"


@METHODS.register("deeplabv3")
class DeepLabV3(Segmenter):
    """DeepLabv3 (Chen et al., 2017), or DeepLabv3+ with ``plus``, segmentation_models_pytorch's."""

    name = "deeplabv3"
    published_name = "DeepLabv3"
    Params = DeepLabParams
    default_backbone = BackboneSpec("resnet34", "tv_in1k")
    libraries = ("monai", "segmentation_models_pytorch")
    package = "segmentation_models_pytorch"
    implementation = "methods.models.segmenters:DeepLabV3Impl"

    def published_as(self) -> str:
        return "" if self.params.plus else self.published_name


@METHODS.register("attention_unet")
class AttentionUNet(Segmenter):
    """Attention U-Net (Oktay et al., 2018), MONAI's ``AttentionUnet``, trained from scratch."""

    name = "attention_unet"
    published_name = "Attention U-Net"
    Params = AttentionUnetParams
    backbone_free = True
    implementation = "methods.models.segmenters:AttentionUNetImpl"


@METHODS.register("transunet")
class TransUNet(Segmenter):
    """TransUNet (Chen et al., 2021) R50-ViT-B/16, re-written from its official code (Apache-2.0) on timm's hybrid
    ViT, trained from Google's ImageNet-21k weights as its code loads them."""

    name = "transunet"
    published_name = "TransUNet"
    Params = TransUNetParams
    default_backbone = BackboneSpec("vit_base_r50_s16_224", "orig_in21k")
    default_resize = None  # its preprocessing zooms with cubic splines: PIL's bicubic here
    implementation = "methods.models.segmenters:TransUNetImpl"


@METHODS.register("swin_unet")
class SwinUnet(Segmenter):
    """Swin-Unet (Cao et al., 2021), implemented from its paper and its code's observed behaviour (the code has no
    licence) on timm's Swin, initialised from Microsoft's ImageNet-1k Swin-T as its code does."""

    name = "swin_unet"
    published_name = "Swin-UNet"
    Params = SwinUnetParams
    default_backbone = BackboneSpec("swin_tiny_patch4_window7_224", "ms_in1k")
    default_resize = None  # its preprocessing zooms with cubic splines: PIL's bicubic here
    implementation = "methods.models.segmenters:SwinUnetImpl"


@METHODS.register("rolling_unet")
class RollingUNet(Segmenter):
    """Rolling-UNet (Liu et al., AAAI 2024), re-written from its official code (MIT), trained from scratch."""

    name = "rolling_unet"
    published_name = "Rolling-UNet"
    Params = RollingUnetParams
    backbone_free = True
    default_image_size = 256
    implementation = "methods.models.segmenters:RollingUNetImpl"


@METHODS.register("swin_unetr")
class SwinUNETR(Segmenter):
    """SwinUNETR (Hatamizadeh et al., 2022) in 2-D, MONAI's, trained from scratch; no paper here reports it."""

    name = "swin_unetr"
    Params = SwinUnetrParams
    backbone_free = True
    implementation = "methods.models.segmenters:SwinUNETRImpl"
