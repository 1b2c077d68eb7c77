"""A figure of a few test images with their masks and anomaly maps."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import torch


def samples_figure(
    samples: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, float]], title: str, out: Path | BinaryIO
) -> Path | BinaryIO:
    """Rows of (image, mask, map); ``samples`` holds (name, image [3,H,W], mask [H,W], map [H,W], score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(len(samples), 1)
    # one colour scale for all maps of the figure, so that images compare; the range is printed
    lo = min((float(s[3].min()) for s in samples), default=0.0)
    hi = max((float(s[3].max()) for s in samples), default=1.0)
    hi = hi if hi > lo else lo + 1e-6
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows), squeeze=False)
    for row, (name, image, mask, amap, score) in enumerate(samples):
        panels = (image.permute(1, 2, 0).numpy(), mask.float().numpy(), amap.numpy())
        labels = (name, "mask", f"map, score {score:.3f} (colours {lo:.2f}-{hi:.2f})")
        for col, (ax, panel, label) in enumerate(zip(axes[row], panels, labels, strict=True)):
            scale = (lo, hi) if col == 2 else (0, 1)
            ax.imshow(panel, cmap=(None, "gray", "jet")[col], vmin=scale[0], vmax=scale[1])
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    if isinstance(out, Path):
        out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, format="png")
    plt.close(fig)
    return out
