"""TransUNet (Chen et al., "TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation", 2021),
configuration R50-ViT-B_16 (``n_skip`` 3, patches 16), as its official code computes it (Beckschen/TransUNet,
commit 02ef001, Apache-2.0: ``networks/vit_seg_modeling.py``, ``networks/vit_seg_modeling_resnet_skip.py``,
``networks/vit_seg_configs.py``).

- encoder: timm's ``vit_base_r50_s16_224`` (ResNetV2-R50 with stages (3, 4, 9), non-pre-activation bottlenecks,
  weight-standardised convolutions and GroupNorm, then a 1x1 "patch" projection 1024 -> 768 and 12 ViT-B
  blocks), no class token, with the official code's departures from the Google/JAX model reproduced:
  symmetric convolution padding (timm's default is TF "SAME"), stem max-pool without padding (224 -> 112 -> 55),
  weight-standardisation eps 1e-5, GroupNorm eps 1e-6, and the projection shortcut's GroupNorm with one group
  per channel and eps 1e-5 (``nn.GroupNorm(cout, cout)``; JAX: 32 groups);
- skips: the stem output (1/2, 64 ch) and the outputs of stages 1 and 2 (1/4, 256 ch and 1/8, 512 ch), each
  zero-padded at the bottom/right to ``size // 4`` / ``size // 8`` where the unpadded max-pool left it short
  (55 -> 56 at 224);
- decoder: ``conv_more`` 3x3 768 -> 512, then 4 blocks (x2 bilinear upsampling with ``align_corners=True``,
  concatenated skip, two 3x3 conv + BatchNorm + ReLU) to (256, 128, 64, 16) channels; head: one 3x3 conv with bias.

Under identical random weights its logits agree with the official model's within 7.1e-8 in float32 (README,
fidelity table). Pretrained weights: timm's ``vit_base_r50_s16_224.orig_in21k``, Google's ImageNet-21k R50+ViT-B/16
that the official ``load_from`` reads from ``R50+ViT-B_16.npz`` (``load_encoder``).
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import GroupNormAct, HybridEmbed, StdConv2d
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import VisionTransformer

HIDDEN_SIZE = 768
HEAD_CHANNELS = 512
DECODER_CHANNELS = (256, 128, 64, 16)
SKIP_CHANNELS = (512, 256, 64)  # deepest first: stage 2 (1/8), stage 1 (1/4), stem (1/2)


def build_encoder(
    img_size: int = 224,
    drop_rate: float = 0.1,
    layers: tuple[int, ...] = (3, 4, 9),
    depth: int = 12,
    embed_dim: int = HIDDEN_SIZE,
    heads: int = 12,
) -> VisionTransformer:
    """timm's R50+ViT-B/16 hybrid, made to compute what the official ``Transformer`` module computes.

    Follows ``ResNetV2``/``PreActBottleneck`` (vit_seg_modeling_resnet_skip.py) and ``Embeddings``/``Encoder``
    (vit_seg_modeling.py). ``drop_rate`` is the official ``dropout_rate`` (0.1): after the position embedding and
    twice in every MLP; the attention dropouts are 0.0, the attention output projection's included (the official
    ``proj_dropout`` takes ``attention_dropout_rate``). ``layers``, ``depth``, ``embed_dim`` and ``heads``: R50-ViT-B's
    by default (smaller ones for tests).
    """
    backbone = ResNetV2(
        layers=layers,
        num_classes=0,
        global_pool="",
        preact=False,
        stem_type="",  # plain 7x7/s2 conv, symmetric padding 3
        conv_layer=partial(StdConv2d, eps=1e-5),
        norm_layer=partial(GroupNormAct, num_groups=32, eps=1e-6),
    )
    backbone.stem.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0)
    for stage in backbone.stages:
        for block in stage.blocks:
            if block.downsample is not None:
                channels = block.downsample.norm.num_channels
                block.downsample.norm = GroupNormAct(channels, num_groups=channels, eps=1e-5, apply_act=False)
    vit = timm.create_model(
        "vit_base_r50_s16_224",
        pretrained=False,
        img_size=img_size,
        depth=depth,
        embed_dim=embed_dim,
        num_heads=heads,
        embed_layer=partial(HybridEmbed, backbone=backbone),
        class_token=False,
        global_pool="",
        num_classes=0,
        pos_drop_rate=drop_rate,  # timm's ``drop_rate`` is the (unused) head dropout
        proj_drop_rate=drop_rate,
        attn_drop_rate=0.0,
    )
    for block in vit.blocks:
        block.attn.proj_drop = nn.Identity()
    return vit


def _pad_bottom_right(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero-pad a feature map at the bottom/right to ``height`` x ``width`` (the official ``right_size`` step)."""
    pad_h, pad_w = height - x.shape[-2], width - x.shape[-1]
    if not (0 <= pad_h < 3 and 0 <= pad_w < 3):
        raise ValueError(f"feature map {tuple(x.shape[-2:])} cannot be padded to {(height, width)}")
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


class ConvBNReLU(nn.Sequential):
    """Bias-free convolution, BatchNorm, ReLU; follows ``Conv2dReLU`` in vit_seg_modeling.py."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                bn=nn.BatchNorm2d(out_channels),
                act=nn.ReLU(inplace=True),
            )
        )


class DecoderBlock(nn.Module):
    """x2 bilinear upsampling (corners aligned), optional skip concatenation, two 3x3 ``ConvBNReLU``.

    Follows ``DecoderBlock`` in vit_seg_modeling.py (``nn.UpsamplingBilinear2d`` aligns corners).
    """

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int = 0) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(in_channels + skip_channels, out_channels)
        self.conv2 = ConvBNReLU(out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class DecoderCup(nn.Module):
    """Token grid -> ``conv_more`` (768 -> 512) -> 4 ``DecoderBlock``; follows ``DecoderCup`` in vit_seg_modeling.py.

    The first ``n_skip`` blocks receive the encoder's skips, deepest first.
    """

    def __init__(self, n_skip: int = 3, hidden_size: int = HIDDEN_SIZE) -> None:
        super().__init__()
        if not 0 <= n_skip <= len(SKIP_CHANNELS):
            raise ValueError(f"n_skip must be in [0, {len(SKIP_CHANNELS)}], got {n_skip}")
        self.n_skip = n_skip
        self.conv_more = ConvBNReLU(hidden_size, HEAD_CHANNELS)
        in_channels = (HEAD_CHANNELS, *DECODER_CHANNELS[:-1])
        skip_channels = [SKIP_CHANNELS[i] if i < n_skip else 0 for i in range(len(DECODER_CHANNELS))]
        self.blocks = nn.ModuleList(
            DecoderBlock(c_in, c_out, c_skip)
            for c_in, c_out, c_skip in zip(in_channels, DECODER_CHANNELS, skip_channels, strict=True)
        )

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], skips: list[torch.Tensor]) -> torch.Tensor:
        x = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
        x = self.conv_more(x)
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < self.n_skip else None)
        return x


class SegmentationHead(nn.Module):
    """3x3 convolution (with bias) to class logits, optional bilinear upsampling (corners aligned).

    Follows ``SegmentationHead`` in vit_seg_modeling.py (TransUNet uses ``upsampling`` 1).
    """

    def __init__(self, in_channels: int, num_classes: int, kernel_size: int = 3, upsampling: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, num_classes, kernel_size, padding=kernel_size // 2)
        self.upsampling = upsampling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.upsampling > 1:
            x = F.interpolate(x, scale_factor=self.upsampling, mode="bilinear", align_corners=True)
        return x


class TransUNet(nn.Module):
    """TransUNet R50-ViT-B/16; follows ``VisionTransformer`` in vit_seg_modeling.py.

    ``num_classes`` output logits at the input resolution (the official recipe: softmax over classes, background
    included; for a binary lesion mask, 2 classes and the lesion probability ``softmax(logits)[:, 1]``).
    Single-channel inputs are repeated to 3 channels. Inputs must be ``img_size`` square (fixed position
    embedding), ``img_size`` a multiple of 16.
    """

    def __init__(
        self, num_classes: int = 2, img_size: int = 224, n_skip: int = 3, drop_rate: float = 0.1, **encoder: object
    ) -> None:
        super().__init__()
        self.encoder = build_encoder(img_size, drop_rate, **encoder)
        self.decoder = DecoderCup(n_skip, self.encoder.embed_dim)
        self.head = SegmentationHead(DECODER_CHANNELS[-1], num_classes)

    def forward_encoder(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], list[torch.Tensor]]:
        """Encoder tokens ``[B, N, 768]`` (after the final LayerNorm), their grid, skips deepest first."""
        height, width = x.shape[-2:]
        vit = self.encoder
        feature, (stem, stage1, stage2) = vit.patch_embed.backbone.forward_intermediates(x, indices=[0, 1, 2])
        skips = [
            _pad_bottom_right(stage2, height // 8, width // 8),
            _pad_bottom_right(stage1, height // 4, width // 4),
            stem,
        ]
        feature = vit.patch_embed.proj(feature)
        grid = (feature.shape[-2], feature.shape[-1])
        tokens = vit.pos_drop(feature.flatten(2).transpose(1, 2) + vit.pos_embed)
        tokens = vit.norm(vit.blocks(vit.norm_pre(vit.patch_drop(tokens))))
        return tokens, grid, skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        tokens, grid, skips = self.forward_encoder(x)
        return self.head(self.decoder(tokens, grid, skips))


def resize_pos_embed(posemb: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """A square grid of position embeddings ``[1, N, C]`` resized to ``num_tokens`` (bilinear, corners aligned: the
    official ``load_from``'s ``scipy.ndimage.zoom(order=1)`` within 5e-8)."""
    if posemb.shape[1] == num_tokens:
        return posemb
    old, new = round(posemb.shape[1] ** 0.5), round(num_tokens**0.5)
    grid = posemb.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bilinear", align_corners=True)
    return grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)


@torch.no_grad()
def load_encoder(model: TransUNet, pretrained: VisionTransformer) -> None:
    """The encoder's weights from timm's R50+ViT-B/16 (``vit_base_r50_s16_224`` with its weights loaded): all but the
    class token and the head, the class token's position embedding dropped and the grid resized to the model's, as
    the official ``load_from`` reads the npz."""
    state = {k: v for k, v in pretrained.state_dict().items() if k != "cls_token" and not k.startswith("head")}
    posemb = state["pos_embed"][:, pretrained.num_prefix_tokens :]
    state["pos_embed"] = resize_pos_embed(posemb, model.encoder.pos_embed.shape[1])
    model.encoder.load_state_dict(state)
