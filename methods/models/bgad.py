"""BGAD: boundary-guided semi-push-pull normalizing flows (Yao et al., CVPR 2023; code xcyao00/BGAD).

Followed from the official code (``models/fc_flow.py``, ``losses/losses.py``, ``engines/bgad_fas_train_engine.py``):

- frozen timm EfficientNet stages 1-3 (``features_only``, ``out_indices=[1, 2, 3]``); the code asks timm
  for ``tf_efficientnet_b6`` at 256 px, which timm <= 0.6 resolved to the AutoAugment weights, named
  ``tf_efficientnet_b6.aa_in1k`` today (timm >= 0.9 resolves the bare name to ``ns_jft_in1k``): our default;
- one conditional flow per level: FrEIA ``SequenceINN`` of 8 ``AllInOneBlock``s (subnet Linear(d, 2d) - ReLU -
  Linear(2d, 2d'), affine clamping 1.9, SOFTPLUS global affine, soft permutations), conditioned on a 2-D
  sin/cos positional encoding of 128 dimensions;
- per-dimension log-likelihood ``(d ln(2 pi)^(-1/2) - |z|^2 / 2 + log|det J|) / d``;
- defaults are the training command the official README publishes for its reported results
  (``--focal_weighting --pos_beta 0.01 --margin_tau 0.1``), not ``config.py``'s argument defaults
  (``pos_beta`` 0.05, focal weighting off);
- the few real anomalous images are repeated within an epoch: the official few-shot loader
  (``MVTecFSDataset``, ``data_strategy 0``) lists each ``reuse_times`` = 5 times; ``anomaly_repeats`` = 5
  counts each anomalous image's feature vectors five times per epoch (the published command's
  ``data_strategy 0,1`` loader repeats them 10 times, half of them replaced by CutPaste-style synthesis,
  which we do not use);
- normal boundary ``b_n``: the ``beta``-quantile (position ``int(n_normal * beta)`` of the sorted normal
  log-likelihoods of the mini-batch, divided by the normalizer 10); abnormal boundary ``b_a = b_n - tau``;
- loss: maximum likelihood ``-log sigmoid(logp)`` on normal features, plus on mini-batches holding anomalous
  features ``lambda (mean(b_n - logp_n | logp_n <= b_n) + mean(logp_a - b_a | logp_a >= b_a))`` with
  ``logp / normalizer``; optional asymmetric focal weighting; the first epoch trains on normal images only;
- Adam, lr 2e-4, cosine schedule with 2 warm-up epochs, 25 meta-epochs x 8 sub-epochs, 4096 feature
  vectors per step; masks resized to each level by nearest neighbour, so every feature vector is labelled.

Departures:

- an empty selection in the loss gives 0 (the code's ``torch.mean`` of an empty tensor gives NaN, and the
  NaN step is then taken);
- test-time scores: the code subtracts, per level, the maximum log-likelihood *over the whole test set*
  before ``exp``, and turns normality into anomaly by the test set's maximum summed normality; that leaks
  test statistics into each image's score. We subtract a constant per level fixed on the training data
  (``reference_quantile`` of the normal training features' log-likelihoods; 1.0 = their maximum), clamp the
  normality at 1, and score ``1 - mean_l normality_l`` in [0, 1]; image score = the map's maximum, as the code;
- the last epoch is evaluated (the code reports the best epoch on the test set);
- the 4096-vector mini-batches are drawn from all training features of a level at once (the code permutes
  within each 32-image loader batch); the code's CutPaste anomaly synthesis (``data_strategy``) is not used:
  the cell's labelled samples are the only anomalies.
"""

from __future__ import annotations

import math

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmark import training
from benchmark.backbones.cnn import CnnBackbone, load_timm
from benchmark.data.loading import ImageBatch
from benchmark.method import MethodContext, Prediction, TrainSet
from methods.bgad import BGAD, BGADParams

LOG_SQRT_2PI = -0.9189385332046727  # ln(1 / sqrt(2 pi))


def positional_encoding_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """``[dim, H, W]`` sin/cos encoding: the first half encodes the column, the second the row."""
    if dim % 4:
        raise ValueError(f"positional encoding dimension must be a multiple of 4, got {dim}")
    enc = torch.zeros(dim, height, width)
    half = dim // 2
    div = torch.exp(torch.arange(0.0, half, 2) * -(math.log(1e4) / half))
    pos_w = torch.arange(0.0, width).unsqueeze(1)
    pos_h = torch.arange(0.0, height).unsqueeze(1)
    enc[0:half:2] = torch.sin(pos_w * div).T.unsqueeze(1).expand(-1, height, -1)
    enc[1:half:2] = torch.cos(pos_w * div).T.unsqueeze(1).expand(-1, height, -1)
    enc[half::2] = torch.sin(pos_h * div).T.unsqueeze(2).expand(-1, -1, width)
    enc[half + 1 :: 2] = torch.cos(pos_h * div).T.unsqueeze(2).expand(-1, -1, width)
    return enc


def _subnet(dims_in: int, dims_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dims_in, 2 * dims_in), nn.ReLU(), nn.Linear(2 * dims_in, dims_out))


def conditional_flow(dim: int, cond_dim: int, blocks: int = 8, clamp: float = 1.9) -> Ff.SequenceINN:
    flow = Ff.SequenceINN(dim)
    for _ in range(blocks):
        flow.append(
            Fm.AllInOneBlock,
            cond=0,
            cond_shape=(cond_dim,),
            subnet_constructor=_subnet,
            affine_clamping=clamp,
            global_affine_type="SOFTPLUS",
            permute_soft=True,
        )
    return flow


def log_likelihood(z: torch.Tensor, log_jac_det: torch.Tensor) -> torch.Tensor:
    """Per-dimension log-likelihood of ``z`` under N(0, I) with the flow's log-Jacobian determinant."""
    dim = z.shape[1]
    return (dim * LOG_SQRT_2PI - 0.5 * (z**2).sum(1) + log_jac_det) / dim


def boundaries(
    logps: torch.Tensor, mask: torch.Tensor, beta: float = 0.05, tau: float = 0.1, normalizer: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal boundary (the ``beta`` position of the sorted normal log-likelihoods, / normalizer) and b_n - tau."""
    normal = logps[mask == 0].detach()
    b_n = normal.sort().values[int(len(normal) * beta)] / normalizer
    return b_n, b_n - tau


def _mean_or_zero(x: torch.Tensor) -> torch.Tensor:
    return x.mean() if x.numel() else x.new_zeros(())


def bgspp_loss(
    logps: torch.Tensor,
    mask: torch.Tensor,
    bounds: tuple[torch.Tensor, torch.Tensor],
    normalizer: float = 10.0,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boundary-guided semi-push-pull terms (pull normals above b_n, push anomalies below b_a); empty -> 0."""
    logps = logps / normalizer
    b_n, b_a = bounds
    normal, anomalous = logps[mask == 0], logps[mask == 1]
    pull, push = normal <= b_n, anomalous >= b_a
    loss_n, loss_a = b_n - normal[pull], anomalous[push] - b_a
    if weights is not None:
        loss_n = loss_n * weights[mask == 0][pull]
        loss_a = loss_a * weights[mask == 1][push]
    return _mean_or_zero(loss_n), _mean_or_zero(loss_a)


def normal_focal_weights(logps: torch.Tensor, gamma: float = 0.5, alpha: float = 11.7, normalizer: float = 10.0):
    scaled = logps / normalizer
    weights = alpha * (1 - scaled.exp()).pow(gamma) * scaled.abs()
    return torch.where(scaled > -0.2, torch.ones_like(weights), weights)


def abnormal_focal_weights(logps: torch.Tensor, gamma: float = 2.0, alpha: float = 0.53, normalizer: float = 10.0):
    scaled = logps / normalizer
    weights = alpha * (1 + scaled.exp()).pow(gamma) / scaled.abs()
    return torch.where(scaled <= -1.0, torch.ones_like(weights), weights)


def epoch_indices(
    normal_image: torch.Tensor, epoch: int, anomaly_repeats: int, generator: torch.Generator
) -> torch.Tensor:
    """Shuffled feature-vector indices of one sub-epoch: normal images' vectors only in the first epoch, then
    every vector once and the anomalous images' vectors ``anomaly_repeats`` times in all (the official loader)."""
    if epoch == 0:
        idx = normal_image.nonzero().squeeze(1)
    else:
        anomalous = (~normal_image).nonzero().squeeze(1)
        idx = torch.cat([torch.arange(len(normal_image)), *[anomalous] * (anomaly_repeats - 1)])
    return idx[torch.randperm(len(idx), generator=generator)]


class BGADModel(nn.Module):
    """One conditional flow per feature level; ``logp`` gives per-location per-dimension log-likelihoods."""

    def __init__(self, channels: list[int], pos_dim: int = 128, blocks: int = 8, clamp: float = 1.9) -> None:
        super().__init__()
        self.pos_dim = pos_dim
        self.flows = nn.ModuleList(conditional_flow(c, pos_dim, blocks, clamp) for c in channels)

    def logp(self, level: int, features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        z, log_jac_det = self.flows[level](features, c=[positions])
        return log_likelihood(z, log_jac_det)

    def logp_maps(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Feature maps ``[B, C, h, w]`` per level -> log-likelihood maps ``[B, h, w]``."""
        maps = []
        for level, f in enumerate(features):
            b, c, h, w = f.shape
            pos = positional_encoding_2d(self.pos_dim, h, w).to(f.device).permute(1, 2, 0).reshape(1, h * w, -1)
            flat = f.permute(0, 2, 3, 1).reshape(-1, c)
            maps.append(self.logp(level, flat, pos.expand(b, -1, -1).reshape(-1, self.pos_dim)).view(b, h, w))
        return maps


class BGADImpl(BGAD):
    def __init__(self, params: BGADParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.backbone: CnnBackbone = load_timm(context.backbone, params.levels, context.device)
        torch.manual_seed(context.seed)
        np.random.seed(context.seed)  # FrEIA draws its soft permutations from numpy's global generator
        self.model = BGADModel(
            self.backbone.channels, params.pos_embed_dim, params.coupling_blocks, params.clamp_alpha
        ).to(context.device)
        self.reference: list[float] = []
        self.history: list[float] = []

    def _vectors(self, train: TrainSet) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per level: feature vectors, positions, pixel labels (masks by nearest neighbour), normal-image flag."""
        per_level: list[list[tuple]] = [[] for _ in self.params.levels]
        for batch in train.batches(16):
            feats = self.backbone.cached(self.context.cache, batch.keys, batch.images)
            for level, f in enumerate(feats):
                b, c, h, w = f.shape
                mask = F.interpolate(batch.masks.unsqueeze(1).float(), size=(h, w), mode="nearest").reshape(-1)
                pos = positional_encoding_2d(self.params.pos_embed_dim, h, w).permute(1, 2, 0).reshape(h * w, -1)
                normal_image = (batch.labels == 0).repeat_interleave(h * w)
                per_level[level].append(
                    (f.permute(0, 2, 3, 1).reshape(-1, c).cpu(), pos.repeat(b, 1), mask.cpu(), normal_image)
                )
        return [tuple(torch.cat([part[i] for part in parts]) for i in range(4)) for parts in per_level]

    def _lr(self, epoch: int, index: int, count: int) -> float:
        """The code's schedule: cosine over meta-epochs, linear warm-up during the first ``warmup_epochs``."""
        p = self.params
        eta_min = p.lr * 0.1**3
        cosine = lambda e: eta_min + (p.lr - eta_min) * (1 + math.cos(math.pi * e / p.meta_epochs)) / 2  # noqa: E731
        if epoch < p.warmup_epochs:
            start, end = p.lr / 10.0, cosine(p.warmup_epochs)
            return start + (index + epoch * count) / (p.warmup_epochs * count) * (end - start)
        return cosine(epoch)

    def _loss(self, level: int, chunk) -> torch.Tensor:
        p, device = self.params, self.context.device
        feats, pos, mask = (t.to(device) for t in chunk)
        logps = self.model.logp(level, feats, pos)
        ml = -F.logsigmoid(logps)
        if mask.sum() == 0:
            if p.focal_weighting:
                ml = ml * normal_focal_weights(logps.detach(), normalizer=p.normalizer)
            return ml.mean()
        weights = None
        if p.focal_weighting:
            weights = torch.where(
                mask == 0,
                normal_focal_weights(logps.detach(), normalizer=p.normalizer),
                abnormal_focal_weights(logps.detach(), normalizer=p.normalizer),
            )
            loss_ml = (ml[mask == 0] * weights[mask == 0]).mean()
        else:
            loss_ml = ml[mask == 0].mean()
        bounds = boundaries(logps, mask, p.pos_beta, p.margin_tau, p.normalizer)
        loss_n, loss_a = bgspp_loss(logps, mask, bounds, p.normalizer, weights)
        return loss_ml + p.bgspp_lambda * (loss_n + loss_a)

    def fit(self, train: TrainSet) -> None:
        p = self.params
        vectors = self._vectors(train)
        generator = torch.Generator().manual_seed(self.context.seed)

        def epoch_batches(epoch: int):
            chunks = []
            for _ in range(p.sub_epochs):
                for level, (_, _, _, normal_image) in enumerate(vectors):
                    idx = epoch_indices(normal_image, epoch, p.anomaly_repeats, generator)
                    size = min(p.n_batch, len(idx))
                    chunks += [(level, idx[start : start + size]) for start in range(0, len(idx) - size + 1, size)]
            return chunks  # indices only: the rows are gathered one step at a time

        def step(chunk: tuple[int, torch.Tensor]) -> torch.Tensor:
            level, sel = chunk
            feats, pos, mask, _ = vectors[level]
            return self._loss(level, (feats[sel], pos[sel], mask[sel]))

        config = training.TrainConfig(epochs=p.meta_epochs, lr=p.lr, progress=p.progress)
        self.model.train()
        self.history = training.fit(
            self.model.parameters(),
            step,
            epoch_batches,
            config,
            self.context.device,
            desc=f"bgad {self.context.dataset.name}",
            lr_at=self._lr,
        )
        self.model.eval()
        with torch.no_grad():
            self.reference = []
            for level, (feats, pos, mask, _) in enumerate(vectors):
                normal = (mask == 0).nonzero().squeeze(1)
                logps = torch.cat(
                    [
                        self.model.logp(level, feats[i].to(self.context.device), pos[i].to(self.context.device))
                        for i in normal.split(8192)
                    ]
                )
                self.reference.append(float(torch.quantile(logps.cpu().double(), p.reference_quantile)))

    def predict(self, batch: ImageBatch) -> Prediction:
        size = tuple(batch.images.shape[-2:])
        with torch.no_grad():
            maps = self.model.logp_maps(self.backbone.cached(self.context.cache, batch.keys, batch.images))
        normality = [
            F.interpolate((m - ref).exp().clamp(max=1.0).unsqueeze(1), size=size, mode="bilinear", align_corners=True)
            for m, ref in zip(maps, self.reference, strict=True)
        ]
        anomaly = (1.0 - torch.cat(normality, 1).mean(1)).clamp(0, 1)
        return Prediction(anomaly.flatten(1).amax(1), anomaly)

    def describe(self) -> dict[str, object]:
        return {
            "variant": "BGAD",
            "trainable_params": sum(q.numel() for q in self.model.parameters()),
            "reference_logp": ",".join(f"{r:.4f}" for r in self.reference),
            "final_train_loss": round(self.history[-1], 6) if self.history else float("nan"),
        }
