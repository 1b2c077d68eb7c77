"""Segmentation losses shared by the CLIP methods trained on pixel masks (April-GAN's ``loss.py``, copied by
MVFA-AD and AnomalyCLIP; MedSAD-CLIP Eq. 15-16)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss on class probabilities ``[B, C, H, W]`` against integer targets ``[B, H, W]`` (Lin et al.;
    label smoothing ``smooth`` as the official ``loss.FocalLoss``)."""
    classes = probs.shape[1]
    one_hot = F.one_hot(target.long(), classes).permute(0, 3, 1, 2).to(probs.dtype)
    one_hot = one_hot.clamp(smooth / (classes - 1), 1.0 - smooth)
    pt = (one_hot * probs).sum(1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - mean_b (2 |P T| + 1) / (|P| + |T| + 1)`` over the batch (official ``BinaryDiceLoss``)."""
    p, t = probs.flatten(1), target.flatten(1).to(probs.dtype)
    return 1 - ((2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()
