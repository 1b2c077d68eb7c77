"""Anomaly-map post-processing and attribution shared by several methods.

- ``gaussian``: ``scipy.ndimage.gaussian_filter`` over each map (reflect border, truncated at 4 sigma), as the
  official codes of AdaCLIP, AnomalyCLIP and SimpleNet and the gradient maps of DevNet (DRA's) and MKD call it;
- ``opening``: MKD's grey opening (Salehi et al., CVPR 2021, Eq. 6) with OpenCV's 3 x 3 ellipse, the cross;
- ``input_gradients``: ``sum_c |d score / d x_c|`` per pixel, the vanilla-gradient attribution of an image
  score (MKD Eq. 5; the map DRA's authors point to for localisation, DevNet's ``localization.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.ndimage import gaussian_filter, grey_opening

CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)  # cv2.getStructuringElement(MORPH_ELLIPSE, (3, 3))


def _per_map(maps: torch.Tensor, fn: Callable[[np.ndarray], np.ndarray]) -> torch.Tensor:
    out = np.stack([fn(m) for m in maps.detach().float().cpu().numpy()]) if len(maps) else maps.cpu().numpy()
    return torch.from_numpy(np.ascontiguousarray(out)).to(maps.device)


def gaussian(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Each ``[H, W]`` map of ``[B, H, W]`` blurred with standard deviation ``sigma`` pixels (0: unchanged)."""
    if sigma <= 0:
        return maps
    return _per_map(maps, lambda m: gaussian_filter(m, sigma=sigma))


def opening(maps: torch.Tensor, footprint: np.ndarray = CROSS) -> torch.Tensor:
    """Grey opening (erosion, then dilation) of each map: ``(M - B) + B`` of MKD's Eq. 6."""
    return _per_map(maps, lambda m: grey_opening(m, footprint=footprint))


def input_gradients(
    score: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores ``score(images) [B]`` and ``[B, H, W]`` maps: the absolute gradient of each image's score with
    respect to its pixels, summed over the colour channels, from the same forward pass. The scores of a batch
    must not depend on one another (models in evaluation mode), so the gradient of their sum is each image's own."""
    with torch.enable_grad():
        x = images.detach().clone().requires_grad_(True)
        # the model gets a view, not the leaf itself: module hooks on a leaf (torch's FLOP counter installs them)
        # fail under autograd.grad
        scores = score(x.view_as(x))
        (grad,) = torch.autograd.grad(scores.sum(), x)
    return scores.detach(), grad.abs().sum(1)
