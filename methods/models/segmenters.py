"""Training and prediction shared by the supervised segmenters (``methods/segmenters.py``), and the networks that
come from a library: segmentation_models_pytorch's ``Unet``, ``UnetPlusPlus``, ``DeepLabV3``/``DeepLabV3Plus``
on a timm encoder, MONAI's ``AttentionUnet`` and ``SwinUNETR``.

- Input: images in [0, 1], normalised as each network's recipe says (``Normalised``): the encoder's mean and std
  (ImageNet's for the networks trained from scratch), none for TransUNet and Swin-Unet, Rolling-UNet's loader's.
- Output: logits of one channel (sigmoid: the lesion's probability) or of two (softmax, background and lesion:
  TransUNet's and Swin-Unet's heads); the map is the lesion's probability, the image score its maximum (these
  are segmenters: "is there a lesion" is read off the map).
- Loss: MONAI's ``DiceCELoss`` (``criterion``), ``dice_weight`` Dice + ``ce_weight`` cross-entropy (binary for one
  channel), the Dice per image and channel; a network may set how its Dice is taken (``dice``: TransUNet's own
  ``DiceLoss`` is MONAI's with squared denominators over the whole batch, background included).
- Training: ``benchmark.training.fit`` with the recipe's optimiser and schedule (``poly``, ``cosine``), augmentation
  ``rotate`` (MedCLIPSeg's), ``rot_flip`` (TransUNet's) or ``rot90_flip`` (Rolling-UNet's;
  ``methods.models.augment``), the last epoch kept.
- Encoder weights: a timm model name and tag (``BackboneSpec``), looked up on disk like every other weight
  (``fetch-weights``); smp builds the encoder through timm (``tu-`` names) from that file.
"""

from __future__ import annotations

import math
import os
from typing import ClassVar

import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from torch import nn

from benchmark import training
from benchmark.backbones.cnn import timm_model
from benchmark.backbones.weights import resolve_timm_weights
from benchmark.data.loading import ImageBatch
from benchmark.errors import BenchmarkError
from benchmark.method import MethodContext, Prediction, TrainSet
from benchmark.protocol import BackboneSpec
from methods.models.augment import rot90_flip, rot_flip, rotate_half
from methods.models.rolling_unet import ROLLING_UNET_VARIANTS
from methods.models.rolling_unet import RollingUNet as RollingNet
from methods.models.swin_unet import SwinUnet as SwinUnetNet
from methods.models.swin_unet import load_pretrained
from methods.models.transunet import TransUNet as TransUNetNet
from methods.models.transunet import load_encoder
from methods.segmenters import (
    AttentionUNet,
    DeepLabV3,
    RollingUNet,
    Segmenter,
    SwinUnet,
    SwinUNETR,
    TrainingParams,
    TransUNet,
    UNet,
    UNetPlusPlus,
)

AUGMENT = {"rotate": rotate_half, "rot_flip": rot_flip, "rot90_flip": rot90_flip}


def segmentation_models(method: type[Segmenter]):
    """segmentation_models_pytorch, or a one-line error naming the extra that installs it."""
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        raise BenchmarkError(method.missing_extra()) from None
    return smp


class Normalised(nn.Module):
    """A network fed images in [0, 1]: normalised with ``mean`` and ``std`` first; ``bgr``: the channels reversed
    before (a loader's ``cv2.imread``), ``scale``: a factor after (Rolling-UNet's loader divides by 255 again)."""

    def __init__(self, net: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD, bgr: bool = False, scale: float = 1.0):
        super().__init__()
        self.net = net
        self.bgr, self.scale = bgr, scale
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.flip(1) if self.bgr else images
        return self.net((images - self.mean) / self.std * self.scale)


def lesion_probability(logits: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]``: the sigmoid of one channel, else the softmax's channel 1 (background is channel 0)."""
    return torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else logits.softmax(1)[:, 1]


def schedule(params: TrainingParams):
    """``lr_at`` of ``training.fit`` for the recipe's schedule, or None for a constant rate."""
    if params.schedule == "poly":
        return training.poly(params.lr, params.epochs)
    if params.schedule == "cosine":
        return training.cosine(params.lr, params.lr_min, params.epochs)
    return None


def criterion(classes: int, dice_weight: float, ce_weight: float, **dice) -> nn.Module:
    """MONAI's ``DiceCELoss`` for ``classes`` output channels: sigmoid and BCE for one, softmax over one-hot labels and
    cross-entropy for two; ``dice``: options of its Dice (TransUNet's: ``squared_pred``, ``batch``)."""
    from monai.losses import DiceCELoss  # here, not at import: MONAI imports all its subpackages (seconds)

    two = classes == 2
    return DiceCELoss(
        sigmoid=not two, softmax=two, to_onehot_y=two, lambda_dice=dice_weight, lambda_ce=ce_weight, **dice
    )


class SegmenterImpl:
    """The training and prediction of a supervised segmenter; a subclass builds the network (``network``)."""

    params: TrainingParams
    context: MethodContext
    classes: ClassVar[int] = 1  # output channels: 1 (sigmoid) or 2 (softmax over background and lesion)
    min_batch: ClassVar[int] = 1  # a training batch smaller than this is skipped (batch norm over 1x1 maps)
    drop_last: ClassVar[bool] = False  # a last training batch smaller than ``batch_size`` is skipped
    dice: ClassVar[dict] = {}  # MONAI DiceLoss options of this network's recipe

    def __init__(self, params: TrainingParams, context: MethodContext) -> None:
        super().__init__(params, context)
        torch.manual_seed(context.seed)
        self.model = self.network().to(context.device)
        self.criterion = criterion(self.classes, params.dice_weight, params.ce_weight, **self.dice)
        self.history: list[float] = []

    def network(self) -> nn.Module:
        """The network, images in [0, 1] -> logits ``[B, C, H, W]`` (C: 1 or 2)."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        target = masks[:, None]
        return self.criterion(logits, target.long() if self.classes == 2 else target.float())

    def steps(self, images: int) -> int:
        """Training steps an epoch of ``images`` makes; none is an error, not an untrained network recorded."""
        p = self.params
        full, last = divmod(images, p.batch_size)
        steps = full + (last > 0 and not self.drop_last and last >= self.min_batch)
        if steps == 0:
            raise BenchmarkError(
                f"{self.name}: batch_size {p.batch_size} leaves no training step for {images} training images "
                f"({'the last partial batch is dropped' if self.drop_last else f'batches under {self.min_batch}'}"
                " are skipped); set a smaller batch_size"
            )
        return steps

    def fit(self, train: TrainSet) -> None:
        p, device = self.params, self.context.device
        generator = torch.Generator().manual_seed(self.context.seed)

        def step(batch) -> torch.Tensor | None:
            images, masks = batch.images.to(device), batch.masks.to(device)
            if images.shape[0] < (p.batch_size if self.drop_last else self.min_batch):
                return None
            if p.augment != "none":
                images, masks = AUGMENT[p.augment](images, masks, generator)
            return self.loss(self.model(images), masks)

        config = training.TrainConfig(
            epochs=p.epochs,
            lr=p.lr,
            optimizer=p.optimizer,
            momentum=p.momentum,
            weight_decay=p.weight_decay,
            progress=p.progress,
        )
        self.steps(len(train))
        count = math.ceil(len(train) / p.batch_size)
        self.model.train()
        self.history = training.fit(
            self.model.parameters(),
            step,
            lambda _epoch: training.Counted(train.batches(p.batch_size, generator), count),
            config,
            device,
            desc=f"{self.name} {self.context.dataset.name}",
            lr_at=schedule(p),
        )
        self.model.eval()

    @torch.no_grad()
    def predict(self, batch: ImageBatch) -> Prediction:
        probability = lesion_probability(self.model(batch.images.to(self.context.device)))
        return Prediction(probability.flatten(1).amax(-1), probability)

    def describe(self) -> dict[str, object]:
        return {
            "trainable_params": sum(q.numel() for q in self.model.parameters()),
            "backbone": self.context.backbone.label(),
            "final_train_loss": round(self.history[-1], 6) if self.history else float("nan"),
        }


def smp_encoder(spec: BackboneSpec) -> dict[str, object]:
    """smp's encoder arguments for a timm model: its pretrained weights from the file on disk, or none (random
    init, drawn with the cell's seed)."""
    import timm

    if spec.model not in timm.list_models():
        raise BenchmarkError(f"backbone.model: unknown timm model '{spec.model}'")
    if spec.random_init:
        return {"encoder_name": f"tu-{spec.model}", "encoder_weights": None}
    path = resolve_timm_weights(spec.model, spec.weights)
    name = spec.model if os.path.isfile(spec.weights) else f"{spec.model}.{spec.weights}"
    return {"encoder_name": f"tu-{name}", "encoder_weights": True, "pretrained_cfg_overlay": {"file": path}}


def smp_network(method: type[Segmenter], cls_name: str, spec: BackboneSpec, **kwargs) -> Normalised:
    """An smp network on a timm encoder, normalised with the encoder's mean and std."""
    smp = segmentation_models(method)
    net = getattr(smp, cls_name)(**smp_encoder(spec), in_channels=3, classes=1, **kwargs)
    cfg = net.encoder.model.pretrained_cfg
    return Normalised(net, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))


class UNetImpl(SegmenterImpl, UNet):
    def network(self) -> nn.Module:
        p = self.params
        return smp_network(
            UNet, "Unet", self.context.backbone, encoder_depth=p.encoder_depth, decoder_channels=p.decoder_channels
        )


class UNetPlusPlusImpl(SegmenterImpl, UNetPlusPlus):
    def network(self) -> nn.Module:
        p = self.params
        return smp_network(
            UNetPlusPlus,
            "UnetPlusPlus",
            self.context.backbone,
            encoder_depth=p.encoder_depth,
            decoder_channels=p.decoder_channels,
        )


class DeepLabV3Impl(SegmenterImpl, DeepLabV3):
    min_batch = 2  # its ASPP pools to 1x1 before a batch norm: a batch of one has no statistics to train on

    def network(self) -> nn.Module:
        p = self.params
        return smp_network(
            DeepLabV3,
            "DeepLabV3Plus" if p.plus else "DeepLabV3",
            self.context.backbone,
            encoder_depth=p.encoder_depth,
            decoder_channels=p.decoder_channels,
            **({"encoder_output_stride": p.output_stride} if p.output_stride else {}),
        )

    def describe(self) -> dict[str, object]:
        return {"variant": "DeepLabv3+" if self.params.plus else "DeepLabv3", **super().describe()}


class AttentionUNetImpl(SegmenterImpl, AttentionUNet):
    def network(self) -> nn.Module:
        from monai.networks.nets import AttentionUnet

        p = self.params
        return Normalised(AttentionUnet(2, 3, 1, channels=p.channels, strides=p.strides, dropout=p.dropout))


class SynapseImpl(SegmenterImpl):
    """TransUNet's and Swin-Unet's heads and loss: two output channels (background, lesion), TransUNet's ``DiceLoss``
    (MONAI's squared Dice over the whole batch; Swin-Unet's, run as a black box, gives the same within 9e-8), images in
    [0, 1] without mean/std normalisation."""

    classes = 2
    dice: ClassVar[dict] = {"squared_pred": True, "batch": True}

    @staticmethod
    def unnormalised(net: nn.Module) -> Normalised:
        return Normalised(net, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


class TransUNetImpl(SynapseImpl, TransUNet):
    """TransUNet R50-ViT-B/16 (``methods.models.transunet``), Google's weights in its encoder."""

    def network(self) -> nn.Module:
        p, spec = self.params, self.context.backbone
        if spec.model != "vit_base_r50_s16_224":
            raise BenchmarkError(f"transunet: backbone: its encoder is timm's vit_base_r50_s16_224, got '{spec.model}'")
        size = self.context.image_size
        if size % 16:
            raise BenchmarkError(f"transunet: image_size: a multiple of 16 (its patch grid), got {size}")
        net = TransUNetNet(
            2, size, p.skips, p.dropout, layers=p.layers, depth=p.depth, embed_dim=p.width, heads=p.heads
        )
        if not spec.random_init:
            pretrained, _, _ = timm_model(spec, "cpu", num_classes=0)
            load_encoder(net, pretrained)
        return self.unnormalised(net)


class SwinUnetImpl(SynapseImpl, SwinUnet):
    """Swin-Unet (``methods.models.swin_unet``), Swin-T's weights in its encoder and its decoder's blocks
    (``load_pretrained``)."""

    def network(self) -> nn.Module:
        p, spec = self.params, self.context.backbone
        if spec.model != "swin_tiny_patch4_window7_224":
            raise BenchmarkError(
                f"swin_unet: backbone: its encoder is timm's swin_tiny_patch4_window7_224, got '{spec.model}'"
            )
        net = SwinUnetNet(2, self.context.image_size, 3, p.width, p.depths, p.heads, p.window,
                          drop_path_rate=p.drop_path, encoder_name=spec.model)  # fmt: skip
        if not spec.random_init:
            pretrained, _, _ = timm_model(spec, "cpu", num_classes=0)
            load_pretrained(net, pretrained)
        return self.unnormalised(net)


class RollingUNetImpl(SegmenterImpl, RollingUNet):
    """Rolling-UNet's input as its loader gives it (``normalise: official``): BGR (``cv2.imread``), ImageNet's
    RGB constants (albumentations' ``Normalize``), then divided by 255 once more (its ``dataset.py``), values
    within about +-0.01; ``imagenet``: RGB, normalised once."""

    drop_last = True  # its DataLoader's

    def network(self) -> nn.Module:
        p = self.params
        widths, drop = ROLLING_UNET_VARIANTS[p.variant]
        official = p.normalise == "official"
        net = RollingNet(1, 3, p.widths or widths, drop)
        return Normalised(net, bgr=official, scale=1 / 255 if official else 1.0)


class SwinUNETRImpl(SegmenterImpl, SwinUNETR):
    def network(self) -> nn.Module:
        from monai.networks.nets import SwinUNETR as Net

        p = self.params
        return Normalised(Net(3, 1, depths=p.depths, num_heads=p.heads, feature_size=p.feature_size, spatial_dims=2))
