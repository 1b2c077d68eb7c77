"""MKD (Salehi et al., "Multiresolution Knowledge Distillation for Anomaly Detection", CVPR 2021), implemented from
the paper (its official code, rohban-lab/Knowledge_Distillation_AD, has no licence: nothing of it is used here;
where the paper gives no value, the values its code runs with are taken as facts and said so).

- source ``S``: VGG-16 pretrained on ImageNet, frozen; its critical layers ``CP_i`` are the max-pooling outputs of
  blocks 2-5 (Sec. 3.2; Fig. 2's ``S_9, S_16, S_23, S_30``): timm's ``vgg16`` feature points 1-4 (the ReLUs before
  those pools), each max-pooled 2 x 2;
- cloner ``C``: VGG-16's depth with thin convolutions (Fig. 2: 16 channels, but the last of each block, which has
  ``S``'s width, so ``C``'s pools match ``CP_i`` in shape), no biases, Xavier-uniform weights; as its code, batch
  norm after every convolution but the one before each pool (``batch_norm``; the figure shows none);
- Eq. 1: ``L_val = sum_i (1 / N_i) sum_j (a_S(j) - a_C(j))^2``; Eq. 3: ``L_dir = sum_i (1 - cos(vec a_S, vec
  a_C))`` (the paper's ``1 - sum_i cos``, shifted by a constant); Eq. 4: ``L_total = w_val L_val + w_dir L_dir``,
  the anomaly score of an image. The paper sets the weight "to make the scale of both terms the same" without a
  number; its code for datasets other than MVTec: ``L_dir + 0.01 L_val`` (our default);
- localisation (Sec. 3.3.4, Eq. 5-6): ``Lambda = d L_total / d x`` (vanilla gradients, the paper's choice; through
  ``C`` and ``S``), reduced over the colour channels by ``sum_c |.|`` (its code's; the paper does not say), a
  Gaussian filter (sigma 4) and a grey opening with a 3 x 3 ellipse;
- training on normal images: Adam, lr 1e-3, batches of 64 (Sec. 4.2); 201 epochs (its code's last checkpoint).

The defaults follow BMAD's run of MKD (DorisBao/BMAD, ``MKD/``: its code adapted to the medical sets MVFA's Table 1
uses, whose MKD numbers most likely come from it; MVFA does not say): 224 px, ImageNet mean/std on the input of
both networks (``normalise``), ``lamda`` 0.01; the original code's MVTec pipeline is ``image_size: 128,
normalise: false`` (Sec. 4.1: no normalisation but for CIFAR-10) and ``value_weight: 0.5``. The gradient map is
taken with respect to the input both networks see (the normalised image, as its code). The source's features
are computed anew at each step, not cached: at 200 epochs, reading them back from disk would cost more than the
forward pass.

Departures:

- its code scores and localises with the last three critical layers only (pool3-5); the paper with all four, as
  ours (``score_levels``);
- its code localises by guided backpropagation by default; the paper reports vanilla gradients, as ours;
- its code scales each gradient map by its 99th percentile (every map then spans [0, 1], so a pooled pixel AUROC
  would compare images on different scales): not applied;
- scores in [0, 1] (the harness's contract): maps and image scores through ``calibration.beyond`` with the range
  of the training images (0.5: their maximum; strictly increasing: AUROCs are those of the raw values);
- the last epoch is evaluated (its code reports the mean over checkpoints every 10 epochs after convergence);
- images resized with PIL's bicubic filter (its loader: torchvision's bilinear).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmark import training
from benchmark.backbones.cnn import CnnBackbone, load_timm
from benchmark.data.loading import ImageBatch
from benchmark.method import MethodContext, Prediction, TrainSet
from methods.mkd import MKD, MKDParams
from methods.models import calibration
from methods.models.maps import gaussian, input_gradients, opening


class Cloner(nn.Module):
    """``C``: 3 x 3 convolutions (no bias) of the widths ``config`` lists, 0 a 2 x 2 max-pool; ReLU after every
    convolution, batch norm before it but for the convolution a pool follows (``batch_norm``). Its critical
    layers are the outputs of the last ``count`` pools."""

    def __init__(self, config: Sequence[int], count: int, batch_norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, self.taps = 3, []
        for i, width in enumerate(config):
            if width == 0:
                layers.append(nn.MaxPool2d(2, 2))
                self.taps.append(len(layers) - 1)
                continue
            layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=False))
            nn.init.xavier_uniform_(layers[-1].weight)
            if batch_norm and (i + 1 >= len(config) or config[i + 1] != 0):
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU())
            channels = width
        if len(self.taps) < count:
            raise ValueError(f"mkd: the cloner has {len(self.taps)} pools, fewer than {count} critical layers")
        self.taps = self.taps[-count:]
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
            if i == self.taps[-1]:
                break
        return out


def critical_layers(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """``CP_i``: the source's feature points (the ReLUs before its pools) max-pooled 2 x 2."""
    return [F.max_pool2d(m, 2, 2) for m in maps]


def value_loss(source: list[torch.Tensor], clone: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 1 per image ``[B]``: the sum over critical layers of the mean squared difference."""
    return sum(((s - c) ** 2).flatten(1).mean(1) for s, c in zip(source, clone, strict=True))


def direction_loss(source: list[torch.Tensor], clone: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 3 per image ``[B]``: the sum over critical layers of ``1 - cos(vec a_S, vec a_C)``."""
    return sum(1 - F.cosine_similarity(s.flatten(1), c.flatten(1), dim=1) for s, c in zip(source, clone, strict=True))


class MKDImpl(MKD):
    def __init__(self, params: MKDParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.backbone: CnnBackbone = load_timm(context.backbone, params.levels, context.device)
        if max(params.score_levels) >= len(params.levels):
            raise ValueError(f"mkd: score_levels {params.score_levels} name critical layers beyond {params.levels}")
        torch.manual_seed(context.seed)
        self.cloner = Cloner(params.cloner, len(params.levels), params.batch_norm).to(context.device)
        with torch.no_grad():
            x = torch.zeros(1, 3, context.image_size, context.image_size, device=context.device)
            want = [m.shape[1:] for m in critical_layers(self.backbone.model(x))]
            got = [m.shape[1:] for m in self.cloner.eval()(x)]
        if want != got:
            raise ValueError(f"mkd: the cloner's critical layers {got} do not match the source's {want}")
        self.stats: calibration.Stats = {}
        self.history: list[float] = []

    def total_loss(self, source: list[torch.Tensor], clone: list[torch.Tensor]) -> torch.Tensor:
        """Eq. 4 per image ``[B]``."""
        p = self.params
        return p.value_weight * value_loss(source, clone) + p.direction_weight * direction_loss(source, clone)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """What both networks see: the images on the device, normalised with the source weights' mean and std
        unless ``normalise`` is false."""
        x = images.to(self.context.device)
        return (x - self.backbone.mean) / self.backbone.std if self.params.normalise else x

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """``L_total`` of each input over ``score_levels``, differentiable in ``x`` (Eq. 5)."""
        keep = self.params.score_levels
        source, clone = critical_layers(self.backbone.model(x)), self.cloner(x)
        return self.total_loss([source[i] for i in keep], [clone[i] for i in keep])

    def raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw scores and maps (Eq. 6) before calibration."""
        score, grads = input_gradients(self.score, self.inputs(images))
        maps = gaussian(grads, self.params.sigma)
        return score, opening(maps) if self.params.opening else maps

    def fit(self, train: TrainSet) -> None:
        p = self.params
        normal = train.subset(train.normal)
        generator = torch.Generator().manual_seed(self.context.seed)

        def step(batch) -> torch.Tensor:
            x = self.inputs(batch.images)
            with torch.no_grad():
                source = critical_layers(self.backbone.model(x))
            return self.total_loss(source, self.cloner(x)).mean()

        self.cloner.train()
        self.history = training.fit(
            self.cloner.parameters(),
            step,
            lambda _epoch: normal.batches(p.batch_size, generator),
            training.TrainConfig(epochs=p.epochs, lr=p.lr, progress=p.progress),
            self.context.device,
            desc=f"mkd {self.context.dataset.name}",
        )
        self.cloner.eval()
        self.stats = calibration.ranges(self.raw(b.images) for b in normal.batches(p.batch_size))

    def predict(self, batch: ImageBatch) -> Prediction:
        score, maps = self.raw(batch.images)
        return Prediction(calibration.beyond(score, self.stats["image"]), calibration.beyond(maps, self.stats["map"]))

    def describe(self) -> dict[str, object]:
        return {
            "variant": "MKD",
            "trainable_params": sum(q.numel() for q in self.cloner.parameters()),
            "final_train_loss": round(self.history[-1], 6) if self.history else float("nan"),
        }
