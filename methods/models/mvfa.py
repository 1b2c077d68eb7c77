"""MVFA: multi-level visual feature adaptation and comparison (Huang et al., CVPR 2024; MVFA-AD code).

Model (paper Sec. 4, Eq. 1-2; official ``CLIP/adapter.py``): a seg and a det bottleneck adapter after each
of the ViT blocks 6, 12, 18, 24 (ViT-L/14), bottleneck = the text embedding width (768), mixed back as
``0.8 x + 0.1 seg(x) + 0.1 det(x)`` (Eq. 2 with gamma = 0.1 per adapter). The bottleneck features of each
level are compared with the text features ``[t_normal, t_anomalous]`` (normalised, logit scale 100).
Text (Fig. 7, official ``encode_text_with_prompt_ensemble``): 7 normal states, 35 templates, the organ word
of the sample's own dataset; embeddings normalised, averaged, renormalised. Loss (Eq. 3): Focal + Dice on
the upsampled two-class softmax seg maps (datasets with masks), BCE on the det branch; summed over levels.
Test (Eq. 4-6): zero-shot branch against text, few-shot branch against a memory bank of the normal training
images' features (cosine distance), fused with beta1 = beta2 = 0.5.

``mode: official`` follows the code, ``mode: paper`` the paper, where they differ:

| point | official (MVFA-AD) | paper |
| --- | --- | --- |
| input | resize, no mean/std normalisation | CLIP normalisation |
| OpenAI weights | exact GELU (its rebuild at 240 px) | QuickGELU, as trained |
| anomalous states | 5 (adds 'broken') | 4 (Fig. 7) |
| adapter activations | LeakyReLU after both linears | ReLU after the first (Eq. 1) |
| det loss | BCE-with-logits on the *mean* patch probability | BCE on the *max* patch probability |
| seg maps | logits upsampled, then softmax | softmax, then upsampled (Eq. 4) |
| training data | each K-shot image augmented 11x (4 rotations, 4 shifts, 2 flips) | as given |
| optimiser | Adam, betas (0.5, 0.999), batch 1, lr 1e-3 (1e-4 zero-shot) | Adam, batch 16, lr 1e-3 |
| memory bank | augmented normal images, [CLS] token included | normal images' patch tokens |
| level fusion | sums over levels | means over levels (Eq. 4-5) |
| image score | max of the fused map (mask datasets); mean-based det scores otherwise | Eq. 4-6 (max over patches) |
| branch fusion | each branch min-max normalised over the test set, then 0.5/0.5 | Eq. 6 |
| checkpoint | best epoch on the test set | (unstated) |

The harness forbids test-set statistics, so ``official`` takes the min-max statistics and the best epoch
(image AUROC + pixel AUROC, as the code) on the target's validation images not used for training; without
them (``zero_shot_loo``, or no ``valid/``) it takes the statistics on the training images and the last epoch.
``paper`` evaluates the last epoch; its fused scores are divided by ``beta1 + 2 beta2`` = 1.5 (the cosine
distance lies in [0, 2]) so that maps are in [0, 1] as the harness requires; rankings are unchanged. The
paper's last-level projector P is the level-4 adapter's bottleneck in both modes, as in the code. Zero-shot
training uses the other datasets' labelled pools (the code trains on their test splits).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from benchmark import training
from benchmark.backbones.adapters import DualAdapters
from benchmark.backbones.cache import FeatureCache
from benchmark.backbones.clip import ClipBackbone, shared_clip
from benchmark.data.loading import ImageBatch, LabelledBatch
from benchmark.errors import BenchmarkError
from benchmark.importers import load_mapped, tensors_of
from benchmark.method import MethodContext, Prediction, TrainSet
from methods.models import calibration
from methods.models.losses import dice_loss, focal_loss
from methods.models.winclip import ANOMALOUS_STATES as WINCLIP_ANOMALOUS_STATES
from methods.models.winclip import NORMAL_STATES
from methods.mvfa import MVFA, MVFAParams

# Fig. 7's state words are WinCLIP's compositional states [26]; the official code adds 'broken {}'.
ANOMALOUS_STATES = {
    "official": ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"),
    "paper": WINCLIP_ANOMALOUS_STATES,
}
TEMPLATES = (
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of my {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)


ANGLES = (-math.pi / 8, -math.pi / 16, math.pi / 16, math.pi / 8)
SHIFTS = ((0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))
VIEWS = 1 + len(ANGLES) + len(SHIFTS) + 2


def rotate_shift(x: torch.Tensor, angle: float = 0.0, shift: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    theta = torch.tensor(
        [[math.cos(angle), -math.sin(angle), shift[0]], [math.sin(angle), math.cos(angle), shift[1]]],
        dtype=x.dtype,
        device=x.device,
    ).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)


def view(x: torch.Tensor, index: int) -> torch.Tensor:
    """The ``index``-th of the official few-shot views of ``x`` ``[B, C, H, W]``: the original, rotations by
    +-pi/8 and +-pi/16, shifts by (+-0.1, +-0.1) of the half-width (reflection padding), horizontal and vertical
    flips."""
    if index == 0:
        return x
    if index <= len(ANGLES):
        return rotate_shift(x, angle=ANGLES[index - 1])
    if index <= len(ANGLES) + len(SHIFTS):
        return rotate_shift(x, shift=SHIFTS[index - 1 - len(ANGLES)])
    return x.flip(-1 if index == VIEWS - 2 else -2)


def augment(images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official 11x few-shot augmentation (``view`` 0..10; masks likewise and re-binarised at 0.5)."""
    m = masks.unsqueeze(1).to(images.dtype)
    return torch.cat([view(images, v) for v in range(VIEWS)]), torch.cat([view(m, v) for v in range(VIEWS)])[:, 0] > 0.5


class MVFAModel(nn.Module):
    """Frozen CLIP ViT with dual adapters at ``layers``; gives each level's seg and det features."""

    def __init__(
        self,
        backbone: ClipBackbone,
        layers=(6, 12, 18, 24),
        bottleneck: int = 0,
        gamma: float = 0.1,
        activation: str = "leaky_relu",
        normalize_input: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.layers = tuple(layers)
        self.normalize_input = normalize_input
        self.adapters = DualAdapters(self.layers, backbone.width, bottleneck or backbone.embed_dim, gamma, activation)
        self.grid = backbone.grid_size

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Seg and det bottleneck features of every level, ``[B, 1 + N, D]`` each ([CLS] first)."""
        x = self.backbone.normalize(images) if self.normalize_input else images
        self.backbone.run_blocks(self.backbone.embed(x), adapters=self.adapters.hooks(), end=max(self.layers))
        return self.adapters.seg_features, self.adapters.det_features

    @staticmethod
    def text_probs(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Two-class logits ``100 cos(f, t)`` of patch features ``[B, N, D]`` against ``text`` ``[B or 1, 2, D]``."""
        return 100.0 * F.normalize(features, dim=-1) @ text.transpose(-1, -2)

    def to_grid(self, values: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` patch values -> ``[B, C, h, w]``."""
        return values.transpose(1, 2).reshape(values.shape[0], -1, *self.grid)


def text_features(backbone: ClipBackbone, organ: str, mode: str, cache: FeatureCache | None = None) -> torch.Tensor:
    """``[2, D]``: normalised mean of the normalised prompt embeddings, normal then anomalous (Fig. 7); each
    ensemble encoded once per text tower with a ``cache``."""
    states = (NORMAL_STATES, ANOMALOUS_STATES[mode])
    rows = []
    for group in states:
        prompts = [t.format(s.format(organ)) for s in group for t in TEMPLATES]
        rows.append(F.normalize(backbone.encode_prompts(prompts, cache).mean(0), dim=-1))
    return torch.stack(rows)


def min_cos_distance(features: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """``min_m (1 - cos(f, m))`` for features ``[B, N, D]`` against memory ``[M, D]``."""
    return (1 - F.normalize(features, dim=-1) @ F.normalize(memory, dim=-1).T).amin(-1)


OFFICIAL_NAMES = {"fc1.0.weight": "down.weight", "fc2.0.weight": "up.weight"}  # its ClipAdapter -> ours


class MVFAImpl(MVFA):
    def __init__(self, params: MVFAParams, context: MethodContext) -> None:
        super().__init__(params, context)
        if params.mode not in ANOMALOUS_STATES:
            raise ValueError(f"mvfa: mode must be 'official' or 'paper', got '{params.mode}'")
        self.official = params.mode == "official"
        spec = context.backbone
        if self.official and spec.quick_gelu is None:
            spec = dataclasses.replace(spec, quick_gelu=False)
        self.backbone_spec = spec
        backbone = shared_clip(spec, context.image_size, context.device)
        torch.manual_seed(context.seed)
        self.model = MVFAModel(
            backbone,
            params.layers,
            params.bottleneck,
            params.gamma,
            "leaky_relu" if self.official else "relu",
            normalize_input=not self.official,
        )
        self.model.adapters.to(context.device)
        self.text_cache: dict[str, torch.Tensor] = {}
        self.memory: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self.stats: dict[str, tuple[float, float]] = {}
        self.history: list[float] = []
        self.selected_epoch: int | None = None

    # ----- text -----
    def text(self, organ: str) -> torch.Tensor:
        if organ not in self.text_cache:
            with torch.no_grad():
                self.text_cache[organ] = text_features(self.model.backbone, organ, self.params.mode, self.context.cache)
        return self.text_cache[organ]

    # ----- training -----
    def loss(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        masks: torch.Tensor,
        text: torch.Tensor,
        has_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Eq. 3 summed over levels; the seg terms only for images whose dataset has masks."""
        seg, det = self.model(images)
        size = images.shape[-2:]
        total = images.new_zeros(())
        for seg_l, det_l in zip(seg, det, strict=True):
            logits = self.model.text_probs(det_l[:, 1:], text)
            if self.official:
                probs = logits.softmax(-1)[..., 1]
                total = total + F.binary_cross_entropy_with_logits(probs.mean(-1), labels.float())
            else:  # BCE on max_G softmax = sigmoid(max_G of the logit difference): exact, no saturation
                margin = (logits[..., 1] - logits[..., 0]).amax(-1)
                total = total + F.binary_cross_entropy_with_logits(margin, labels.float())
            if has_mask.any():
                logits = self.model.to_grid(self.model.text_probs(seg_l[has_mask, 1:], text[has_mask]))
                if self.official:
                    maps = F.interpolate(logits, size=size, mode="bilinear", align_corners=True).softmax(1)
                else:
                    maps = F.interpolate(logits.softmax(1), size=size, mode="bilinear", align_corners=True)
                target = masks[has_mask]
                total = total + focal_loss(maps, target) + dice_loss(maps[:, 1], target)
        return total

    @staticmethod
    def _augmented(train: TrainSet) -> LabelledBatch:
        """Official few-shot/supervised training data: every image 11x augmented (``augment``)."""
        full = train.load()
        images, masks = augment(full.images, full.masks)
        return LabelledBatch(images, (), full.labels.repeat(11), masks, tuple(full.paths) * 11)

    @staticmethod
    def _shuffled(data: LabelledBatch, generator: torch.Generator, batch_size: int) -> list[LabelledBatch]:
        order = torch.randperm(len(data.labels), generator=generator).tolist()
        return [
            LabelledBatch(data.images[idx], (), data.labels[idx], data.masks[idx], tuple(data.paths[i] for i in idx))
            for idx in (order[i : i + batch_size] for i in range(0, len(order), batch_size))
        ]

    def fit(self, train: TrainSet) -> None:
        p = self.params
        device = self.context.device
        zero_shot = train.setting == "zero_shot_loo"
        lr = p.lr or (1e-4 if self.official and zero_shot else 1e-3)
        batch_size = p.batch_size or (1 if self.official else 16)
        self.used = {"lr": lr, "batch_size": batch_size}
        config = training.TrainConfig(
            epochs=p.epochs, lr=lr, betas=(0.5, 0.999) if self.official else (0.9, 0.999), progress=p.progress
        )
        dataset_of = {s.path: s.dataset for s in train.samples}
        generator = torch.Generator().manual_seed(self.context.seed)
        augmented = self._augmented(train) if self.official and not zero_shot else None

        def epoch_batches(_epoch: int):
            if augmented is not None:
                return self._shuffled(augmented, generator, batch_size)
            return train.batches(batch_size, generator)

        def step(batch: LabelledBatch) -> torch.Tensor:
            specs = [train.datasets[dataset_of[path]] for path in batch.paths]
            text = torch.stack([self.text(s.organ) for s in specs])
            has_mask = torch.tensor([s.masks for s in specs], device=device)
            return self.loss(batch.images.to(device), batch.labels.to(device), batch.masks.to(device), text, has_mask)

        select = self.official and p.select_on_valid and len({s.label for s in train.valid}) == 2
        valid = self._batches(train, train.valid) if select else []
        memory_images = self._memory_images(train, augmented)
        best: dict = {"score": -math.inf}

        def on_epoch_end(epoch: int, _loss: float) -> None:
            if not valid:
                return
            self._build_memory(memory_images)
            score = self._calibrate_and_score(valid)
            if score > best["score"]:
                best.update(
                    score=score,
                    epoch=epoch,
                    state=copy.deepcopy(self.model.adapters.state_dict()),
                    memory=self.memory,
                    stats=dict(self.stats),
                )

        self.model.adapters.train()
        self.history = training.fit(
            self.model.adapters.parameters(),
            step,
            epoch_batches,
            config,
            device,
            desc=f"mvfa {self.context.dataset.name}",
            on_epoch_end=on_epoch_end,
        )
        self.model.adapters.eval()
        if valid and "state" in best:
            self.model.adapters.load_state_dict(best["state"])
            self.memory, self.stats, self.selected_epoch = best["memory"], best["stats"], best["epoch"]
            return
        self._complete(train, memory_images)

    def _complete(self, train: TrainSet, memory_images: torch.Tensor | None) -> None:
        """The memory bank (Eq. 5) and, in official mode, the score statistics on the calibration images."""
        self._build_memory(memory_images)
        if self.official:
            zero_shot = train.setting == "zero_shot_loo"
            self._calibrate_and_score(
                self._batches(train, train.samples if zero_shot else train.valid or train.samples)
            )

    def import_official(self, state: dict, where: str) -> None:
        """Its ``train_few.py``/``train_zero.py``: ``torch.save({'seg_adapters': ..., 'det_adapters': ...})``, each
        ``{i}.fc1.0.weight`` ``[bottleneck, width]`` and ``{i}.fc2.0.weight`` ``[width, bottleneck]`` for the
        adapter after block ``--features_list[i]``: our ``seg.{i}.down``/``seg.{i}.up`` (and ``det``)."""
        if not self.official:
            raise BenchmarkError(f"{where}: its files are of MVFA's official code; this entry has mode: paper")
        mapped, origin = {}, {}
        for head in ("seg", "det"):
            for key, tensor in tensors_of(state, where, f"{head}_adapters").items():
                index, _, rest = key.removeprefix("module.").partition(".")
                ours = f"{head}.{index}.{OFFICIAL_NAMES.get(rest, rest)}"
                mapped[ours], origin[ours] = tensor, f"{head}_adapters.{key}"
        load_mapped(self.model.adapters, mapped, origin, where, "MVFA's adapters")
        self.model.adapters.eval()

    def complete_import(self, train: TrainSet) -> None:
        """Its test scripts: the memory of the K normal images 11x augmented (few-shot); the score statistics ours
        (its test code min-max normalises over the test set itself)."""
        zero_shot = train.setting == "zero_shot_loo"
        augmented = self._augmented(train) if self.official and not zero_shot else None
        self._complete(train, self._memory_images(train, augmented))

    # ----- memory bank and scores -----
    @staticmethod
    def _batches(train: TrainSet, samples) -> list[LabelledBatch]:
        """Samples loaded once into batches, decoded as the cell's (validation and calibration images are reused
        every epoch)."""
        return list(train.subset(tuple(samples)).batches(16))

    @staticmethod
    def _memory_images(train: TrainSet, augmented: LabelledBatch | None) -> torch.Tensor | None:
        """Eq. 5's memory images: the normal target images (official: their 11x augmentations, which
        ``augmented`` already holds); none in zero_shot_loo."""
        if train.setting == "zero_shot_loo" or not train.normal:
            return None
        if augmented is not None:
            return augmented.images[augmented.labels == 0]
        return train.subset(train.normal).load().images

    @torch.no_grad()
    def _build_memory(self, images: torch.Tensor | None) -> None:
        """Encode the memory images with the current adapters (Eq. 5); no memory without images."""
        self.memory = None
        if images is None:
            return
        seg_mem: list[list[torch.Tensor]] = [[] for _ in self.params.layers]
        det_mem: list[list[torch.Tensor]] = [[] for _ in self.params.layers]
        for start in range(0, len(images), 16):
            seg, det = self.model(images[start : start + 16].to(self.context.device))
            for level, (s, d) in enumerate(zip(seg, det, strict=True)):
                keep = slice(0, None) if self.official else slice(1, None)  # official keeps [CLS]
                seg_mem[level].append(s[:, keep].flatten(0, 1))
                det_mem[level].append(d[:, keep].flatten(0, 1))
        self.memory = ([torch.cat(m) for m in seg_mem], [torch.cat(m) for m in det_mem])

    @torch.no_grad()
    def raw(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unfused branch outputs: zero-shot and few-shot maps ``[B,S,S]`` and image scores ``[B]``."""
        seg, det = self.model(images)
        size = images.shape[-2:]
        text = self.text(self.context.dataset.organ).unsqueeze(0)
        up = lambda t: F.interpolate(t, size=size, mode="bilinear", align_corners=True)  # noqa: E731
        zero_maps, zero_img, few_maps, few_img = [], [], [], []
        for level, (seg_l, det_l) in enumerate(zip(seg, det, strict=True)):
            logits = self.model.to_grid(self.model.text_probs(seg_l[:, 1:], text))
            zero_maps.append(up(logits).softmax(1)[:, 1] if self.official else up(logits.softmax(1))[:, 1])
            det_probs = self.model.text_probs(det_l[:, 1:], text).softmax(-1)[..., 1]
            zero_img.append(det_probs.mean(-1) if self.official else det_probs.amax(-1))
            if self.memory is not None:
                seg_dist = min_cos_distance(seg_l[:, 1:], self.memory[0][level]).unsqueeze(-1)
                det_dist = min_cos_distance(det_l[:, 1:], self.memory[1][level])
                few_maps.append(up(self.model.to_grid(seg_dist))[:, 0])
                few_img.append(
                    up(self.model.to_grid(det_dist.unsqueeze(-1)))[:, 0].flatten(1).mean(-1)
                    if self.official
                    else det_dist.amax(-1)
                )
        reduce = (lambda xs: torch.stack(xs).sum(0)) if self.official else (lambda xs: torch.stack(xs).mean(0))
        out = {"map_zero": reduce(zero_maps), "img_zero": reduce(zero_img)}
        if few_maps:
            out |= {"map_few": reduce(few_maps), "img_few": reduce(few_img)}
        return out

    def combine(self, raw: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 6 (paper) or the official normalise-and-fuse; image scores ``[B]`` and maps in [0, 1]."""
        b = self.params.beta
        if not self.official:
            if "map_few" not in raw:
                return raw["img_zero"], raw["map_zero"]
            scale = b + 2 * (1 - b)
            return (
                (b * raw["img_zero"] + (1 - b) * raw["img_few"]) / scale,
                (b * raw["map_zero"] + (1 - b) * raw["map_few"]) / scale,
            )
        norm = {k: calibration.scale(v, self.stats[k]) for k, v in raw.items()}
        if "map_few" in norm:
            maps = b * norm["map_zero"] + (1 - b) * norm["map_few"]
            image = b * norm["img_zero"] + (1 - b) * norm["img_few"]
        else:
            maps, image = norm["map_zero"], norm["img_zero"]
        if self.context.dataset.masks and "map_few" in norm:
            image = maps.flatten(1).amax(-1)  # official: image score = max of the fused map
        return image, maps

    def _calibrate_and_score(self, batches: list[LabelledBatch]) -> float:
        """Official mode: min-max statistics of each raw output on ``batches``; returns their AUROC sum."""
        outputs: dict[str, list[torch.Tensor]] = {}
        for batch in batches:
            for k, v in self.raw(batch.images.to(self.context.device)).items():
                outputs.setdefault(k, []).append(v.cpu())
        self.stats = calibration.minmax(outputs)
        combined = (
            (*self.combine({k: v[i].to(self.context.device) for k, v in outputs.items()}), batch.labels, batch.masks)
            for i, batch in enumerate(batches)
        )
        return calibration.selection_score(combined, self.context.dataset.masks)

    def predict(self, batch: ImageBatch) -> Prediction:
        image, maps = self.combine(self.raw(batch.images.to(self.context.device)))
        return Prediction(image.clamp(0, 1), maps.clamp(0, 1))

    def effective_params(self) -> dict[str, object]:
        bottleneck = self.params.bottleneck or self.model.adapters.seg[0].down.out_features
        return {**super().effective_params(), "bottleneck": bottleneck, **getattr(self, "used", {})}

    def describe(self) -> dict[str, object]:
        trainable = sum(p.numel() for p in self.model.adapters.parameters())
        return {
            "variant": f"MVFA ({self.params.mode})",
            "mode": self.params.mode,
            "trainable_params": trainable,
            "backbone": self.backbone_spec.label(),
            "memory_bank": "none" if self.memory is None else int(self.memory[0][0].shape[0]),
            "selected_epoch": self.selected_epoch if self.selected_epoch is not None else "last",
            "final_train_loss": round(self.history[-1], 6) if self.history else float("nan"),
        }
