"""AA-CLIP (Ma et al., "AA-CLIP: enhancing zero-shot anomaly detection via anomaly-aware CLIP", CVPR 2025;
official code Mwxinnn/AA-CLIP, commit 53db195: ``model/adapter.py``, ``train.py``, ``forward_utils.py``,
``test.py``). The paper is not in ``../shared/papers`` and its text could not be read offline: sections and
equations are not cited; every point below is the code's, with its file.

- Residual adapters (``model/adapter.py``): after text blocks 1-3 and vision blocks 1-6, ``a = LeakyReLU(W x)``
  rescaled to each token's norm, ``x <- 0.1 a + 0.9 x`` (``benchmark.backbones.adapters.ResidualAdapter``). The
  text tower ends in ``ln_final``, the EOT token and a new Xavier-initialised ``Linear(width, D)`` + LeakyReLU in
  place of CLIP's projection; the vision side projects the tokens of levels 6, 12, 18, 24 (taken after a level's
  adapter) through ``ln_post`` and a bias-free ``Linear(width, D)`` per level (``seg_proj``), and the level-24
  tokens through ``det_proj``, whose normalised outputs are averaged over the patches (the image feature).
- Anchors (``dataset/constants.py``, ``forward_utils.py``): 3 normal and 5 abnormal states x 2 templates with
  the organ word; ``t_s = normalize(mean_i normalize(text(sentence_i)))``.
- Stage 1, the text anchors (``train_text_adapter``): a second CLIP whose last 19 blocks attend V-V (FFN kept)
  gives patch features ``normalize(ln_post(tok) proj) + normalize(image embedding)``; per level ``M = softmax(
  up(100 F T))`` (bilinear, corners aligned); loss ``Focal(M, y) + Dice(M_n, 1 - y) + Dice(M_a, y)`` and
  ``0.1 (mean_b <t_n, t_a>)^2``. Adam 1e-5, betas (0.5, 0.999), batch 16, 5 epochs.
- Stage 2, the patch features (``train_image_adapter``): anchors frozen; ``CE(det T, label)`` on raw cosines
  plus the seg loss summed over levels; Adam 5e-4, betas (0.5, 0.999), halved at iterations 16,000 and 32,000,
  batch 2, 20 epochs.
- Test (``test.py``): per level ``(G_a + 1 - G_n) / 2`` of the logits ``G = 100 cos`` on the patch grid, Gaussian
  blur (kernel 9, sigma 1.5: its medical setting; kornia's, reflect border), upsampled bilinearly with corners
  aligned, summed over levels; min-max normalised; image score: the map's maximum (its medical rule: the det
  branch is not used).
- Augmentation (``dataset/__init__.py``): rotation within +-30 deg, translation within 15 %, horizontal and
  vertical flips, each with probability 0.5 (nearest, filled with the mean colour) in both stages; brightness,
  contrast and saturation jitter (0.5 each, probability 0.7) in stage 2.

``mode: official`` runs as the code, ``mode: paper`` as the method is described:

- stage-1 level loss: official ``loss =`` inside the level loop, so only level 24's seg loss trains
  (``train.py`` 87-96); paper: summed over the levels, as stage 2;
- stage-1 V-V attention: official reads sequence-first tokens as batch-first, so each token attends over the
  batch's images (a feature depends on the other images); paper: over each image's own tokens.

Departures from the official code in both modes (README, fidelity table):

- min-max statistics: the code normalises over the test set per class; ours come from the target's validation
  images not used for training, else the training images (``methods/models/calibration.py``), applied
  by ``calibration.squash``: strictly increasing, so test values beyond that range keep their order;
- checkpoint: its log reports epoch 15 of 20, chosen among the epochs on the test set; here the last epoch;
- training data: the code trains on VisA's test split (its ``full-shot.jsonl``); ours follow the setting
  (``zero_shot_loo``: the other datasets' labelled pools; ``few_shot``, ``supervised``: the target's);
- organ word: the dataset card's (the code calls BMAD's sets "scan");
- augmentation on the resized images in [0, 1] (the code jitters colours before resizing); its own random draws;
- images whose dataset has no masks give no segmentation loss (stage 1: their anchors enter the orthogonality
  term only; stage 2: the image loss only);
- GradScaler under fp16 (the code runs fp32: its reference precision is fp32, so only a cell set to fp16 sees it).

The backbone is ViT-L-14-336 / openai at 518 px with exact GELU (its rebuild; ``quick_gelu: false`` unless the
backbone entry says otherwise), positional embeddings resized as open_clip does (identical to its code).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from benchmark import training
from benchmark.backbones.adapters import ResidualAdapter
from benchmark.backbones.attention import value_attention_block
from benchmark.backbones.cache import FeatureCache
from benchmark.backbones.clip import OPENAI_MEAN, ClipBackbone, shared_clip, to_grid
from benchmark.backbones.weights import weights_identity
from benchmark.data.loading import ImageBatch, LabelledBatch
from benchmark.errors import BenchmarkError
from benchmark.method import MethodContext, Prediction, TrainSet
from methods.aaclip import AACLIP, AACLIPParams
from methods.models import calibration
from methods.models.losses import dice_loss, focal_loss

NORMAL_STATES = ("{}", "a {}", "the {}")
ABNORMAL_STATES = ("a damaged {}", "a broken {}", "a {} with flaw", "a {} with defect", "a {} with damage")
TEMPLATES = ("{}.", "a photo of {}.")


class TextAdapters(nn.Module):
    """Residual adapters after text blocks ``1..until`` and the new projection, as one ``ModuleList`` whose names
    are its ``text_adapter``'s (``{i}.fc.0.weight``; the projection last)."""

    def __init__(self, backbone: ClipBackbone, until: int, weight: float) -> None:
        super().__init__()
        if backbone.hf_text:
            raise BenchmarkError(f"aaclip: '{backbone.spec.model}' has a BERT text tower; AA-CLIP adapts CLIP's")
        blocks = len(backbone.text_blocks)
        if until > blocks:
            raise BenchmarkError(f"aaclip: text_adapt_until {until} exceeds the {blocks} text blocks of the backbone")
        self.backbone = [backbone]  # not a submodule: the tower stays frozen and out of state_dict
        width = backbone.text_width
        projection = nn.Sequential(nn.Linear(width, backbone.embed_dim, bias=False), nn.LeakyReLU())
        nn.init.xavier_uniform_(projection[0].weight)
        self.layers = nn.ModuleList([*(ResidualAdapter(width, weight) for _ in range(until)), nn.Module()])
        self.layers[-1].fc = projection

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[P, L]`` -> ``[P, D]`` (not normalised): blocks one by one with the adapters after blocks
        ``1..until``, ``ln_final``, the EOT token, the new projection."""
        backbone = self.backbone[0]
        x = backbone.embed_text(tokens)
        adapters = self.layers[:-1]
        for index in range(1, len(backbone.text_blocks) + 1):
            x = backbone.text_block(index, x)
            if index <= len(adapters):
                x = adapters[index - 1](x)
        x = backbone.model.ln_final(x)
        return self.layers[-1].fc(x[torch.arange(len(tokens), device=x.device), backbone.text_end(tokens)])

    def anchors(self, organ: str) -> torch.Tensor:
        """``[D, 2]``: the normalised mean of the normalised normal, then abnormal, sentence embeddings."""
        columns = []
        for states in (NORMAL_STATES, ABNORMAL_STATES):
            sentences = [t.format(s.format(organ)) for s in states for t in TEMPLATES]
            embedded = F.normalize(self.encode(self.backbone[0].tokenize(sentences)), dim=-1)
            columns.append(F.normalize(embedded.mean(0), dim=-1))
        return torch.stack(columns, dim=1)


class ImageAdapters(nn.Module):
    """Residual adapters after vision blocks ``1..until``, a projection per level and the det projection (its
    ``image_adapter``: ``layer_adapters``, ``seg_proj``, ``det_proj``)."""

    def __init__(self, backbone: ClipBackbone, levels: tuple[int, ...], until: int, weight: float) -> None:
        super().__init__()
        if until > backbone.num_layers or max(levels) > backbone.num_layers:
            raise BenchmarkError(
                f"aaclip: image_adapt_until {until} or levels {list(levels)} exceed the {backbone.num_layers} "
                "vision blocks of the backbone"
            )
        width, dim = backbone.width, backbone.embed_dim
        self.levels = levels
        self.layer_adapters = nn.ModuleList(ResidualAdapter(width, weight) for _ in range(until))
        self.seg_proj = nn.ModuleList(_projection(width, dim) for _ in levels)
        self.det_proj = _projection(width, dim)

    def forward(self, backbone: ClipBackbone, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Normalised images -> each level's normalised patch features ``[B, N, D]`` and the image feature
        ``[B, D]`` (the mean of the normalised det projections, not renormalised)."""
        after: dict[int, torch.Tensor] = {}

        def record(index: int):
            def hook(x: torch.Tensor) -> torch.Tensor:
                after[index] = self.layer_adapters[index - 1](x)
                return after[index]

            return hook

        adapters = {i: record(i) for i in range(1, len(self.layer_adapters) + 1)}
        _, outputs = backbone.run_blocks(backbone.embed(images), self.levels, adapters, end=max(self.levels))
        tokens = [backbone.post_norm(after.get(ly, outputs[ly])[:, 1:]) for ly in self.levels]
        seg = [F.normalize(proj.fc(t), dim=-1) for proj, t in zip(self.seg_proj, tokens, strict=True)]
        det = F.normalize(self.det_proj.fc(tokens[-1]), dim=-1).mean(1)
        return seg, det


def _projection(width: int, dim: int) -> nn.Module:
    """Its ``SimpleProj(width, dim, relu=False)``: a bias-free linear layer (Xavier), named ``fc``."""
    module = nn.Module()
    module.fc = nn.Linear(width, dim, bias=False)
    nn.init.xavier_uniform_(module.fc.weight)
    return module


def similarity_logits(features: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """``100 f T`` of patch features ``[B, N, D]`` against anchors ``[B or 1, D, 2]`` on the grid ``[B, 2, h, w]``."""
    return to_grid(100.0 * (features @ anchors))


def seg_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``Focal(M, y) + Dice(M_n, 1 - y) + Dice(M_a, y)``, ``M = softmax(up(logits))`` (its ``calculate_seg_loss``)."""
    probs = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=True).softmax(1)
    return focal_loss(probs, masks) + dice_loss(probs[:, 0], 1 - masks.float()) + dice_loss(probs[:, 1], masks)


def gaussian_blur(maps: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """kornia's ``gaussian_blur2d`` of ``[B, h, w]`` (odd ``kernel``, reflect border), separable."""
    if kernel <= 1 or sigma <= 0:
        return maps
    half = kernel // 2
    x = torch.arange(kernel, dtype=maps.dtype, device=maps.device) - half
    weights = torch.exp(-(x**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    out = F.pad(maps[:, None], (half, half, half, half), mode="reflect")
    out = F.conv2d(F.conv2d(out, weights.view(1, 1, 1, -1)), weights.view(1, 1, -1, 1))
    return out[:, 0]


def augment(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator, colour: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Its training transforms on images ``[B, 3, S, S]`` in [0, 1] and masks ``[B, S, S]`` (see the docstring)."""
    fill = list(OPENAI_MEAN)  # its fill 0 on normalised images: the mean colour
    nearest = InterpolationMode.NEAREST

    def draw(low: float = 0.0, high: float = 1.0) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    out_images, out_masks = [], []
    for image, mask in zip(images, masks, strict=True):
        mask = mask[None].float()
        if colour:
            for adjust in (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation):
                if draw() < 0.7:
                    image = adjust(image, draw(0.5, 1.5))
        if draw() < 0.5:
            angle = draw(-30.0, 30.0)
            image = TF.rotate(image, angle, nearest, fill=fill)
            mask = TF.rotate(mask, angle, nearest, fill=[0.0])
        if draw() < 0.5:
            shift = [round(draw(-0.15, 0.15) * image.shape[-1]), round(draw(-0.15, 0.15) * image.shape[-2])]
            image = TF.affine(image, 0.0, shift, 1.0, [0.0, 0.0], nearest, fill)
            mask = TF.affine(mask, 0.0, shift, 1.0, [0.0, 0.0], nearest, [0.0])
        for flip in (TF.horizontal_flip, TF.vertical_flip):
            if draw() < 0.5:
                image, mask = flip(image), flip(mask)
        out_images.append(image)
        out_masks.append(mask[0] > 0.5)
    return torch.stack(out_images), torch.stack(out_masks)


class AACLIPImpl(AACLIP):
    def __init__(self, params: AACLIPParams, context: MethodContext) -> None:
        super().__init__(params, context)
        if params.blur_kernel % 2 == 0:
            raise BenchmarkError(f"aaclip: blur_kernel must be odd, got {params.blur_kernel}")
        spec = context.backbone
        if spec.quick_gelu is None:
            spec = dataclasses.replace(spec, quick_gelu=False)  # its CLIP(**cfg) rebuild: exact GELU
        self.backbone_spec = spec
        self.backbone = shared_clip(spec, context.image_size, context.device)
        if params.vv_blocks > self.backbone.num_layers:
            raise BenchmarkError(
                f"aaclip: vv_blocks {params.vv_blocks} exceeds the {self.backbone.num_layers} vision blocks"
            )
        self.official = params.mode == "official"
        torch.manual_seed(context.seed)
        self.text_adapters = TextAdapters(self.backbone, params.text_adapt_until, params.text_adapt_weight)
        self.image_adapters = ImageAdapters(
            self.backbone, tuple(params.levels), params.image_adapt_until, params.image_adapt_weight
        )
        self.text_adapters.to(context.device)
        self.image_adapters.to(context.device)
        self.cache = context.cache if params.cache_features else FeatureCache(None)
        self.recipe = {
            "features": "aaclip-stage1-v1",
            "backbone": spec.label(),
            "quick_gelu": spec.quick_gelu,
            "weights_file": weights_identity(spec.weights),
            "image_size": context.image_size,
            "levels": list(params.levels),
            "vv_blocks": params.vv_blocks,
        }
        self.anchor: torch.Tensor | None = None
        self.stats: calibration.Stats = {}
        self.history: list[float] = []  # stage 2
        self.text_history: list[float] = []  # stage 1

    # ----- stage 1: frozen V-V patch features -----
    @torch.no_grad()
    def stage1_encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per level ``normalize(ln_post(tok) proj) + normalize(image embedding)`` ``[B, N, D]`` (not renormalised),
        the tokens from the V-V CLIP (its ``clip_surgery``), the image embedding from the plain one."""
        backbone, levels = self.backbone, self.params.levels
        x = backbone.embed(backbone.normalize(images))
        first = backbone.num_layers - self.params.vv_blocks + 1
        block = value_attention_block(across_batch=self.official)
        overrides = dict.fromkeys(range(first, backbone.num_layers + 1), block)
        _, outputs = backbone.run_blocks(x, levels, overrides=overrides)
        embedding = F.normalize(backbone.pool(backbone.run_blocks(x)[0]), dim=-1)[:, None]
        tokens = {ly: F.normalize(backbone.project_tokens(outputs[ly][:, 1:]), dim=-1) for ly in levels}
        return {f"level{ly}": t + embedding for ly, t in tokens.items()}

    def stage1_features(self, images: torch.Tensor, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Cached per image in paper mode; official features depend on the whole batch, so they are computed on it
        whole (the cache would compute them in chunks)."""
        if self.official:
            return self.stage1_encode(images.to(self.context.device))
        return self.cache.cached(self.recipe, keys, images.to(self.context.device), self.stage1_encode)

    def stage1_loss(
        self, features: dict[str, torch.Tensor], anchors: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor
    ) -> torch.Tensor:
        """Official: the last level's seg loss (its ``loss =`` in the level loop); paper: their sum; over the
        images with masks; plus ``orth_weight (mean_b <t_n, t_a>)^2`` over the batch."""
        loss = self.params.orth_weight * (anchors[:, :, 0] * anchors[:, :, 1]).sum(-1).mean() ** 2
        if has_mask.any():
            for ly in self.params.levels[-1:] if self.official else self.params.levels:
                logits = similarity_logits(features[f"level{ly}"][has_mask], anchors[has_mask])
                loss = loss + seg_loss(logits, masks[has_mask])
        return loss

    # ----- stage 2 -----
    def stage2_loss(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        masks: torch.Tensor,
        anchors: torch.Tensor,
        has_mask: torch.Tensor,
    ) -> torch.Tensor:
        """``CE(det T, label)`` on raw cosines + the seg loss summed over the levels (images with masks)."""
        seg, det = self.image_adapters(self.backbone, self.backbone.normalize(images))
        loss = F.cross_entropy((det[:, None] @ anchors)[:, 0], labels.long())
        if has_mask.any():
            for features in seg:
                loss = loss + seg_loss(similarity_logits(features[has_mask], anchors[has_mask]), masks[has_mask])
        return loss

    def fit(self, train: TrainSet) -> None:
        p, device = self.params, self.context.device
        specs = {s.path: train.datasets[s.dataset] for s in train.samples}
        generator = torch.Generator().manual_seed(self.context.seed)

        def prepared(batch: LabelledBatch, colour: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            flags = torch.tensor([specs[path].masks for path in batch.paths], device=device)
            images, masks = batch.images, batch.masks
            if p.augment:
                images, masks = augment(images, masks, generator, colour)
            return images.to(device), masks.to(device), flags

        def stage1_step(batch: LabelledBatch) -> torch.Tensor:
            organs = [specs[path].organ for path in batch.paths]
            anchors = {organ: self.text_adapters.anchors(organ) for organ in dict.fromkeys(organs)}
            stacked = torch.stack([anchors[o] for o in organs])
            images, masks, flags = prepared(batch, colour=False)
            # augmented images have no cache entry; the official features depend on the whole batch
            features = self.stage1_encode(images) if p.augment else self.stage1_features(images, batch.keys)
            return self.stage1_loss(features, stacked, masks, flags)

        config = training.TrainConfig(epochs=p.text_epochs, lr=p.text_lr, betas=(0.5, 0.999), progress=p.progress)
        if p.text_epochs:
            self.text_adapters.train()
            self.text_history = training.fit(
                self.text_adapters.parameters(),
                stage1_step,
                lambda _epoch: train.batches(p.text_batch_size, generator),
                config,
                device,
                desc=f"aaclip text {self.context.dataset.name}",
            )
        with torch.no_grad():
            organs = {s.organ for s in train.datasets.values()} | {self.context.dataset.organ}
            frozen = {organ: self.text_adapters.anchors(organ) for organ in organs}
        self.anchor = frozen[self.context.dataset.organ]

        def stage2_step(batch: LabelledBatch) -> torch.Tensor:
            images, masks, flags = prepared(batch, colour=True)
            anchors = torch.stack([frozen[specs[path].organ] for path in batch.paths])
            return self.stage2_loss(images, batch.labels.to(device), masks, anchors, flags)

        def lr_at(epoch: int, index: int, count: int) -> float:
            step = epoch * count + index
            return p.image_lr * 0.5 ** sum(step >= m for m in p.lr_milestones)

        config = dataclasses.replace(config, epochs=p.image_epochs, lr=p.image_lr)
        steps = math.ceil(len(train) / p.image_batch_size)
        self.image_adapters.train()
        self.history = training.fit(
            self.image_adapters.parameters(),
            stage2_step,
            lambda _epoch: training.Counted(train.batches(p.image_batch_size, generator), steps),
            config,
            device,
            desc=f"aaclip image {self.context.dataset.name}",
            lr_at=lr_at,
        )
        self.text_adapters.eval()
        self.image_adapters.eval()
        calibrate = train.subset(train.valid) if train.valid else train
        outputs = [self.raw_map(batch.images.to(device)).cpu() for batch in calibrate.batches(16)]
        self.stats = calibration.minmax({"map": outputs})

    # ----- test -----
    @torch.no_grad()
    def raw_map(self, images: torch.Tensor) -> torch.Tensor:
        """``sum_l up(blur((G_a + 1 - G_n) / 2))`` ``[B, S, S]`` (its ``test.py``)."""
        p = self.params
        seg, _ = self.image_adapters(self.backbone, self.backbone.normalize(images))
        total = 0
        for features in seg:
            logits = similarity_logits(features, self.anchor[None])
            level = gaussian_blur((logits[:, 1] + 1 - logits[:, 0]) / 2, p.blur_kernel, p.blur_sigma)
            total = total + F.interpolate(level[:, None], size=images.shape[-2:], mode="bilinear", align_corners=True)
        return total[:, 0]

    @torch.no_grad()
    def predict(self, batch: ImageBatch) -> Prediction:
        maps = calibration.squash(self.raw_map(batch.images.to(self.context.device)), self.stats["map"])
        return Prediction(maps.flatten(1).amax(-1), maps)

    def curves(self) -> dict[str, list[float]]:
        return {"train_loss": list(self.history), "text_train_loss": list(self.text_history)}

    def describe(self) -> dict[str, object]:
        trainable = sum(q.numel() for m in (self.text_adapters, self.image_adapters) for q in m.parameters())
        return {
            "variant": f"AA-CLIP ({self.params.mode})",
            "mode": self.params.mode,
            "trainable_params": trainable,
            "backbone": self.backbone_spec.label(),
            "final_train_loss": round(self.history[-1], 6) if self.history else float("nan"),
        }
