"""WinCLIP and WinCLIP+ (Jeong et al., CVPR 2023): zero-/few-normal-shot anomaly detection with CLIP.

Formulas (WinCLIP paper numbering):

- Compositional prompt ensemble (Sec. 4.1): 7 normal and 4 anomalous state words with the dataset's organ
  word, each under every template; the prompt embeddings of a state are L2-normalised, averaged and
  normalised again (anomalib averages unnormalised embeddings; cosine similarity makes the last step moot).
- Zero-shot score (Eq. 1): ``softmax(cos(f, [t_n, t_a]) / 0.07)[anomalous]`` for an embedding ``f``.
- Window embeddings (Sec. 4.2): for each scale s in (2, 3) and each s x s window of patches (stride one
  patch), the tokens entering block 1 at [CLS] and the window's positions (their positional embeddings
  kept) are run through the whole transformer; ln_post and the projection of [CLS] give the window's
  embedding, exactly as anomalib's ``_get_window_embeddings``.
- Harmonic aggregation (Eq. 3): a patch's score at a scale is the harmonic mean of the scores of the
  windows that cover it; the zero-shot map is the harmonic mean over the image-level scale and the window
  scales.
- WinCLIP+ (Eq. 4-5): a reference memory of the normal images' patch tokens and window embeddings; a test
  feature's score is ``min (1 - cos) / 2`` over the memory; maps are averaged over scales; the final map is
  the mean of the zero-shot and few-shot maps, the image score ``(zero-shot score + max few-shot map) / 2``.

Reference and test images go through the same normalisation (anomalib's reference path appears not to).
The template list is the paper's 22. anomalib's copy has 21: it lacks "a cropped photo of a {}." and
"a jpeg corrupted photo of a {}.", and lists "a jpeg corrupted photo of the {}." twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.backbones.cache import FeatureCache
from benchmark.backbones.clip import ClipBackbone, shared_clip
from benchmark.backbones.weights import weights_identity
from benchmark.data.loading import ImageBatch
from benchmark.method import MethodContext, Prediction, TrainSet
from methods.winclip import WinCLIP, WinCLIPParams

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)


def prompt_ensemble(organ: str) -> tuple[list[str], list[str]]:
    """Normal and anomalous prompts: every state word with ``organ`` under every template."""
    normal = [t.format(s.format(organ)) for s in NORMAL_STATES for t in TEMPLATES]
    anomalous = [t.format(s.format(organ)) for s in ANOMALOUS_STATES for t in TEMPLATES]
    return normal, anomalous


def window_masks(grid: tuple[int, int], scale: int, stride: int = 1) -> torch.Tensor:
    """Patch indices (row-major) of every ``scale x scale`` window, ``[n_windows, scale * scale]``."""
    h, w = grid
    if scale > min(h, w):
        raise ValueError(f"window scale {scale} exceeds the {h}x{w} patch grid")
    index = torch.arange(h * w).view(h, w)
    windows = index.unfold(0, scale, stride).unfold(1, scale, stride)
    return windows.reshape(-1, scale * scale)


def harmonic_aggregation(window_scores: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Eq. 3: each patch gets the harmonic mean of the scores of the windows covering it, ``[B, H, W]``."""
    n_patches = grid[0] * grid[1]
    cover = torch.zeros(masks.shape[0], n_patches, dtype=window_scores.dtype, device=window_scores.device)
    cover.scatter_(1, masks.to(window_scores.device), 1.0)
    reciprocal = (1.0 / window_scores.clamp_min(1e-12)) @ cover
    out = cover.sum(0) / reciprocal
    return out.nan_to_num(0.0).view(-1, *grid)


def visual_association(features: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """Eq. 4: ``min_m (1 - cos(f, m)) / 2`` for each feature ``[B, n, D]`` against memory ``[M, D]``."""
    f = F.normalize(features, dim=-1)
    m = F.normalize(memory, dim=-1)
    return ((1.0 - f @ m.T).amin(dim=-1) / 2.0).clamp_(0.0, 1.0)


class WinClipModel(nn.Module):
    """WinCLIP's scoring over a frozen ``ClipBackbone``; ``encode`` gives the cacheable per-image features."""

    def __init__(self, backbone: ClipBackbone, scales: tuple[int, ...] = (2, 3), temperature: float = 0.07) -> None:
        super().__init__()
        self.backbone = backbone
        self.scales = tuple(scales)
        self.temperature = temperature
        self.grid = backbone.grid_size
        for s in self.scales:
            self.register_buffer(f"windows_{s}", window_masks(self.grid, s), persistent=False)
        self.register_buffer("text", torch.zeros(2, backbone.embed_dim), persistent=False)
        self.memory: dict[str, torch.Tensor] | None = None

    def windows(self, scale: int) -> torch.Tensor:
        return getattr(self, f"windows_{scale}")

    @torch.no_grad()
    def set_text(self, organ: str, cache: FeatureCache | None = None) -> None:
        """The normal and anomalous ensembles' mean embeddings (each ensemble encoded once with a ``cache``)."""
        normal, anomalous = prompt_ensemble(organ)
        states = [self.backbone.encode_prompts(p, cache).mean(0) for p in (normal, anomalous)]
        self.text = F.normalize(torch.stack(states), dim=-1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images in [0,1] -> image embedding, patch tokens and window embeddings of every scale."""
        tokens = self.backbone.embed(self.backbone.normalize(images))
        last, _ = self.backbone.run_blocks(tokens)
        out = {"image": self.backbone.pool(last), "patches": self.backbone.post_norm(last[:, 1:])}
        b = tokens.shape[0]
        for s in self.scales:
            masks = self.windows(s)
            index = torch.cat([torch.zeros_like(masks[:, :1]), masks + 1], dim=1)  # [CLS] + window tokens
            seqs = tokens[:, index]  # [B, n_windows, 1 + s*s, width]
            x, _ = self.backbone.run_blocks(seqs.flatten(0, 1))
            out[f"windows_{s}"] = self.backbone.pool(x).view(b, masks.shape[0], -1)
        return out

    def text_scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Eq. 1: probability of the anomalous state."""
        logits = F.normalize(embeddings, dim=-1) @ self.text.T / self.temperature
        return logits.softmax(dim=-1)[..., 1]

    def set_memory(self, features: dict[str, torch.Tensor]) -> None:
        """WinCLIP+ reference memory from the encoded normal reference images."""
        self.memory = {name: value.flatten(0, -2) for name, value in features.items() if name != "image"}

    def zero_shot(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.text_scores(features["image"])
        maps = [image.view(-1, 1, 1).expand(-1, *self.grid)]
        for s in self.scales:
            maps.append(harmonic_aggregation(self.text_scores(features[f"windows_{s}"]), self.windows(s), self.grid))
        stacked = torch.stack(maps)
        return image, len(maps) / (1.0 / stacked.clamp_min(1e-12)).sum(0)

    def few_shot(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.memory is not None
        maps = [visual_association(features["patches"], self.memory["patches"]).view(-1, *self.grid)]
        for s in self.scales:
            scores = visual_association(features[f"windows_{s}"], self.memory[f"windows_{s}"])
            maps.append(harmonic_aggregation(scores, self.windows(s), self.grid))
        return torch.stack(maps).mean(0)

    def score(self, features: dict[str, torch.Tensor], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores ``[B]`` and anomaly maps ``[B, *size]`` in [0,1]."""
        image, patch_map = self.zero_shot(features)
        if self.memory is not None:
            few = self.few_shot(features)
            patch_map = (patch_map + few) / 2.0
            image = (image + few.flatten(1).amax(1)) / 2.0
        maps = F.interpolate(patch_map.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        return image.clamp(0.0, 1.0), maps.squeeze(1).clamp(0.0, 1.0)


class WinCLIPImpl(WinCLIP):
    def __init__(self, params: WinCLIPParams, context: MethodContext) -> None:
        super().__init__(params, context)
        backbone = shared_clip(context.backbone, context.image_size, context.device)
        self.model = WinClipModel(backbone, params.scales, params.temperature).to(context.device)
        self.model.set_text(context.dataset.organ, context.cache)
        weights = context.backbone.weights
        self.recipe = {
            "features": "winclip-v1",
            "backbone": context.backbone.label(),
            "weights_file": weights_identity(weights),
            "image_size": context.image_size,
            "scales": list(params.scales),
        }
        self.references = 0

    def _features(self, images: torch.Tensor, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return self.context.cache.cached(self.recipe, keys, images.to(self.context.device), self.model.encode)

    def fit(self, train: TrainSet) -> None:
        # zero_shot_loo's training images come from other datasets: they are never references.
        if self.context.setting == "zero_shot_loo" or not self.params.reference_images or not train.normal:
            return
        parts = []
        for batch in train.subset(train.normal).batches(self.params.batch_size):
            parts.append(self._features(batch.images, batch.keys))
        memory = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        self.model.set_memory(memory)
        self.references = len(train.normal)

    def predict(self, batch: ImageBatch) -> Prediction:
        features = self._features(batch.images, batch.keys)
        scores, maps = self.model.score(features, tuple(batch.images.shape[-2:]))
        return Prediction(scores, maps)

    def describe(self) -> dict[str, object]:
        return {"variant": "WinCLIP+" if self.references else "WinCLIP", "reference_images": self.references}
