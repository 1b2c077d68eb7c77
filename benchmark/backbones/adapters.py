"""Adapters inserted between the blocks of a frozen ViT (MVFA Eq. 1-2; reused by MedSAD-CLIP Eq. 2-3).

``BottleneckAdapter`` is two bias-free linear layers, ``c -> bottleneck -> c``, with an activation after
each (official MVFA: LeakyReLU after both; the paper's Eq. 1: ReLU after the first, none after the second).
It returns the bottleneck features (the ones compared with text) and the reconstruction (the one mixed
back into the residual stream). ``DualAdapters`` holds a seg and a det adapter at each chosen layer and
gives ``ClipBackbone.run_blocks`` the hook that mixes them in:

    x <- (1 - 2 gamma) x + gamma seg(x) + gamma det(x)        (gamma = 0.1: official 0.8 / 0.1 / 0.1)

recording each level's seg and det bottleneck features for the losses and the scores.

``ResidualAdapter`` is AA-CLIP's (``model/adapter.py``): one bias-free linear layer and LeakyReLU, its output
rescaled to each token's norm and mixed in as ``x <- w a + (1 - w) x`` (w = 0.1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class BottleneckAdapter(nn.Module):
    """``c -> bottleneck -> c``; ``norm`` puts a LayerNorm after each linear layer (MedSAD-CLIP Eq. 2)."""

    def __init__(self, width: int, bottleneck: int, activation: str = "leaky_relu", norm: bool = False) -> None:
        super().__init__()
        self.down = nn.Linear(width, bottleneck, bias=False)
        self.up = nn.Linear(bottleneck, width, bias=False)
        self.norm_down = nn.LayerNorm(bottleneck) if norm else nn.Identity()
        self.norm_up = nn.LayerNorm(width) if norm else nn.Identity()
        if activation == "leaky_relu":
            self.act_down, self.act_up = nn.LeakyReLU(), nn.LeakyReLU()
        elif activation == "relu":
            self.act_down, self.act_up = nn.ReLU(), nn.Identity()
        else:
            raise ValueError(f"unknown adapter activation '{activation}' (leaky_relu, relu)")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.act_down(self.norm_down(self.down(x)))
        return hidden, self.act_up(self.norm_up(self.up(hidden)))


class DualAdapters(nn.Module):
    """A seg and a det adapter at each of ``layers`` (1-based), mixed into the residual stream."""

    def __init__(
        self,
        layers: Sequence[int],
        width: int,
        bottleneck: int,
        gamma: float = 0.1,
        activation: str = "leaky_relu",
        norm: bool = False,
    ) -> None:
        super().__init__()
        self.layers = tuple(layers)
        self.gamma = gamma
        self.seg = nn.ModuleList(BottleneckAdapter(width, bottleneck, activation, norm) for _ in self.layers)
        self.det = nn.ModuleList(BottleneckAdapter(width, bottleneck, activation, norm) for _ in self.layers)
        self.seg_features: list[torch.Tensor] = []
        self.det_features: list[torch.Tensor] = []

    def hooks(self) -> dict[int, Callable[[torch.Tensor], torch.Tensor]]:
        """Fresh hooks for one forward pass; features land in ``seg_features`` / ``det_features``."""
        self.seg_features, self.det_features = [], []

        def make(i: int):
            def hook(x: torch.Tensor) -> torch.Tensor:
                seg_hidden, seg_out = self.seg[i](x)
                det_hidden, det_out = self.det[i](x)
                self.seg_features.append(seg_hidden)
                self.det_features.append(det_hidden)
                return (1 - 2 * self.gamma) * x + self.gamma * seg_out + self.gamma * det_out

            return hook

        return {layer: make(i) for i, layer in enumerate(self.layers)}


class ResidualAdapter(nn.Module):
    """``a = LeakyReLU(W x)``, ``a <- a |x| / |a|`` per token, ``w a + (1 - w) x`` (AA-CLIP; Xavier-uniform ``W``).
    The module names (``fc.0``) are its official checkpoints'."""

    def __init__(self, width: int, weight: float = 0.1) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(width, width, bias=False), nn.LeakyReLU())
        nn.init.xavier_uniform_(self.fc[0].weight)
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.fc(x)
        a = a * x.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True)
        return self.weight * a + (1 - self.weight) * x
