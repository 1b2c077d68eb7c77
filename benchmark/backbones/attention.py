"""A frozen ViT block's self-attention recomputed with another similarity, for any method.

``block_attention(block, x, pairs)`` recomputes the multi-head attention of an open_clip
``ResidualAttentionBlock`` from its own weights (``in_proj``, ``out_proj``), the attention weights built from
any two of its projections: ``("q", "k")`` is the block's own attention; ``("v", "v")`` the diagonally
prominent V-V attention of AnomalyCLIP's DPAM; ``("q", "q")`` and ``("k", "k")`` its other variants.

``value_attention_block(across_batch)`` runs a whole block with V-V attention in place of its own, FFN kept (AA-CLIP's
"surgery" CLIP of its first stage).

``block_values(block, x)`` is the block's value path, ``W_o W_v ln_1(x)`` (attention to oneself only: the
dense features of MedCLIPSeg's and MaskCLIP's last block).

``DualPathAttention`` is DPAM (Zhou et al., AnomalyCLIP, ICLR 2024, Sec. 3.3; official
``AnomalyCLIP_lib/AnomalyCLIP.py``): from its first block on, two streams run side by side. The original
stream is CLIP's forward; at each DPAM block the other stream adds the V-V attention of the *original*
stream's normalised tokens and skips the FFN::

    o_l = o_{l-1} + A_qk(ln_1(o_{l-1}));  o_l <- o_l + mlp(ln_2(o_l))
    x_l = x_{l-1} + A_vv(ln_1(o_{l-1}))                  (x = o before the first DPAM block)

``ClipBackbone.run_blocks(..., overrides=dpam.overrides(layers))`` returns and records the V-V stream ``x``;
the original stream's last tokens stay in ``dpam.original``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def block_attention(
    block: nn.Module, x: torch.Tensor, pairs: Sequence[tuple[str, str]] = (("q", "k"),)
) -> list[torch.Tensor]:
    """The block's attention output ``[B, N, C]`` (after ``out_proj``) of normalised tokens ``x`` for each
    (query, key) pair of projections; the values are always ``v``."""
    attn = block.attn
    batch, tokens, width = x.shape
    heads = attn.num_heads
    qkv = nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    parts = {"q": q, "k": k, "v": v}
    scale = (width // heads) ** -0.5
    outputs = []
    for query, key in pairs:
        weights = ((parts[query] @ parts[key].transpose(-2, -1)) * scale).softmax(-1)
        outputs.append(attn.out_proj((weights @ v).transpose(1, 2).reshape(batch, tokens, width)))
    return outputs


def block_values(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``out_proj(v_proj(ln_1(x)))`` of a block's input tokens ``x`` ``[B, N, C]``."""
    attn = block.attn
    width = x.shape[-1]
    values = nn.functional.linear(block.ln_1(x), attn.in_proj_weight[-width:], attn.in_proj_bias[-width:])
    return attn.out_proj(values)


def value_attention_block(across_batch: bool = False) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """A block override: ``x + A_vv(ln_1(x))``, then the block's FFN (AA-CLIP's ``DAPM_replace``, one stream).

    ``across_batch`` reproduces AA-CLIP's official attention, which reads a sequence-first ``[N, B, C]`` tensor as
    ``[B, N, C]``: each token position attends over the images of the batch (so a token's output depends on the
    other images); otherwise each image attends over its own tokens."""

    def run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        h = block.ln_1(x)
        (attended,) = block_attention(block, h.transpose(0, 1) if across_batch else h, (("v", "v"),))
        x = x + block.ls_1(attended.transpose(0, 1) if across_batch else attended)
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    return run


class DualPathAttention:
    """DPAM as block overrides: the V-V stream is what the blocks return; ``original`` the CLIP stream."""

    def __init__(self, pair: tuple[str, str] = ("v", "v")) -> None:
        self.pair = pair
        self.original: torch.Tensor | None = None

    def overrides(self, layers: Sequence[int]) -> dict[int, object]:
        """Fresh overrides for one forward pass through the consecutive blocks ``layers`` (1-based)."""
        layers = sorted(layers)
        if layers != list(range(layers[0], layers[0] + len(layers))):
            raise ValueError(f"DPAM blocks must be consecutive, got {layers}")
        self.original = None

        def run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
            original = x if self.original is None else self.original
            special, plain = block_attention(block, block.ln_1(original), (self.pair, ("q", "k")))
            original = original + block.ls_1(plain)
            self.original = original + block.ls_2(block.mlp(block.ln_2(original)))
            return x + block.ls_1(special)

        return dict.fromkeys(layers, run)
