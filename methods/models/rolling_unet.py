"""Rolling-UNet: a U-Net whose fourth stage and bottleneck mix convolutions with rolling MLPs.

Reference: Y. Liu, H. Zhu, M. Liu, H. Yu, Z. Chen, J. Gao, "Rolling-Unet: Revitalizing MLP's Ability to Efficiently
Extract Long-Distance Dependencies for Medical Image Segmentation", AAAI 2024, doi:10.1609/aaai.v38i4.28173.

This is an independent re-implementation. It reproduces the computation of the authors' code
(github.com/Jiaoyang45/Rolling-Unet, ``archs.py`` at commit 8a43d40; MIT License, Copyright (c) 2024 Jiaoyang45):
under identical weights its outputs agree within 2.4e-7 in float32 (README, fidelity table).

Paper vocabulary -> classes here:

* R-MLP (rolling MLP): every channel ``c`` is cyclically shifted by ``c`` pixels along one axis, then a per-pixel
  linear layer mixes channels, so one output pixel sees a whole line of the image -> :func:`roll_channels`.
* OR-MLP (orthogonal R-MLP): two R-MLPs along orthogonal axes, GELU in between -> :class:`OrthogonalRollingMLP`.
* DOR-MLP (double OR-MLP): two OR-MLPs with different rolling directions, each with a skip, LayerNorm and a
  fusing linear layer -> :class:`DoubleOrthogonalRollingMLP`.
* Lo2 block (long-local): DOR-MLP in parallel with a depthwise-separable convolution (DSC), concatenated and
  channel-mixed -> :class:`Lo2Block`.
* Feature Incentive block: 3x3 convolution, GELU, LayerNorm -> :class:`FeatureIncentive`.

Widths of the three variants the paper reports (Rolling-Unet S/M/L; the official ``train.py`` defaults to S with
256x256 inputs): S (16, 32, 64, 128, 256), M (32, ..., 512), L (64, ..., 1024). The model returns logits; the
official recipe applies a sigmoid and a 0.5 threshold outside the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

# variant -> (encoder widths, dropout added inside the bottleneck Lo2 block); official archs.py L231/L262 (S),
# L339/L370 (M), L447/L478 (L).
ROLLING_UNET_VARIANTS: dict[str, tuple[tuple[int, int, int, int, int], float]] = {
    "S": ((16, 32, 64, 128, 256), 0.1),
    "M": ((32, 64, 128, 256, 512), 0.2),
    "L": ((64, 128, 256, 512, 1024), 0.3),
}


def roll_channels(x: torch.Tensor, axis: int, sign: int) -> torch.Tensor:
    """Cyclically shift channel ``c`` of a channel-last map by ``sign * c`` positions along ``axis``.

    ``x`` is ``(B, H, W, C)`` and ``axis`` is 1 (height) or 2 (width). The result equals applying
    ``torch.roll(x[..., c], sign * c, axis)`` to every channel (the rolling operation of the R-MLP), done as a single
    gather instead of ``C`` separate rolls.
    """
    length, channels = x.shape[axis], x.shape[-1]
    position = torch.arange(length, device=x.device).unsqueeze(1)
    shift = sign * torch.arange(channels, device=x.device).unsqueeze(0)
    source = torch.remainder(position - shift, length)  # (length, C): out[p] = in[(p - shift) mod length]
    shape = [1, 1, 1, channels]
    shape[axis] = length
    return torch.gather(x, axis, source.view(shape).expand_as(x))


def _init_mlp_style(module: nn.Module) -> None:
    """Initialisation used for the MLP parts (as in UNeXt / the official Lo2 code).

    Linear: truncated normal (std 0.02), zero bias; LayerNorm: ones / zeros; Conv2d: normal with std
    ``sqrt(2 / fan_out)`` (fan_out = k*k*out_channels / groups), zero bias.
    """
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class OrthogonalRollingMLP(nn.Module):
    """OR-MLP: R-MLP along ``first_axis`` -> GELU -> R-MLP along the orthogonal axis.

    Each R-MLP rolls the channels (:func:`roll_channels`) and applies a channel-mixing linear layer. Dropout follows
    the GELU and the second linear layer, as in the official ``Lo2.forward`` (archs.py L56-72, L75-91).
    """

    def __init__(self, dim: int, first_axis: int, first_sign: int, second_sign: int, drop: float = 0.0) -> None:
        super().__init__()
        self.first_axis = first_axis
        self.second_axis = 3 - first_axis
        self.first_sign = first_sign
        self.second_sign = second_sign
        self.mix1 = nn.Linear(dim, dim)
        self.mix2 = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a ``(B, H, W, C)`` tensor to the same shape."""
        x = self.drop(self.act(self.mix1(roll_channels(x, self.first_axis, self.first_sign))))
        return self.drop(self.mix2(roll_channels(x, self.second_axis, self.second_sign)))


class DoubleOrthogonalRollingMLP(nn.Module):
    """DOR-MLP: two OR-MLPs in parallel, each plus the input, concatenated, LayerNorm, linear fuse, plus the input.

    Branch A rolls along height (+c) then width (+c); branch B rolls along width (-c) then height (+c)
    (official archs.py L54-99).
    """

    def __init__(self, dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.branch_a = OrthogonalRollingMLP(dim, first_axis=1, first_sign=1, second_sign=1, drop=drop)
        self.branch_b = OrthogonalRollingMLP(dim, first_axis=2, first_sign=-1, second_sign=1, drop=drop)
        self.norm = nn.LayerNorm(2 * dim)
        self.fuse = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a ``(B, H, W, C)`` tensor to the same shape."""
        a = self.branch_a(x) + x
        b = self.branch_b(x) + x
        return self.drop(self.fuse(self.norm(torch.cat([a, b], dim=-1)))) + x


class Lo2Block(nn.Module):
    """Lo2 (long-local) block: [DOR-MLP || DSC] -> concat -> channel-mixing linear (official ``Lo2``/``Lo2Block``).

    The DSC branch is depthwise 3x3 conv -> pointwise 1x1 conv -> ReLU -> BatchNorm. The block has no outer residual
    or pre-norm: the official ``Lo2Block.forward`` returns ``drop_path(Lo2(x))`` and its ``norm2`` is never used, so
    it is left out here (:func:`convert_official_state_dict` drops its weights).
    """

    def __init__(self, dim: int, drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.long_range = DoubleOrthogonalRollingMLP(dim, drop=drop)
        self.dw_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.pw_conv = nn.Conv2d(dim, dim, 1)
        self.local_norm = nn.BatchNorm2d(dim)
        self.channel_mix = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.apply(_init_mlp_style)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a channel-last ``(B, H, W, C)`` tensor to the same shape."""
        long_range = self.long_range(x)
        local = F.relu(self.pw_conv(self.dw_conv(x.permute(0, 3, 1, 2))))
        local = self.local_norm(local).permute(0, 2, 3, 1)
        out = self.drop(self.channel_mix(torch.cat([long_range, local], dim=-1)))
        return self.drop_path(out)


class FeatureIncentive(nn.Module):
    """Feature Incentive block: 3x3 conv (stride 1) -> GELU -> LayerNorm; returns a channel-last map.

    Official ``Feature_Incentive_Block`` (archs.py L157-194); its ``img_size``/``patch_size`` bookkeeping is unused.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm = nn.LayerNorm(out_channels)
        self.apply(_init_mlp_style)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C_in, H, W)`` to ``(B, H, W, C_out)``."""
        return self.norm(F.gelu(self.proj(x).permute(0, 2, 3, 1)))


class ConvBlock(nn.Sequential):
    """Two (3x3 conv -> BatchNorm -> ReLU) layers: ``in -> mid -> out`` channels.

    Encoder blocks use ``mid = out`` (official ``DoubleConv``); decoder blocks use ``mid = in`` (``D_DoubleConv``).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, mid_channels, 3, padding=1),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def _up2(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 upsampling (``align_corners=False``), as in the official decoder."""
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class RollingUNet(nn.Module):
    """Rolling-UNet for 2D segmentation; returns logits of shape ``(B, num_classes, H, W)``.

    Layout (paper's network-architecture figure; official ``Rolling_Unet_*``, archs.py L229-334): three
    convolutional encoder stages (``ConvBlock`` + 2x2 max-pool), stage 4 = Feature Incentive + Lo2 + LayerNorm,
    a bottleneck of the same kind after another max-pool followed by a Feature Incentive block back to
    ``widths[3]``, then a mirrored decoder that adds (not concatenates) the skip features and upsamples
    bilinearly. ``H`` and ``W`` must be multiples of 16.

    Args:
        num_classes: output channels (logits).
        in_channels: input image channels.
        widths: five channel widths (three conv stages, stage 4, bottleneck).
        bottleneck_drop: dropout inside the bottleneck Lo2 block (0.1 / 0.2 / 0.3 for S / M / L).
        drop_rate: dropout inside the stage-4 Lo2 blocks (bottleneck gets ``drop_rate + bottleneck_drop``).
        drop_path_rate: stochastic depth; like the official code, ``linspace(0, rate, 3)`` gives both stage-4
            blocks the first value and the bottleneck the second.
    """

    def __init__(
        self,
        num_classes: int = 1,
        in_channels: int = 3,
        widths: Sequence[int] = ROLLING_UNET_VARIANTS["S"][0],
        bottleneck_drop: float = ROLLING_UNET_VARIANTS["S"][1],
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(widths) != 5:
            raise ValueError(f"widths must have 5 entries, got {widths}")
        w0, w1, w2, w3, w4 = widths
        dpr = torch.linspace(0, drop_path_rate, 3).tolist()

        self.enc1 = ConvBlock(in_channels, w0, w0)
        self.enc2 = ConvBlock(w0, w1, w1)
        self.enc3 = ConvBlock(w1, w2, w2)
        self.pool = nn.MaxPool2d(2)

        self.enc4_embed = FeatureIncentive(w2, w3)
        self.enc4_block = Lo2Block(w3, drop=drop_rate, drop_path=dpr[0])
        self.enc4_norm = nn.LayerNorm(w3)

        self.mid_embed = FeatureIncentive(w3, w4)
        self.mid_block = Lo2Block(w4, drop=drop_rate + bottleneck_drop, drop_path=dpr[1])
        self.mid_norm = nn.LayerNorm(w4)
        self.mid_out = FeatureIncentive(w4, w3)

        self.dec4_block = Lo2Block(w3, drop=drop_rate, drop_path=dpr[0])
        self.dec4_norm = nn.LayerNorm(w3)
        self.dec4_conv = nn.Conv2d(w3, w2, 3, padding=1)
        self.dec4_bn = nn.BatchNorm2d(w2)

        self.dec3 = ConvBlock(w2, w2, w1)
        self.dec2 = ConvBlock(w1, w1, w0)
        self.dec1 = ConvBlock(w0, w0, w0 // 2)
        self.head = nn.Conv2d(w0 // 2, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return segmentation logits for ``x`` of shape ``(B, in_channels, H, W)``."""
        skip1 = self.enc1(x)
        skip2 = self.enc2(self.pool(skip1))
        skip3 = self.enc3(self.pool(skip2))

        out = self.enc4_norm(self.enc4_block(self.enc4_embed(self.pool(skip3))))  # channel-last, H/8
        skip4 = out.permute(0, 3, 1, 2)

        out = self.mid_norm(self.mid_block(self.mid_embed(self.pool(skip4))))  # channel-last, H/16
        out = self.mid_out(out.permute(0, 3, 1, 2)).permute(0, 3, 1, 2)
        out = _up2(out) + skip4

        out = self.dec4_norm(self.dec4_block(out.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        out = _up2(F.relu(self.dec4_bn(self.dec4_conv(out)))) + skip3
        out = _up2(self.dec3(out)) + skip2
        out = _up2(self.dec2(out)) + skip1
        return self.head(self.dec1(out))


def rolling_unet(variant: str = "S", num_classes: int = 1, in_channels: int = 3, **kwargs: float) -> RollingUNet:
    """Build Rolling-UNet ``"S"``, ``"M"`` or ``"L"`` (official ``Rolling_Unet_S/M/L``; S is the train.py default)."""
    widths, bottleneck_drop = ROLLING_UNET_VARIANTS[variant.upper()]
    return RollingUNet(num_classes, in_channels, widths, bottleneck_drop, **kwargs)
