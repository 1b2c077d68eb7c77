"""DRA (Ding, Pang, Shen, "Catching Both Gray and Black Swans: Open-set Supervised Anomaly Detection", CVPR 2022).

Implemented from the paper (its official code, Choubo/DRA, is AGPL-3.0: nothing of it is used here; where the
paper is silent, the values its code runs with are taken as facts and said so below):

- feature extractor ``f``: a ResNet-18 up to its last stage, ``M_x`` of 512 channels at stride 32, fine-tuned with
  the heads (Sec. 3.1, App. B.1); ImageNet weights (``resnet18`` / ``tv_in1k``, torchvision's, as its code loads);
- seen-abnormality head ``g_s`` (Eq. 2-3): a 1 x 1 convolution scores each patch vector ``d_i`` of ``M_x``, the
  image score is the mean of the top ``K`` = 10 % of them (top-K multiple-instance learning);
- pseudo-abnormality head ``g_p`` (Eq. 4-5): the same on its own parameters, trained on CutMix pseudo anomalies
  ``x~ = T C(R x_n) + (1 - T(R)) x_n``: a random rectangle of a normal image, colour-jittered, pasted elsewhere in
  it;
- latent-residual head ``g_r`` (Eq. 6-8): the mean feature map ``M_r`` of ``N_r`` = 5 reference images minus
  ``M_x``, scored by top-K MIL;
- normality head ``g_n`` (Eq. 9): two fully connected layers (512 -> 256 -> 1) on the average of the patch
  vectors;
- deviation loss (Eq. 10-11) per head, ``(1 - y) |dev| + y max(0, a - dev)`` with ``dev = (g - mu_R) / sigma_R``
  from ``|R|`` = 5000 draws of N(0, 1) and ``a`` = 5 (DevNet's values, which the paper cites and its code uses);
  ``y`` per head: ``g_s`` normal 0 / seen 1 (pseudo anomalies left out), ``g_p`` normal 0 / pseudo 1 (seen left
  out), ``g_r`` normal 0 / seen and pseudo 1, ``g_n`` normal 1 / every anomaly 0 (Eq. 1: the sum of the four);
- score ``s = g_s + g_p + g_r - g_n`` (Sec. 3.2), each head's score the mean over the two-level image pyramid
  (App. B.1: the image and the image halved, by nearest-neighbour resizing as its code).

Where the paper gives no value, its code's (facts, re-implemented): the absolute value of every head's output;
a 3 x 3 convolution, batch norm and ReLU before ``g_r``'s scorer; Adam with lr 2e-4 and weight decay 1e-5 (the
paper: 1e-3 and 1e-2; the published numbers come from the code), StepLR 10 / 0.1 stepped at the start of each
epoch, gradient clipping 1.0; 30 epochs of 20 steps of 48 images: ``2 B // 3`` normal slots, the rest seen
anomalies, each kind (and the references) cycled through random permutations, each normal slot replaced with
probability 0.5 by a pseudo anomaly of a normal image drawn at random; CutMix patches of 2-15 % of the image,
aspect ratio log-uniform in [0.3, 1/0.3], colour jitter 0.1; a random rotation within +-180 degrees of every
training image; the reference images drawn anew at every step (App. B.1: a mix of normal images and pseudo
anomalies, probability 0.5), passed through ``f`` in the same batch (batch-norm statistics and gradients
included).

Departures:

- test-time reference: the paper fixes ``M_r`` "for all training and testing samples"; its code draws new,
  augmented references for every test batch, so its scores are random. Ours are ``N_r`` normal training images
  drawn once with the cell's seed, unaugmented, their features taken after training (deterministic scores);
- the deviation prior is drawn from the method's seeded generator;
- the anomaly map. DRA has none (its authors: "we did not evaluate the performance of anomaly localization for
  DRA", Choubo/DRA issue 4, pointing to DevNet's gradient maps); MVFA reports DRA's pixel AUROC without saying how
  it got maps. ``map: gradient`` (default) follows the authors' pointer: ``sum_c |d s / d x|``, Gaussian-blurred
  (sigma 4 px, DevNet's at 448 px); ``map: patches`` sums the three abnormality heads' patch scores before top-K,
  upsampled bilinearly, averaged over the pyramid, blurred alike. DevNet's per-image rescaling by the 99th
  percentile is not applied: it would make every image's map span [0, 1] and pooled pixel AUROCs meaningless;
- scores in [0, 1] (the harness's contract): ``s`` and the maps through ``calibration.squash`` with min-max
  statistics of the target's unused validation images, else of the training images (strictly increasing, so
  AUROCs are those of the raw values);
- images are resized to the cell's size (448 by default; the paper picks 448 or 224 "by original resolution"),
  with PIL's bicubic filter (its loader: torchvision's bilinear).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn

from benchmark import training
from benchmark.backbones.cnn import timm_model
from benchmark.data.loading import ImageBatch
from benchmark.method import MethodContext, Prediction, TrainSet
from methods.dra import DRA, DRAParams
from methods.models import calibration
from methods.models.maps import gaussian, input_gradients

NORMAL, SEEN, PSEUDO = 0, 1, 2


def top_k_mean(patches: torch.Tensor, fraction: float) -> torch.Tensor:
    """Eq. 3: the mean of the ``max(floor(fraction * n), 1)`` largest of each image's ``n`` patch scores."""
    flat = patches.flatten(1)
    k = max(int(fraction * flat.shape[1]), 1)
    return flat.topk(k, dim=1).values.mean(1)


class PatchHead(nn.Module):
    """A patch-wise classifier (1 x 1 convolution) with top-K MIL (Eq. 2-3); ``residual``: the 3 x 3 convolution,
    batch norm and ReLU of ``g_r`` before it."""

    def __init__(self, channels: int, top_k: float, residual: bool = False) -> None:
        super().__init__()
        self.top_k = top_k
        self.pre = (
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
            if residual
            else nn.Identity()
        )
        self.scorer = nn.Conv2d(channels, 1, 1)

    def patches(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, h, w]`` patch scores ``|g(d_i)|``."""
        return self.scorer(self.pre(features)).abs()[:, 0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return top_k_mean(self.patches(features), self.top_k)


class NormalityHead(nn.Module):
    """Eq. 9: ``|g_n(mean_i d_i)|`` through two fully connected layers."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features.mean((2, 3))).abs()[:, 0]


class DRANet(nn.Module):
    """``f`` (``extractor``, trained with the heads, so stored with every fit) and the four heads; images in [0, 1]
    are normalised with the backbone weights' mean and std."""

    HEADS = ("seen", "pseudo", "residual", "normal")

    def __init__(self, extractor: nn.Module, mean, std, top_k: float, hidden: int, scales: int) -> None:
        super().__init__()
        self.extractor, self.scales = extractor, scales
        channels = extractor.num_features
        self.seen = PatchHead(channels, top_k)
        self.pseudo = PatchHead(channels, top_k)
        self.residual = PatchHead(channels, top_k, residual=True)
        self.normal = NormalityHead(channels, hidden)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def features(self, images: torch.Tensor, scale: int) -> torch.Tensor:
        """``M_x`` at pyramid level ``scale`` (the image resized to ``size / 2^scale``, nearest neighbour)."""
        if scale:
            images = F.interpolate(images, size=images.shape[-1] // 2**scale)
        return self.extractor.forward_features((images - self.mean) / self.std)

    def head_scores(self, features: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each head's image score: ``g_s, g_p, g_n`` on ``M_x``, ``g_r`` on ``M_r - M_x`` (Eq. 7)."""
        return {
            "seen": self.seen(features),
            "pseudo": self.pseudo(features),
            "residual": self.residual(reference - features),
            "normal": self.normal(features),
        }

    def pyramid(
        self, images: torch.Tensor, references: list[torch.Tensor] | None = None, in_batch: int = 0
    ) -> dict[str, torch.Tensor]:
        """Each head's score averaged over the pyramid; ``references[s]`` is ``M_r`` at level ``s``. With
        ``in_batch`` (training, as its code), the first ``in_batch`` images are the references instead: they go
        through ``f`` with the batch (batch-norm statistics and gradients shared) and get no scores."""
        total: dict[str, torch.Tensor] = {}
        for scale in range(self.scales):
            f = self.features(images, scale)
            reference = f[:in_batch].mean(0, keepdim=True) if in_batch else references[scale]
            for name, value in self.head_scores(f[in_batch:], reference).items():
                total[name] = total.get(name, 0) + value / self.scales
        return total

    def score(self, images: torch.Tensor, references: list[torch.Tensor]) -> torch.Tensor:
        """``s = g_s + g_p + g_r - g_n`` (Sec. 3.2)."""
        h = self.pyramid(images, references)
        return h["seen"] + h["pseudo"] + h["residual"] - h["normal"]

    def patch_map(self, images: torch.Tensor, references: list[torch.Tensor]) -> torch.Tensor:
        """``map: patches``: the abnormality heads' patch scores summed, upsampled, averaged over the pyramid."""
        size = images.shape[-2:]
        total = 0
        for scale in range(self.scales):
            f = self.features(images, scale)
            patches = self.seen.patches(f) + self.pseudo.patches(f) + self.residual.patches(references[scale] - f)
            total = total + F.interpolate(patches[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return total / self.scales


def deviation_loss(scores: torch.Tensor, targets: torch.Tensor, margin: float, prior: torch.Tensor | None):
    """Eq. 10-11: ``dev = (g - mu_R) / sigma_R`` (``prior``: the draws R; None: mu 0, sigma 1), then
    ``(1 - y) |dev| + y max(0, a - dev)`` averaged over the samples."""
    dev = scores if prior is None else (scores - prior.mean()) / prior.std()
    return ((1 - targets) * dev.abs() + targets * (margin - dev).clamp(min=0)).mean()


def head_losses(scores: dict[str, torch.Tensor], labels: torch.Tensor, margin: float, prior) -> dict[str, torch.Tensor]:
    """Each head's deviation loss on its own samples and targets (Eq. 2, 5, 8, 9); a head with no sample of a
    batch adds nothing."""
    seen, pseudo, normal = labels == SEEN, labels == PSEUDO, labels == NORMAL
    routes = {
        "seen": (~pseudo, seen.float()),
        "pseudo": (~seen, pseudo.float()),
        "residual": (torch.ones_like(seen), (~normal).float()),
        "normal": (torch.ones_like(seen), normal.float()),
    }
    out = {}
    for name, (rows, targets) in routes.items():
        if rows.any():
            out[name] = deviation_loss(scores[name][rows], targets[rows], margin, prior() if prior else None)
    return out


def cutmix(image: torch.Tensor, p: DRAParams, generator: torch.Generator) -> torch.Tensor:
    """Eq. 4 on one ``[3, H, W]`` image in [0, 1]: a rectangle of ``cutmix_area`` of the image and aspect ratio
    log-uniform in ``[a, 1/a]``, colour-jittered, pasted at another random place of the same image."""

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    _, h, w = image.shape
    area = uniform(*p.cutmix_area) * h * w
    aspect = math.exp(uniform(math.log(p.cutmix_aspect), -math.log(p.cutmix_aspect)))
    ph = max(1, min(h, round(math.sqrt(area / aspect))))
    pw = max(1, min(w, round(math.sqrt(area * aspect))))

    def corner(size: int, extent: int) -> int:
        return int(torch.randint(0, size - extent + 1, (), generator=generator))

    y0, x0, y1, x1 = corner(h, ph), corner(w, pw), corner(h, ph), corner(w, pw)
    patch = colour_jitter(image[:, y0 : y0 + ph, x0 : x0 + pw], p.jitter, generator)
    out = image.clone()
    out[:, y1 : y1 + ph, x1 : x1 + pw] = patch
    return out


def colour_jitter(patch: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    """torchvision's ``ColorJitter(amount, amount, amount, amount)`` with factors from ``generator``: brightness,
    contrast and saturation factors uniform in ``[1 - amount, 1 + amount]``, a hue shift in ``[-amount, amount]``,
    applied in a random order."""
    if amount <= 0:
        return patch
    factors = 1 - amount + 2 * amount * torch.rand(3, generator=generator)
    hue = float(-amount + 2 * amount * torch.rand((), generator=generator))
    ops = (
        lambda x: TF.adjust_brightness(x, float(factors[0])),
        lambda x: TF.adjust_contrast(x, float(factors[1])),
        lambda x: TF.adjust_saturation(x, float(factors[2])),
        lambda x: TF.adjust_hue(x, hue),
    )
    for i in torch.randperm(4, generator=generator).tolist():
        patch = ops[i](patch)
    return patch


def cycle(count: int, generator: torch.Generator):
    """Indices ``0 .. count - 1`` in one random order after another (its samplers' order of normal images, of
    references and of seen anomalies): ``next()`` of the returned function."""
    order: list[int] = []

    def next_index() -> int:
        if not order:
            order.extend(torch.randperm(count, generator=generator).tolist())
        return order.pop(0)

    return next_index


class DRAImpl(DRA):
    def __init__(self, params: DRAParams, context: MethodContext) -> None:
        super().__init__(params, context)
        extractor, mean, std = timm_model(context.backbone, context.device, num_classes=0, global_pool="")
        torch.manual_seed(context.seed)
        self.model = DRANet(extractor, mean, std, params.top_k, params.normal_hidden, params.scales).to(context.device)
        self.reference: list[torch.Tensor] = []
        self.stats: calibration.Stats = {}
        self.history: list[float] = []

    def augment(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """CutMix (Eq. 4) of the images whose label is ``PSEUDO``, then the random rotation of every image."""
        out = []
        for image, label in zip(images, labels.tolist(), strict=True):
            if label == PSEUDO:
                image = cutmix(image, self.params, generator)
            if self.params.rotation:
                angle = float((torch.rand((), generator=generator) * 2 - 1) * self.params.rotation)
                image = TF.rotate(image, angle)
            out.append(image)
        return torch.stack(out)

    def fit(self, train: TrainSet) -> None:
        p = self.params
        normal, anomalous = train.normal, train.anomalous
        if not normal or not anomalous:
            raise ValueError("dra: needs normal and anomalous training images (settings few_shot, supervised)")
        generator = torch.Generator().manual_seed(self.context.seed)
        n_seen = p.batch_size - 2 * p.batch_size // 3
        batch_normals, reference_normals = cycle(len(normal), generator), cycle(len(normal), generator)
        seen = cycle(len(anomalous), generator)

        def slots(count: int, order) -> tuple[list, torch.Tensor]:
            """``count`` normal slots, their images next in ``order``; each with ``pseudo_prob`` a pseudo anomaly
            instead, made from a normal image drawn at random (the slot's own used up all the same)."""
            chosen = [normal[order()] for _ in range(count)]
            pseudo = (torch.rand(count, generator=generator) < p.pseudo_prob).tolist()
            for i in (i for i, flag in enumerate(pseudo) if flag):
                chosen[i] = normal[int(torch.randint(len(normal), (), generator=generator))]
            return chosen, torch.where(torch.tensor(pseudo), PSEUDO, NORMAL)

        def batch(_index: int) -> tuple[torch.Tensor, torch.Tensor]:
            refs, ref_labels = slots(p.references, reference_normals)
            samples, labels = slots(p.batch_size - n_seen, batch_normals)
            samples += [anomalous[seen()] for _ in range(n_seen)]
            labels = torch.cat([ref_labels, labels, torch.full((n_seen,), SEEN)])
            images = train.load(tuple(refs + samples)).images
            return self.augment(images, labels, generator), labels[p.references :]

        prior_draws = torch.Generator(device="cpu").manual_seed(self.context.seed + 1)

        def prior() -> torch.Tensor:
            return torch.randn(p.prior_samples, generator=prior_draws).to(self.context.device)

        def step(item: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            images, labels = (t.to(self.context.device) for t in item)
            scores = self.model.pyramid(images, in_batch=p.references)
            return sum(head_losses(scores, labels, p.margin, prior if p.prior_samples else None).values())

        def lr_at(epoch: int, _index: int, _count: int) -> float:
            return p.lr * p.lr_gamma ** ((epoch + 1) // p.lr_step)  # StepLR stepped before each epoch

        config = training.TrainConfig(
            epochs=p.epochs,
            lr=p.lr,
            weight_decay=p.weight_decay,
            grad_clip=p.grad_clip,
            progress=p.progress,
        )
        self.model.train()
        self.history = training.fit(
            self.model.parameters(),
            step,
            lambda _epoch: training.Counted(map(batch, range(p.steps_per_epoch)), p.steps_per_epoch),
            config,
            self.context.device,
            desc=f"dra {self.context.dataset.name}",
            lr_at=lr_at,
        )
        self.model.eval()
        self.reference = self._references(train, normal, generator)
        calibrate = train.subset(train.valid) if train.valid else train
        self.stats = calibration.ranges(self.raw(b.images.to(self.context.device)) for b in calibrate.batches(16))

    @torch.no_grad()
    def _references(self, train: TrainSet, normal, generator: torch.Generator) -> list[torch.Tensor]:
        """``M_r`` at each pyramid level (Eq. 6): ``N_r`` normal training images drawn once, unaugmented."""
        picks = torch.randint(0, len(normal), (self.params.references,), generator=generator).tolist()
        images = train.load(tuple(normal[i] for i in picks)).images.to(self.context.device)
        return [self.model.features(images, s).mean(0, keepdim=True) for s in range(self.params.scales)]

    def raw(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw scores ``s`` and raw maps (before calibration)."""
        if self.params.map == "gradient":
            score, raw = input_gradients(lambda x: self.model.score(x, self.reference), images)
        else:
            with torch.no_grad():
                score, raw = self.model.score(images, self.reference), self.model.patch_map(images, self.reference)
        return score, gaussian(raw, self.params.sigma)

    def predict(self, batch: ImageBatch) -> Prediction:
        score, raw = self.raw(batch.images.to(self.context.device))
        return Prediction(calibration.squash(score, self.stats["image"]), calibration.squash(raw, self.stats["map"]))

    def describe(self) -> dict[str, object]:
        return {
            "variant": f"DRA (map: {self.params.map})",
            "trainable_params": sum(q.numel() for q in self.model.parameters()),
            "final_train_loss": round(self.history[-1], 6) if self.history else float("nan"),
        }
