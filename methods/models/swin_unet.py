"""Swin-Unet (Cao et al., "Swin-Unet: Unet-like Pure Transformer for Medical Image Segmentation", arXiv 2105.05537).

Provenance: the official repository (github.com/HuCaoFighting/Swin-Unet) carries no licence, so none of its code
was read or copied. The architecture follows the paper (Sec. 3.1-3.6); details the paper leaves open (channel order
of the patch-expanding rearrangement, which encoder tensor feeds each skip, decoder depths, load-from-pretrained
behaviour) were established by *running* the official code as a black box (state-dict names/shapes, forward hooks,
synthetic checkpoints) and matched numerically: under identical random weights its outputs equal the official
model's (0.0 in float32; README, fidelity table). Official class names are cited only to say which part is which.

Layout: the encoder is timm's ``SwinTransformer`` (``swin_tiny_patch4_window7_224`` family; NHWC tensors, patch
merging at the *start* of stages 1..3). Decoder stages reuse timm's ``SwinTransformerStage`` (no downsampling).
Everything else (patch expanding, skip fusion, final x4 expansion, head) is defined here.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
from timm.layers import calculate_drop_path_rates, trunc_normal_
from timm.models.swin_transformer import SwinTransformerStage
from torch import nn


class PatchExpand(nn.Module):
    """2x up-sampling by a linear expansion followed by a depth-to-space rearrangement (paper Sec. 3.5).

    Follows the official ``PatchExpand`` (networks/swin_transformer_unet_skip_expand_decoder_sys.py): a bias-free
    ``Linear(C, 2C)``, channel groups laid out as ``(row offset, column offset, channel)`` are moved to a 2x2 spatial
    block, then ``LayerNorm(C/2)``. Input and output are NHWC: ``[B, H, W, C] -> [B, 2H, 2W, C/2]``.
    """

    def __init__(self, dim: int, norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.dim = dim
        self.expand = nn.Linear(dim, 2 * dim, bias=False)
        self.norm = norm_layer(dim // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        x = self.expand(x)
        c = x.shape[-1] // 4
        x = x.view(b, h, w, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c)
        return self.norm(x)


class FinalPatchExpandX4(nn.Module):
    """Final 4x up-sampling back to input resolution, keeping C channels (paper Sec. 3.5, last patch expanding).

    Follows the official ``FinalPatchExpand_X4``: bias-free ``Linear(C, 16C)``, channel groups laid out as
    ``(row offset, column offset, channel)`` moved to a 4x4 spatial block, then ``LayerNorm(C)``.
    NHWC: ``[B, H, W, C] -> [B, 4H, 4W, C]``.
    """

    def __init__(self, dim: int, scale: int = 4, norm_layer: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.dim = dim
        self.scale = scale
        self.expand = nn.Linear(dim, scale * scale * dim, bias=False)
        self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        s = self.scale
        x = self.expand(x)
        x = x.view(b, h, w, s, s, self.dim).permute(0, 1, 3, 2, 4, 5).reshape(b, s * h, s * w, self.dim)
        return self.norm(x)


class SkipFusion(nn.Module):
    """Skip connection: concatenate ``[decoder, encoder]`` features and project 2C -> C (paper Sec. 3.6).

    Follows the official ``concat_back_dim`` linear layers (with bias). The decoder tensor comes first.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([x, skip], dim=-1))


class SwinUnetDecoderStage(nn.Module):
    """One decoder level: skip fusion -> Swin blocks (timm ``SwinTransformerStage``) -> optional ``PatchExpand``.

    Corresponds to official ``concat_back_dim[i]`` + ``layers_up[i]`` (``BasicLayer_up``) for i = 1..3.
    """

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        drop_path: Sequence[float],
        upsample: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.fuse = SkipFusion(dim)
        self.stage = SwinTransformerStage(
            dim=dim,
            out_dim=dim,
            input_resolution=resolution,
            depth=depth,
            downsample=False,
            num_heads=num_heads,
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_drop=proj_drop,
            attn_drop=attn_drop,
            drop_path=list(drop_path),
            norm_layer=norm_layer,
        )
        self.upsample = PatchExpand(dim, norm_layer) if upsample else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.stage(self.fuse(x, skip)))


class SwinUnet(nn.Module):
    """Swin-Unet: timm Swin encoder, symmetric Swin decoder with patch expanding, 4x final expansion, 1x1 head.

    Data flow (matches the official ``SwinTransformerSys``; paper Fig. 1):

    * ``patch_embed`` (4x4 conv + LayerNorm) -> ``skips[0]`` (H/4, C);
    * encoder stage i (i = 1..3) first merges patches; the merged tensor *before* stage i's Swin blocks is
      ``skips[i]`` (so the skip at H/8 and H/16 bypasses that level's encoder blocks, as in the official code);
    * bottleneck = encoder stage 3 blocks at H/32 + ``LayerNorm(8C)``; ``bottleneck_expand`` to H/16, 4C;
    * decoder stages at H/16, H/8, H/4 fuse ``skips[2]``, ``skips[1]``, ``skips[0]``; their depths mirror the
      encoder depths (official ``DECODER_DEPTHS`` in the yaml is ignored by the official code);
    * ``norm_up`` -> ``final_expand`` (x4) -> bias-free 1x1 conv head.

    A single-channel input is repeated to three channels (official ``SwinUnet.forward`` does the same).
    """

    def __init__(
        self,
        num_classes: int = 9,
        img_size: int = 224,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        fused_attn: bool = False,
        encoder_name: str = "swin_tiny_patch4_window7_224",
    ) -> None:
        super().__init__()
        if len(depths) != 4 or len(num_heads) != 4:
            raise ValueError("Swin-Unet expects four stages")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.depths = tuple(depths)
        self.encoder = timm.create_model(
            encoder_name,
            pretrained=False,
            num_classes=0,
            img_size=img_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
        )
        # official model has a dropout after the patch embedding (``pos_drop``); timm folds drop_rate into the head
        self.pos_drop = nn.Dropout(drop_rate)

        dims = [embed_dim * 2**i for i in range(4)]
        grid = img_size // 4
        res = [(grid // 2**i, grid // 2**i) for i in range(4)]
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)

        self.bottleneck_expand = PatchExpand(dims[3])
        self.decoder = nn.ModuleList(
            SwinUnetDecoderStage(
                dim=dims[lvl],
                resolution=res[lvl],
                depth=depths[lvl],
                num_heads=num_heads[lvl],
                window_size=window_size,
                drop_path=dpr[lvl],  # decoder level reuses the drop-path rates of the encoder level it mirrors
                upsample=lvl > 0,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=drop_rate,
                attn_drop=attn_drop_rate,
            )
            for lvl in (2, 1, 0)
        )
        self.norm_up = nn.LayerNorm(embed_dim)
        self.final_expand = FinalPatchExpandX4(embed_dim)
        self.head = nn.Conv2d(embed_dim, num_classes, kernel_size=1, bias=False)

        for name, module in self.named_children():
            if name != "encoder":
                module.apply(_init_vit_style)
        self.set_fused_attn(fused_attn)

    def set_fused_attn(self, enable: bool) -> None:
        """Use ``F.scaled_dot_product_attention`` in every window attention (default off: bit-closer to official)."""
        for m in self.modules():
            if hasattr(m, "fused_attn") and hasattr(m, "relative_position_bias_table"):
                m.fused_attn = enable

    def forward_encoder(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return the normalised bottleneck (NHWC, H/32) and the four skip tensors (NHWC, H/4 .. H/32)."""
        if x.shape[1] == 1 and self.in_chans == 3:
            x = x.repeat(1, 3, 1, 1)
        x = self.pos_drop(self.encoder.patch_embed(x))
        skips = []
        for stage in self.encoder.layers:
            x = stage.downsample(x)
            skips.append(x)
            x = stage.blocks(x)
        return self.encoder.norm(x), skips

    def forward_decoder(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decode to per-pixel features (NHWC, full resolution, C channels)."""
        x = self.bottleneck_expand(x)
        for stage, skip in zip(self.decoder, (skips[2], skips[1], skips[0]), strict=True):
            x = stage(x, skip)
        return self.final_expand(self.norm_up(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3 or 1, H, W] -> logits [B, num_classes, H, W]``."""
        bottleneck, skips = self.forward_encoder(x)
        feats = self.forward_decoder(bottleneck, skips)
        return self.head(feats.permute(0, 3, 1, 2))


def _init_vit_style(m: nn.Module) -> None:
    """Truncated-normal(0.02) linear weights, zero biases, unit LayerNorm (the Swin / official initialisation)."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


@torch.no_grad()
def load_pretrained(model: SwinUnet, swin: nn.Module) -> None:
    """The official ``load_from`` on ImageNet Swin weights (timm's ``swin_tiny_patch4_window7_224`` with its weights
    loaded): the encoder takes every tensor it has a place for (Swin-T's third-stage blocks beyond the model's
    depth and the classifier are left out), and each decoder level's Swin blocks take the encoder blocks of the
    same resolution, block j from block j; patch expanding, skip fusion, ``norm_up``, the final expansion and
    the head keep their initialisation."""
    ours = model.encoder.state_dict()
    given = {k: v for k, v in swin.state_dict().items() if k in ours and v.shape == ours[k].shape}
    model.encoder.load_state_dict(given, strict=False)
    missing = sorted(set(ours) - set(given))
    if missing:
        raise ValueError(f"the Swin weights have no '{missing[0]}' of this encoder's")
    for level, stage in zip((2, 1, 0), model.decoder, strict=True):
        for block, source in zip(stage.stage.blocks, model.encoder.layers[level].blocks, strict=True):
            block.load_state_dict(source.state_dict())
