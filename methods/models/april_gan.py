"""April-GAN (Chen et al., "APRIL-GAN: a zero-/few-shot anomaly classification and segmentation method",
VAND 2023; official code ByChelsea/VAND-APRIL-GAN: ``model.py``, ``train.py``, ``test.py``, ``few_shot.py``).

Model: a frozen CLIP ViT (ViT-L-14-336 / openai at 518 px, as ``test_zero_shot.sh``); the tokens after blocks
6, 12, 18, 24 (raw block outputs: no ``ln_post``, no projection) each go through their own linear layer
(``LinearLayer``: ``nn.Linear(width, embed_dim)`` with bias, [CLS] dropped) into the text space. Text: the
prompt ensemble of 7 normal and 5 anomalous states x 35 templates on the dataset card's organ word
(its ``prompt_ensemble.py``; MVFA's official mode uses the same one), normalised, averaged, renormalised.

- Zero-shot map: per layer ``softmax_c(up(100 <p/|p|, t_c>))[anomalous]`` (logits upsampled bilinearly,
  corners aligned, then the softmax), summed over the layers. Image score: ``softmax(100 <e/|e|, t>)[1]``
  of the frozen CLIP's image embedding ``e`` (the projections play no part in it).
- Training: focal + Dice loss on every layer's upsampled softmax map, summed; Adam (lr 1e-3, betas 0.5, 0.999),
  batch 8, 15 epochs (its VisA run), on labelled images with pixel masks.
- Few-shot: a memory of the K normal reference images' raw patch tokens at the same layers; per layer
  ``min_m (1 - cos(p, m))`` upsampled (bilinear, corners aligned), summed over layers and added to the
  zero-shot map; the image score becomes ``0.5 (score + minmax(max map))``.

Settings: ``zero_shot_loo`` trains the projections on the other datasets' labelled pools (MVFA's protocol for
it). ``few_normal`` is the official few-shot mode: the projections are trained as in zero-shot, on the other
datasets (``auxiliary_settings``), and the K normal target images are the memory. ``few_shot`` adds the K-shot
target images (normal and anomalous, with their masks) to that training data; its K normal images are the
memory. Images whose dataset has no pixel masks are left out of training (its only loss is on masks).

Departures from the official code (README, fidelity table):

- few-shot image score: the code min-max normalises the map maxima over the *test set* of each class; we
  take the statistics of the target's validation images, else of its training images, and clamp to [0, 1];
- map range: the code's sums lie in [0, 4] (zero-shot) and [0, 12] (few-shot); we divide them by ``L``
  or ``L + 2 L_mem`` so that maps lie in [0, 1] (rankings and AUROCs unchanged);
- training data: MVTec AD with its mosaic augmentation (``aug_rate`` 0.2) or VisA without; here the cell's
  training images without augmentation (as its VisA run);
- checkpoint: the epoch its script names; here the last epoch;
- precision: its autocast is fp16 on CUDA; the harness's is bf16 where supported; fp32 on the CPU.

Like the official code (which rebuilds OpenAI's model from its config at 518 px), OpenAI weights run with exact
GELU unless the protocol's backbone sets ``quick_gelu``; positional embeddings are resized bicubically (its
open_clip). Frozen tokens are cached on disk (``cache_features``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmark import training
from benchmark.backbones.cache import FeatureCache
from benchmark.backbones.clip import shared_clip, to_grid
from benchmark.backbones.weights import weights_identity
from benchmark.data.loading import ImageBatch
from benchmark.errors import BenchmarkError
from benchmark.importers import load_mapped, tensors_of
from benchmark.method import MethodContext, Prediction, TrainSet
from methods.april_gan import AprilGAN, AprilGANParams
from methods.models.losses import dice_loss, focal_loss
from methods.models.mvfa import min_cos_distance, text_features


class LinearProjections(nn.Module):
    """The official ``LinearLayer`` for ViTs: one ``nn.Linear(width, dim)`` per layer, on the patch tokens."""

    def __init__(self, width: int, dim: int, count: int) -> None:
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(width, dim) for _ in range(count))

    def forward(self, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Tokens ``[B, 1 + N, width]`` of each layer -> projected patches ``[B, N, dim]``."""
        return [fc(t[:, 1:]) for fc, t in zip(self.fc, tokens, strict=True)]


def text_logits(projected: torch.Tensor, text: torch.Tensor, size: int) -> torch.Tensor:
    """``100 <p/|p|, t_c>`` of projected patches ``[B, N, D]`` against text ``[B or 1, 2, D]``: two-class
    logits ``[B, 2, size, size]`` upsampled bilinearly with aligned corners (its ``train.py``/``test.py``)."""
    logits = 100.0 * F.normalize(projected, dim=-1) @ text.transpose(-1, -2)
    return F.interpolate(to_grid(logits), size=size, mode="bilinear", align_corners=True)


def reference_distance(tokens: torch.Tensor, memory: torch.Tensor, size: int) -> torch.Tensor:
    """``min_m (1 - cos(p, m))`` of patch tokens ``[B, N, C]`` against a memory ``[M, C]``, upsampled to
    ``[B, size, size]`` (its ``test.py`` few-shot branch)."""
    distance = min_cos_distance(tokens, memory)
    return F.interpolate(to_grid(distance.unsqueeze(-1)), size=size, mode="bilinear", align_corners=True)[:, 0]


class AprilGANImpl(AprilGAN):
    def __init__(self, params: AprilGANParams, context: MethodContext) -> None:
        super().__init__(params, context)
        spec = context.backbone
        if spec.quick_gelu is None:  # the official code rebuilds OpenAI's model from its config: exact GELU
            spec = dataclasses.replace(spec, quick_gelu=False)
        self.backbone_spec = spec
        self.backbone = shared_clip(spec, context.image_size, context.device)
        self.taps = tuple(sorted(set(params.layers) | set(params.memory_layers)))
        torch.manual_seed(context.seed)
        self.projections = LinearProjections(self.backbone.width, self.backbone.embed_dim, len(params.layers))
        self.projections.to(context.device)
        self.cache = context.cache if params.cache_features else FeatureCache(None)
        self.recipe = {
            "features": "april-gan-v1",
            "backbone": spec.label(),
            "weights_file": weights_identity(spec.weights),
            "image_size": context.image_size,
            "layers": list(self.taps),
        }
        self.text_cache: dict[str, torch.Tensor] = {}
        self.memory: list[torch.Tensor] | None = None
        self.stats: tuple[float, float] = (0.0, 1.0)
        self.history: list[float] = []
        self.trained_on = 0

    # ----- frozen features and text -----
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frozen CLIP's image embedding and the raw tokens of every tapped layer."""
        pooled, _, outputs = self.backbone.forward_features(self.backbone.normalize(images), self.taps)
        return {"image": pooled, **{f"layer{ly}": outputs[ly] for ly in self.taps}}

    def features(self, images: torch.Tensor, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.cache.cached(self.recipe, keys, images.to(self.context.device), self.encode)

    def text(self, organ: str) -> torch.Tensor:
        """``[2, D]``: normal and anomalous text features of ``organ``."""
        if organ not in self.text_cache:
            with torch.no_grad():
                self.text_cache[organ] = text_features(self.backbone, organ, "official", self.context.cache)
        return self.text_cache[organ]

    # ----- training -----
    def loss(self, features: dict[str, torch.Tensor], masks: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Focal + Dice on each layer's upsampled softmax map, summed over layers (its ``train.py``)."""
        projected = self.projections([features[f"layer{ly}"] for ly in self.params.layers])
        total = masks.new_zeros((), dtype=torch.float32)
        for tokens in projected:
            probs = text_logits(tokens, text, masks.shape[-1]).softmax(1)
            total = total + focal_loss(probs, masks) + dice_loss(probs[:, 1], masks)
        return total

    def fit(self, train: TrainSet) -> None:
        p, device = self.params, self.context.device
        data = tuple(s for s in (*train.samples, *train.auxiliary) if train.datasets[s.dataset].masks)
        if not data:
            names = sorted({s.dataset for s in (*train.samples, *train.auxiliary)})
            raise BenchmarkError(
                f"april_gan: no training image has pixel masks (datasets {', '.join(names)}); it trains on masks"
            )
        seg = train.subset(data)
        self.trained_on = len(data)
        organ_of = {s.path: train.datasets[s.dataset].organ for s in data}
        generator = torch.Generator().manual_seed(self.context.seed)

        def step(batch) -> torch.Tensor:
            text = torch.stack([self.text(organ_of[path]) for path in batch.paths])
            return self.loss(self.features(batch.images, batch.keys), batch.masks.to(device), text)

        config = training.TrainConfig(epochs=p.epochs, lr=p.lr, betas=(0.5, 0.999), progress=p.progress)
        self.projections.train()
        self.history = training.fit(
            self.projections.parameters(),
            step,
            lambda _epoch: seg.batches(p.batch_size, generator),
            config,
            device,
            desc=f"april_gan {self.context.dataset.name}",
        )
        self.projections.eval()
        self.complete_import(train)

    def import_official(self, state: dict, where: str) -> None:
        """Its ``train.py``: ``torch.save({'trainable_linearlayer': LinearLayer.state_dict()})``, whose ``fc.{i}``
        projects layer ``--features_list[i]``: our names (parity with its ``test.py`` on a file it wrote: README)."""
        tensors = tensors_of(state, where, "trainable_linearlayer")
        names = {k.removeprefix("module."): k for k in tensors}
        mapped = {ours: tensors[theirs] for ours, theirs in names.items()}
        load_mapped(self.projections, mapped, names, where, "April-GAN's projections")

    def complete_import(self, train: TrainSet) -> None:
        """Its few-shot mode: the memory of the K normal references, and the score statistics (ours from the
        validation images, else the training images; its ``test.py`` takes them from the test set)."""
        if train.setting in self.auxiliary_settings and train.normal:
            self._build_memory(train.subset(train.normal))
            calibration = train.valid or train.samples
            peaks = torch.cat([self.raw(b.images, b.keys)[0] for b in train.subset(calibration).batches(16)])
            self.stats = (float(peaks.min()), float(peaks.max()))

    @torch.no_grad()
    def _build_memory(self, references: TrainSet) -> None:
        parts: list[list[torch.Tensor]] = [[] for _ in self.params.memory_layers]
        for batch in references.batches(16):
            features = self.features(batch.images, batch.keys)
            for i, ly in enumerate(self.params.memory_layers):
                parts[i].append(features[f"layer{ly}"][:, 1:].flatten(0, 1))
        self.memory = [torch.cat(part) for part in parts]

    # ----- test -----
    @torch.no_grad()
    def raw(self, images: torch.Tensor, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The official outputs: map maxima ``[B]``, summed map ``[B, S, S]`` and text score ``[B]``."""
        features = self.features(images, keys)
        size = images.shape[-1]
        text = self.text(self.context.dataset.organ).unsqueeze(0)
        score = (100.0 * F.normalize(features["image"], dim=-1) @ text[0].T).softmax(-1)[:, 1]
        projected = self.projections([features[f"layer{ly}"] for ly in self.params.layers])
        total = sum(text_logits(t, text, size).softmax(1)[:, 1] for t in projected)
        if self.memory is not None:
            for ly, memory in zip(self.params.memory_layers, self.memory, strict=True):
                total = total + reference_distance(features[f"layer{ly}"][:, 1:], memory, size)
        return total.flatten(1).amax(-1), total, score

    def predict(self, batch: ImageBatch) -> Prediction:
        peak, total, score = self.raw(batch.images, batch.keys)
        if self.memory is None:
            return Prediction(score, (total / len(self.params.layers)).clamp(0, 1))
        lo, hi = self.stats
        image = 0.5 * (score + ((peak - lo) / max(hi - lo, 1e-12)).clamp(0, 1))
        maps = total / (len(self.params.layers) + 2 * len(self.params.memory_layers))
        return Prediction(image.clamp(0, 1), maps.clamp(0, 1))

    def describe(self) -> dict[str, object]:
        return {
            "variant": "APRIL-GAN (few-shot)" if self.memory is not None else "APRIL-GAN (zero-shot)",
            "trainable_params": sum(p.numel() for p in self.projections.parameters()),
            "backbone": self.backbone_spec.label(),
            "training_images": self.trained_on,
            "memory_bank": 0 if self.memory is None else int(self.memory[0].shape[0]),
            "final_train_loss": round(self.history[-1], 6) if self.history else float("nan"),
        }
