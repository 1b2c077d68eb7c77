"""Training augmentations of image-and-mask pairs, drawn from the method's own seeded generator: the image and its
mask always move together, masks resampled by nearest neighbour."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF


def rotate(image: torch.Tensor, mask: torch.Tensor, angle: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``image [C,H,W]`` and ``mask [H,W]`` rotated by ``angle`` degrees about the centre, nearest neighbour, zero
    outside (PIL's default, scipy's ``rotate(order=0, reshape=False)``)."""
    image = TF.rotate(image, angle, InterpolationMode.NEAREST)
    return image, TF.rotate(mask[None].float(), angle, InterpolationMode.NEAREST)[0] > 0.5


def each(
    images: torch.Tensor, masks: torch.Tensor, transform: Callable[[torch.Tensor, torch.Tensor], tuple]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``transform(image, mask)`` applied to each pair of the batch in turn (its random draws in that order)."""
    pairs = [transform(image, mask) for image, mask in zip(images, masks, strict=True)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def rotate_half(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """MedCLIPSeg's ``RandomGenerator``: half the images rotated by a random integer angle in [-20, 20] degrees."""

    def transform(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.rand((), generator=generator) > 0.5:
            return rotate(image, mask, float(torch.randint(-20, 21, (), generator=generator)))
        return image, mask

    return each(images, masks, transform)


def rot_flip(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """TransUNet's ``RandomGenerator`` (``datasets/dataset_synapse.py``), also Swin-Unet's: with probability 1/2 a
    random multiple of 90 degrees and a flip about a random axis (``random_rot_flip``), else with probability
    1/2 a random integer angle in [-20, 20) degrees (``random_rotate``)."""

    def transform(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.rand((), generator=generator) > 0.5:
            k = int(torch.randint(0, 4, (), generator=generator))
            axis = -2 + int(torch.randint(0, 2, (), generator=generator))
            return image.rot90(k, (-2, -1)).flip(axis), mask.rot90(k, (-2, -1)).flip(axis)
        if torch.rand((), generator=generator) > 0.5:
            return rotate(image, mask, float(torch.randint(-20, 20, (), generator=generator)))
        return image, mask

    return each(images, masks, transform)


def rot90_flip(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rolling-UNet's training transforms (its ``train.py``, albumentations 1.x): ``RandomRotate90`` (p 1/2, a random
    multiple of 90 degrees), then ``Flip`` (p 1/2: vertical, horizontal or both)."""

    def transform(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.rand((), generator=generator) < 0.5:
            k = int(torch.randint(0, 4, (), generator=generator))
            image, mask = image.rot90(k, (-2, -1)), mask.rot90(k, (-2, -1))
        if torch.rand((), generator=generator) < 0.5:
            dims = [(-2, -1), (-2,), (-1,)][int(torch.randint(0, 3, (), generator=generator))]
            image, mask = image.flip(dims), mask.flip(dims)
        return image, mask

    return each(images, masks, transform)
