"""AdaCLIP (Cao et al., "AdaCLIP: adapting CLIP with hybrid learnable prompts for zero-shot anomaly detection",
ECCV 2024; official code caoyunkang/AdaCLIP, commit e27ee32: ``method/adaclip.py``, ``method/trainer.py``,
``train.py``, ``test.py``). The paper is not in ``../shared/papers`` and its text could not be read offline:
equations are not cited; every point below is the code's, which itself says where it departs from the paper.

- Hybrid prompts (``PromptLayer``, ``ProjectLayer``): static prompts, ``length`` (5) learnable tokens for each of
  the first ``depth`` (4) blocks of each tower (N(0, 0.02)); dynamic prompts, ``length`` linear heads from the
  frozen, unprompted CLIP image embedding (cached), added to each block's static prompt. Vision: appended after
  [CLS] and the patches before block 1, replacing those last tokens before blocks 2..depth, stripped from every
  block's output. Text: replacing token positions 1..length (real words) before text blocks 2..depth; the text is
  thus encoded per image.
- Text (``TextEmbebddingLayer``): 7 normal and 5 anomalous states x 4 templates with the organ word; embeddings
  normalised, averaged per class, renormalised: ``T [D, 2]``.
- Maps: the raw tokens of blocks 6, 12, 18, 24 (no ``ln_post``), one ``Linear(width, D)`` per layer, normalised;
  logits ``100 P T`` upsampled bilinearly (corners aligned). Test: ``softmax(mean_l logits)_anomalous``, then a
  Gaussian filter (sigma 4, scipy as its ``test.py``). Training: the softmax per layer.
- HSF, the code's version (it says it departs from the paper's): the 5 k patches most anomalous under the mean
  logits, their four layers' features concatenated and clustered by KMeans (k = 20); the mean of the cluster
  means (features averaged over the layers), normalised: ``h``. Image feature ``normalize(0.2 h + 0.8 g)`` with
  ``g`` the prompted [CLS] embedding through a ``Linear(D, D)``, normalised; score ``softmax(100 f T)_anomalous``.
- Loss (``trainer.py``): Focal on the image probabilities + per layer Focal + Dice(anomalous, y) + Dice(normal,
  1 - y), weights 1; AdamW (lr 0.01, betas (0.5, 0.999), weight decay 0.01), batch 1, 5 epochs.

Departures from the official code (README, fidelity table):

- KMeans: seeded with the cell's seed (its ``random_state`` is unset: results depend on the global numpy state);
  at most as many clusters as distinct selected features (its KMeans fails on fewer points than clusters, and
  duplicates can leave a cluster empty, whose mean is NaN);
- checkpoint: its ``train.py`` keeps the epoch with the best pixel F1 on a test set; here the last epoch;
- training data: the code trains on the *test* splits of MVTec AD and ColonDB (2x2 mosaics for MVTec with
  probability 0.2); ours follow the setting (``zero_shot_loo``: the other datasets' labelled pools;
  ``few_shot``, ``supervised``: the target's), without mosaics;
- unused parameter: its text prompts have a static prompt for block 1 that never enters the forward (3,840
  parameters at the defaults); left out: 10,661,632 trainable parameters against its 10,665,472;
- prompt widths: the code sizes text prompts by the joint embedding width (equal to the text width on ViT-L/14);
  ours by the text width;
- precision: its prompts are rounded to fp16 (``.half()``) on entry; we keep the model's dtype; its autocast has
  no GradScaler (ours has one under fp16);
- Dice: at its batch size 1 the code's Dice averages over the rows of the mask (``dice_rows: true``, the
  default); with ``dice_rows: false`` (or batches over 1) over images;
- images whose dataset has no masks contribute the image loss only.

The backbone is ViT-L-14-336 / openai at 518 px with exact GELU (its ``CLIP(**cfg)`` rebuild) and positional
embeddings resized bicubically without antialiasing (open_clip 2.16's ``resize_pos_embed``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn

from benchmark import training
from benchmark.backbones.cache import FeatureCache
from benchmark.backbones.clip import ClipBackbone, shared_clip, to_grid
from benchmark.backbones.weights import weights_identity
from benchmark.data.loading import ImageBatch, LabelledBatch
from benchmark.errors import BenchmarkError
from benchmark.method import MethodContext, Prediction, TrainSet
from methods.adaclip import AdaCLIP, AdaCLIPParams
from methods.models import mvfa
from methods.models.losses import dice_loss, focal_loss
from methods.models.maps import gaussian
from methods.models.winclip import NORMAL_STATES

ANOMALOUS_STATES = mvfa.ANOMALOUS_STATES["official"]  # the same five as MVFA-AD's code
TEMPLATES = mvfa.TEMPLATES[:4]  # "a bad photo of a {}.", ... "a cropped photo of the {}."


class HybridPrompts(nn.Module):
    """Static prompts per block and dynamic prompt generators, for the towers ``branch`` names."""

    def __init__(self, backbone: ClipBackbone, length: int, depth: int, kind: str, branch: str) -> None:
        super().__init__()
        self.length, self.depth, self.kind = length, depth, kind
        self.vision, self.text = "V" in branch, "L" in branch
        dim = backbone.embed_dim
        widths = {"vision": backbone.width, "text": backbone.text_width}
        count = {"vision": depth, "text": depth - 1}  # text block 1 gets none (its static prompt 0 is unused)
        self.static = nn.ParameterDict()
        self.dynamic = nn.ModuleDict()
        for tower, enabled in (("vision", self.vision), ("text", self.text)):
            if enabled and "S" in kind:
                self.static[tower] = nn.Parameter(torch.empty(count[tower], length, widths[tower]))
                nn.init.normal_(self.static[tower], std=0.02)
            if enabled and "D" in kind:
                self.dynamic[tower] = nn.ModuleList(nn.Linear(dim, widths[tower]) for _ in range(length))

    def context(self, tower: str, index: int, embedding: torch.Tensor) -> torch.Tensor:
        """The prompt ``[B, length, width]`` of ``tower`` for its ``index``-th prompted block (0-based)."""
        parts = []
        if tower in self.dynamic:
            parts.append(torch.stack([head(embedding) for head in self.dynamic[tower]], dim=1))
        if tower in self.static:
            parts.append(self.static[tower][index].expand(len(embedding), -1, -1))
        return sum(parts)


class AdaCLIPModel(nn.Module):
    """The prompts, the per-layer patch projections and the [CLS] projection over a frozen CLIP."""

    def __init__(self, backbone: ClipBackbone, params: AdaCLIPParams) -> None:
        super().__init__()
        p = params
        if p.prompt_depth > min(backbone.num_layers, len(backbone.text_blocks)) or max(p.layers) > backbone.num_layers:
            raise BenchmarkError(
                f"adaclip: prompt_depth {p.prompt_depth} or layers {list(p.layers)} exceed the backbone's blocks "
                f"({backbone.num_layers} vision, {len(backbone.text_blocks)} text)"
            )
        if backbone.hf_text:
            raise BenchmarkError(f"adaclip: '{backbone.spec.model}' has a BERT text tower; AdaCLIP prompts CLIP's")
        self.backbone = [backbone]  # not a submodule: frozen and out of state_dict
        self.layers = tuple(p.layers)
        self.prompts = HybridPrompts(backbone, p.prompt_length, p.prompt_depth, p.prompt_type, p.prompt_branch)
        self.patch_proj = nn.ModuleList(nn.Linear(backbone.width, backbone.embed_dim) for _ in self.layers)
        self.cls_proj = nn.Linear(backbone.embed_dim, backbone.embed_dim)

    def encode_image(self, images: torch.Tensor, embedding: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised images -> the prompted [CLS] embedding ``[B, D]`` and each layer's patch tokens
        ``[B, N, width]`` (prompt tokens stripped)."""
        backbone, prompts = self.backbone[0], self.prompts
        x = backbone.embed(images)
        adapters, length = {}, 0
        if prompts.vision:
            length = prompts.length
            x = torch.cat([x, prompts.context("vision", 0, embedding).to(x.dtype)], dim=1)

            def replace(index: int):
                return lambda t: torch.cat([t[:, :-length], prompts.context("vision", index, embedding).to(t.dtype)], 1)

            adapters = {index: replace(index) for index in range(1, prompts.depth)}
        x, outputs = backbone.run_blocks(x, self.layers, adapters)
        return backbone.pool(x), [outputs[ly][:, 1 : outputs[ly].shape[1] - length] for ly in self.layers]

    def encode_text(self, organ: str, embedding: torch.Tensor) -> torch.Tensor:
        """``[B, D, 2]``: per image, the normal and anomalous ensembles with its text prompts."""
        backbone, prompts = self.backbone[0], self.prompts
        rows = [
            t.format(s.format(organ)) for states in (NORMAL_STATES, ANOMALOUS_STATES) for s in states for t in TEMPLATES
        ]
        normal = len(NORMAL_STATES) * len(TEMPLATES)
        tokens = backbone.tokenize(rows)
        batch, sentences = len(embedding), len(rows)
        if "text" not in prompts.dynamic:  # the same text for every image: encoded once
            embedding = embedding[:1]
        images = len(embedding)
        x = backbone.token_embedding(tokens).repeat(images, 1, 1)
        hooks = {}
        if prompts.text:
            length = prompts.length

            def replace(index: int):
                ctx = prompts.context("text", index - 1, embedding).repeat_interleave(sentences, 0)
                return lambda t: torch.cat([t[:, :1], ctx.to(t.dtype), t[:, 1 + length :]], 1)

            hooks = {index + 1: replace(index) for index in range(1, prompts.depth)}
        pooled, _ = backbone.encode_token_embeddings(x, backbone.text_end(tokens).repeat(images), hooks)
        pooled = F.normalize(pooled, dim=-1).view(images, sentences, -1)
        classes = [pooled[:, :normal].mean(1), pooled[:, normal:].mean(1)]
        return F.normalize(torch.stack(classes, dim=-1), dim=1).expand(batch, -1, -1)

    def forward(
        self, images: torch.Tensor, embedding: torch.Tensor, organ: str
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """The [CLS] feature ``g`` ``[B, D]``, per layer the normalised patch features ``[B, N, D]`` and logits
        ``100 P T`` ``[B, N, 2]``, and the text ``[B, D, 2]``."""
        pooled, tokens = self.encode_image(images, embedding)
        text = self.encode_text(organ, embedding)
        patches = [F.normalize(proj(t), dim=-1) for proj, t in zip(self.patch_proj, tokens, strict=True)]
        logits = [100.0 * p @ text for p in patches]  # (100 P) T, as its code rounds it
        return F.normalize(self.cls_proj(pooled), dim=-1), patches, logits, text


def hybrid_semantic_fusion(
    patches: list[torch.Tensor], logits: list[torch.Tensor], clusters: int, seed: int
) -> torch.Tensor:
    """``[B, D]``: the code's HSF (see the module docstring); gradients flow through the selected features."""
    anomaly = torch.stack(logits).mean(0).softmax(-1)[..., 1]
    top = anomaly.topk(min(anomaly.shape[1], 5 * clusters), dim=1).indices
    selected = [p.gather(1, top[..., None].expand(-1, -1, p.shape[-1])) for p in patches]
    stacked = torch.cat(selected, dim=-1).detach().float().cpu().numpy()
    centres = []
    for b in range(len(top)):
        k = min(clusters, len(np.unique(stacked[b], axis=0)))
        labels = torch.from_numpy(KMeans(k, n_init="auto", random_state=seed).fit_predict(stacked[b]))
        labels = labels.to(top.device)
        members = [torch.cat([s[b][labels == j] for s in selected]).mean(0) for j in range(k)]
        centres.append(torch.stack(members).mean(0))
    return F.normalize(torch.stack(centres), dim=-1)


def upsample(logits: torch.Tensor, size: int) -> torch.Tensor:
    """Patch logits ``[B, N, 2]`` -> ``[B, 2, size, size]`` (bilinear, corners aligned)."""
    return F.interpolate(to_grid(logits), size=size, mode="bilinear", align_corners=True)


class AdaCLIPImpl(AdaCLIP):
    def __init__(self, params: AdaCLIPParams, context: MethodContext) -> None:
        super().__init__(params, context)
        spec = context.backbone
        if spec.quick_gelu is None:
            spec = dataclasses.replace(spec, quick_gelu=False)  # its CLIP(**cfg) rebuild: exact GELU
        self.backbone_spec = spec
        self.backbone = shared_clip(spec, context.image_size, context.device, "bicubic-no-antialias")
        torch.manual_seed(context.seed)
        self.model = AdaCLIPModel(self.backbone, params).to(context.device)
        self.cache = context.cache if params.cache_features else FeatureCache(None)
        self.recipe = {
            "features": "adaclip-embedding-v1",
            "backbone": spec.label(),
            "quick_gelu": spec.quick_gelu,
            "weights_file": weights_identity(spec.weights),
            "image_size": context.image_size,
        }
        self.history: list[float] = []

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frozen, unprompted image embedding ``[B, D]`` (not normalised) that drives the dynamic prompts."""
        return {"embedding": self.backbone.forward_features(self.backbone.normalize(images))[0]}

    def embedding(self, images: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
        """The dynamic prompts' input, cached; zeros where no prompt is dynamic (the pass is skipped)."""
        if not self.model.prompts.dynamic:
            return images.new_zeros(len(images), self.backbone.embed_dim)
        return self.cache.cached(self.recipe, keys, images, self.embed)["embedding"]

    def scores(self, images: torch.Tensor, keys: Sequence[str], organ: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image probabilities ``[B, 2]`` and each layer's patch logits ``[B, N, 2]``."""
        p = self.params
        images = images.to(self.context.device)
        g, patches, logits, text = self.model(self.backbone.normalize(images), self.embedding(images, keys), organ)
        if p.use_hsf:
            h = hybrid_semantic_fusion(patches, logits, p.k_clusters, self.context.seed)
            g = F.normalize(p.hsf_alpha * h.to(g.dtype) + (1 - p.hsf_alpha) * g, dim=-1)
        return (100.0 * g[:, None] @ text)[:, 0].softmax(-1), logits

    def loss(self, batch: LabelledBatch, organ: str, has_mask: torch.Tensor) -> torch.Tensor:
        """``Focal(s, y) + sum_l [Focal(M_l, y) + Dice(M_l,a, y) + Dice(M_l,n, 1 - y)]`` (its ``trainer.py``)."""
        probs, logits = self.scores(batch.images, batch.keys, organ)
        labels = batch.labels.to(probs.device)
        loss = focal_loss(probs[:, :, None, None], labels[:, None, None])
        if has_mask.any():
            masks = batch.masks.to(probs.device)[has_mask]
            rows = self.params.dice_rows and self.params.batch_size == 1

            def dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
                if rows:  # its batch of one squeezed away: Dice over the mask's rows
                    return dice_loss(pred.reshape(-1, pred.shape[-1]), target.reshape(-1, pred.shape[-1]))
                return dice_loss(pred, target)

            for layer in logits:
                maps = upsample(layer[has_mask], masks.shape[-1]).softmax(1)
                loss = loss + focal_loss(maps, masks) + dice(maps[:, 1], masks) + dice(maps[:, 0], 1 - masks.float())
        return loss

    def fit(self, train: TrainSet) -> None:
        p, device = self.params, self.context.device
        specs = {s.path: train.datasets[s.dataset] for s in train.samples}
        generator = torch.Generator().manual_seed(self.context.seed)

        def step(batch: LabelledBatch) -> torch.Tensor:
            organs = [specs[path].organ for path in batch.paths]
            flags = torch.tensor([specs[path].masks for path in batch.paths], device=device)
            losses = []
            for organ in dict.fromkeys(organs):  # one text ensemble per batch: its images' organs one by one
                keep = [i for i, o in enumerate(organs) if o == organ]
                part = LabelledBatch(
                    batch.images[keep],
                    tuple(batch.keys[i] for i in keep),
                    batch.labels[keep],
                    batch.masks[keep],
                    tuple(batch.paths[i] for i in keep),
                )
                losses.append(self.loss(part, organ, flags[keep]) * len(keep))
            return sum(losses) / len(organs)

        config = training.TrainConfig(
            epochs=p.epochs,
            lr=p.lr,
            optimizer="adamw",
            betas=(0.5, 0.999),
            weight_decay=p.weight_decay,
            progress=p.progress,
        )
        self.model.train()
        self.history = training.fit(
            self.model.parameters(),
            step,
            lambda _epoch: train.batches(p.batch_size, generator),
            config,
            device,
            desc=f"adaclip {self.context.dataset.name}",
        )
        self.model.eval()

    @torch.no_grad()
    def predict(self, batch: ImageBatch) -> Prediction:
        probs, logits = self.scores(batch.images, batch.keys, self.context.dataset.organ)
        size = batch.images.shape[-1]
        maps = upsample(torch.stack(logits).mean(0), size).softmax(1)[:, 1]
        maps = gaussian(maps, self.params.sigma)
        return Prediction(probs[:, 1].clamp(0, 1), maps.clamp(0, 1))

    def describe(self) -> dict[str, object]:
        return {
            "variant": "AdaCLIP",
            "trainable_params": sum(q.numel() for q in self.model.parameters()),
            "backbone": self.backbone_spec.label(),
            "final_train_loss": round(self.history[-1], 6) if self.history else float("nan"),
        }
