"""SimpleNet (Liu et al., "SimpleNet: A Simple Network for Image Anomaly Detection and Localization", CVPR 2023),
as its official code computes it (DonaldRR/SimpleNet, commit 351a2b8, MIT: ``simplenet.py``, ``common.py``,
``run.sh`` for the published configuration).

- backbone: frozen WideResNet-50, its ``layer2`` and ``layer3`` (torchvision's ImageNet weights: timm
  ``wide_resnet50_2`` / ``tv_in1k``, the same file);
- local aggregation, PatchCore's (``patch_embedding``): every 3 x 3 neighbourhood unfolded (zero padding); the
  unfolded ``layer3`` resized entry by entry to ``layer2``'s grid (bilinear); each level's patch vectors
  average-pooled (``adaptive_avg_pool1d``) to 1536, the two stacked and pooled again to 1536;
- feature adaptor: one ``Linear(1536, 1536)``; anomalous features: the adapted ones plus N(0, 0.015^2) noise,
  one noisy copy of each; discriminator: ``Linear(1536, 1024)``, BatchNorm, LeakyReLU(0.2), ``Linear(1024, 1)``
  without bias, normal and noisy features in one batch (their batch-norm statistics shared); xavier-normal
  weights;
- loss: the truncated L1 ``mean(max(0, 0.5 - D(f))) + mean(max(0, D(f + n) + 0.5))``; the adaptor by AdamW (lr
  1e-4, weight decay 0.01), the discriminator by Adam (lr 2e-4, weight decay 1e-5), constant rates, batches of 8,
  160 passes (its 40 meta-epochs of 4);
- test: patch scores ``-D``, the image score their maximum before upsampling, the map upsampled bilinearly to
  the image and blurred (``scipy`` Gaussian, sigma 4);
- its backbone's batch-norm statistics, as its code leaves them: building the feature extractor runs the freshly
  loaded network once, in training mode, on an all-ones image (``SimpleNet.load`` asks for the feature sizes),
  which moves every running mean and variance by one momentum step (0.1); every published number was computed so.
  ``bn_drift: true`` (default) does the same at the cell's image size (the features are cached under that
  variant); ``false`` keeps the weights' statistics;
- the backbone's maps are computed anew at each training step, as its code (160 passes would read 4 MB an image
  back from disk), and cached for test images.

Departures:

- the last epoch is evaluated (its code keeps the epoch with the best image AUROC on the test set);
- scores in [0, 1] (the harness's contract): maps and image scores through ``calibration.beyond`` with the range
  of the training images (0.5: their maximum; strictly increasing: AUROCs are those of the raw values; its code
  min-max normalises over the test set);
- images resized to 288 px (its loader resizes to 329 and crops the central 288);
- the noise comes from the method's seeded generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmark import training
from benchmark.backbones.cnn import CnnBackbone, load_timm
from benchmark.data.loading import ImageBatch
from benchmark.method import MethodContext, Prediction, TrainSet
from methods.models import calibration
from methods.models.maps import gaussian
from methods.simplenet import SimpleNet, SimpleNetParams


def patch_embedding(maps: list[torch.Tensor], patch_size: int, pretrain_dim: int, target_dim: int) -> torch.Tensor:
    """PatchCore's local aggregation of feature maps ``[B, C_l, h_l, w_l]`` (the first the finest): ``[B h w, D]``
    patch vectors on the first map's grid, rows in batch-major then row-major order."""
    b, _, h, w = maps[0].shape
    pooled = []
    for m in maps:
        c = m.shape[1]
        patches = F.unfold(m, patch_size, padding=(patch_size - 1) // 2)  # [B, C k k, h_l w_l]
        if m.shape[-2:] != (h, w):  # every unfolded entry resized to the first grid
            grid = patches.reshape(b, c * patch_size**2, *m.shape[-2:])
            patches = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False).flatten(2)
        flat = patches.transpose(1, 2).reshape(b * h * w, 1, c * patch_size**2)
        pooled.append(F.adaptive_avg_pool1d(flat, pretrain_dim)[:, 0])
    stacked = torch.stack(pooled, 1).reshape(b * h * w, 1, -1)
    return F.adaptive_avg_pool1d(stacked, target_dim)[:, 0]


def discriminator(dim: int, hidden: int) -> nn.Sequential:
    """Its ``Discriminator`` with two layers: ``Linear, BatchNorm1d, LeakyReLU(0.2), Linear`` (no bias)."""
    net = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1, False))
    for layer in (net[0], net[3]):
        nn.init.xavier_normal_(layer.weight)
    return net


def truncated_l1(true: torch.Tensor, fake: torch.Tensor, margin: float) -> torch.Tensor:
    """``mean(max(0, m - D(true))) + mean(max(0, D(fake) + m))``."""
    return (margin - true).clamp(min=0).mean() + (fake + margin).clamp(min=0).mean()


def drift_batch_norm(backbone: CnnBackbone, image_size: int) -> None:
    """What its ``SimpleNet.load`` does to the backbone: one forward pass in training mode of an all-ones image (in
    the normalised space), updating every batch norm's running statistics once."""
    backbone.model.train()
    with torch.no_grad():
        backbone.model(torch.ones(1, 3, image_size, image_size, device=backbone.mean.device))
    backbone.model.eval()
    backbone.variant = f"bn-drift-ones-{image_size}"


class SimpleNetImpl(SimpleNet):
    def __init__(self, params: SimpleNetParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.backbone: CnnBackbone = load_timm(context.backbone, params.levels, context.device)
        if params.bn_drift:
            drift_batch_norm(self.backbone, context.image_size)
        torch.manual_seed(context.seed)
        self.adaptor = nn.Linear(params.target_dim, params.target_dim).to(context.device)
        nn.init.xavier_normal_(self.adaptor.weight)
        self.discriminator = discriminator(params.target_dim, params.dsc_hidden).to(context.device)
        self.stats: calibration.Stats = {}
        self.history: list[float] = []

    def raw(self, images: torch.Tensor, keys: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw image scores (the patch scores' maximum) and blurred maps, before calibration; with ``keys``, the
        backbone's maps come through the feature cache."""
        embedded, grid = self.embed(images, keys)
        patches = -self.discriminator(self.adaptor(embedded)).view(len(images), *grid)
        maps = F.interpolate(patches[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return patches.flatten(1).amax(1), gaussian(maps, self.params.sigma)

    def embed(self, images: torch.Tensor, keys: tuple[str, ...] = ()) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch vectors of a batch and their grid; the backbone's maps from the feature cache given ``keys`` (at
        test), else computed (in training: 160 passes would read them back from disk at 4 MB an image)."""
        if keys:
            maps = self.backbone.cached(self.context.cache, keys, images)
        else:
            maps = self.backbone(images.to(self.context.device))
        p = self.params
        return patch_embedding(maps, p.patch_size, p.pretrain_dim, p.target_dim), tuple(maps[0].shape[-2:])

    def fit(self, train: TrainSet) -> None:
        p = self.params
        normal = train.subset(train.normal)
        generator = torch.Generator().manual_seed(self.context.seed)
        noise = torch.Generator().manual_seed(self.context.seed + 1)

        def step(batch) -> torch.Tensor:
            with torch.no_grad():
                embedded, _ = self.embed(batch.images)
            true = self.adaptor(embedded)
            fake = true + (torch.randn(true.shape, generator=noise) * p.noise_std).to(true.device)
            scores = self.discriminator(torch.cat([true, fake]))
            return truncated_l1(scores[: len(true)], scores[len(true) :], p.margin)

        optimizers = (
            torch.optim.AdamW(self.adaptor.parameters(), lr=p.lr, weight_decay=p.weight_decay),
            torch.optim.Adam(self.discriminator.parameters(), lr=p.dsc_lr, weight_decay=p.dsc_weight_decay),
        )
        self.adaptor.train()
        self.discriminator.train()
        self.history = training.fit(
            [*self.adaptor.parameters(), *self.discriminator.parameters()],
            step,
            lambda _epoch: normal.batches(p.batch_size, generator),
            training.TrainConfig(epochs=p.epochs, lr=p.lr, progress=p.progress),
            self.context.device,
            desc=f"simplenet {self.context.dataset.name}",
            optimizers=optimizers,
        )
        self.adaptor.eval()
        self.discriminator.eval()
        with torch.no_grad():
            self.stats = calibration.ranges(self.raw(b.images) for b in normal.batches(p.batch_size))

    def predict(self, batch: ImageBatch) -> Prediction:
        with torch.no_grad():
            score, maps = self.raw(batch.images, batch.keys)
        return Prediction(calibration.beyond(score, self.stats["image"]), calibration.beyond(maps, self.stats["map"]))

    def describe(self) -> dict[str, object]:
        return {
            "variant": "SimpleNet" if self.params.bn_drift else "SimpleNet (weights' batch-norm statistics)",
            "trainable_params": sum(q.numel() for m in (self.adaptor, self.discriminator) for q in m.parameters()),
            "final_train_loss": round(self.history[-1], 6) if self.history else float("nan"),
        }
