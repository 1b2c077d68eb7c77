"""MadCLIP (Shiri, Beyan, Murino, "MadCLIP: few-shot medical anomaly detection with CLIP", MICCAI 2025; official
code mahshid1998/MadCLIP, commit c54903d: ``CLIP/adapter_shared.py``, ``Prompt/CoOp.py``,
``Prompt/promptChooser.py``, ``loss.py``, ``train.py``, ``test.py``). The paper is not in ``../shared/papers``
and its method section could not be read offline: equations are not cited; every point below is the code's.

It builds on MVFA's code, whose pieces it shares here where they are the same: the CLIP build (ViT-L-14-336 /
openai at 240 px with exact GELU, images not mean/std normalised), the taps after blocks 6, 12, 18, 24, the 11
augmented views (``methods.models.mvfa.view``), the normal states and MVFA's five anomalous ones, the Focal
and Dice losses. The rest is its own:

- Adapters (``MFCFC``): per level a normal and an abnormal adapter on the tapped tokens: ``h = LN(LeakyReLU(W1
  x))`` (its ``InstanceNorm1d`` on sequence-first tokens: a per-token LayerNorm without affine), a det head
  ``LeakyReLU(W2 h)`` and a seg head ``LeakyReLU(W3 h)`` into the text space; all bias-free. Nothing is mixed back
  into the residual stream, so the taps are frozen CLIP tokens (cached).
- Prompts (CoOp, ``class_token_position`` end, front, middle): per class (normal, abnormal) and position a
  learnable context of 8 tokens per state (N(0, 0.02)); 7 normal states and 7 anomalous ones (MVFA's five,
  "disease {}", "abnormal {}") with the organ word; 21 sequences per class, encoded by the frozen text tower
  *without* its causal mask (its ``TextEncoder``), the EOT outputs averaged, then normalised.
- Scores: with normalised adapter outputs ``y`` and text ``t``, ``S_n = y_n t_n - y_n t_a``, ``S_a = y_a t_a -
  y_a t_n`` per patch (no logit scale), for the det and the seg heads.
- Losses, summed over levels with weight 1: det "SigLIP" ``-mean_b [mean_p log s(-s_b S_n) + mean_p log s(s_b
  S_a)]``, ``s_b = 2 y_b - 1``; seg (datasets with masks) Focal + Dice on ``softmax(up(S_seg))`` (bilinear,
  corners aligned, logits upsampled). Adam 1e-3, betas (0.5, 0.999), batch 16, 60 epochs, on the training images
  augmented 16 times once (MVFA's 11 views, centre zooms by 1.1, 1.15, 1.2, 1.3, one brightness/contrast jitter).
- Test: map ``sum_l softmax(up(S_seg,l))_a``; image score: the map's maximum (datasets with masks; the det
  head unused), else ``sum_l mean_p softmax(S_det,l)_a``.

Departures from the official code (README, fidelity table):

- min-max statistics: the code normalises maps and scores over the test set; ours come from the target's
  validation images not used for training, else the training images (``methods/models/calibration.py``), applied
  by ``calibration.squash``: strictly increasing, so test values beyond that range keep their order;
- checkpoint: the code keeps the epoch best on the test set (AUROC + pixel AUROC); we choose it so on the target's
  unused validation images (``select_on_valid``), else the last epoch;
- settings: its code trains few-shot only; ``supervised`` runs the same training on the whole labelled split and
  ``zero_shot_loo`` on the other datasets' pools (MedSAD-CLIP reports both without saying how it ran them);
- few-shot images: its seed files (``dataset/fewshot_seed/{obj}/my{K}-shot.txt``, iteration 0 only) read through
  ``sampling.manifests`` as MVFA-AD's (``protocols/medsad_fewshot.yaml`` says how);
- the augmented views' order (shuffled every epoch anyway) and the jitter's random draws are ours;
- GradScaler under fp16 (its autocast runs without one).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmark import training
from benchmark.backbones.cache import FeatureCache
from benchmark.backbones.clip import ClipBackbone, shared_clip, to_grid
from benchmark.backbones.weights import weights_identity
from benchmark.data.loading import ImageBatch, LabelledBatch
from benchmark.errors import BenchmarkError
from benchmark.method import MethodContext, Prediction, TrainSet
from methods.madclip import MadCLIP, MadCLIPParams
from methods.models import calibration, mvfa
from methods.models.losses import dice_loss, focal_loss
from methods.models.winclip import NORMAL_STATES

ANOMALOUS_STATES = (*mvfa.ANOMALOUS_STATES["official"], " disease {}", "abnormal {}")
POSITIONS = ("end", "front", "middle")
ZOOMS = (1.1, 1.15, 1.2, 1.3)


class MadAdapter(nn.Module):
    """Its ``MFCFC``: a shared layer, a per-token norm, a det and a seg head (names as its checkpoints')."""

    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Sequential(nn.Linear(width, width, bias=False), nn.LeakyReLU())
        self.fc2 = nn.Sequential(nn.Linear(width, dim, bias=False), nn.LeakyReLU())
        self.fc3 = nn.Sequential(nn.Linear(width, dim, bias=False), nn.LeakyReLU())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.layer_norm(self.fc1(x), (x.shape[-1],))
        return self.fc2(hidden), self.fc3(hidden)


class MadAdapters(nn.Module):
    """A normal and an abnormal adapter per level; the det and seg scores ``[S_n, S_a]`` of each level."""

    def __init__(self, layers: tuple[int, ...], width: int, dim: int) -> None:
        super().__init__()
        self.layers = layers
        self.normal = nn.ModuleList(MadAdapter(width, dim) for _ in layers)
        self.abnormal = nn.ModuleList(MadAdapter(width, dim) for _ in layers)

    def forward(
        self, taps: dict[str, torch.Tensor], text: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Taps ``[B, 1 + N, width]`` per level and text ``[B or 1, D, 2]`` -> det and seg scores ``[B, N, 2]``."""
        det, seg = [], []
        for index, layer in enumerate(self.layers):
            tokens = taps[f"layer{layer}"]
            heads = (*self.normal[index](tokens), *self.abnormal[index](tokens))
            y_n, z_n, y_a, z_a = (F.normalize(h[:, 1:], dim=-1) for h in heads)
            det.append(contrast(y_n, y_a, text))
            seg.append(contrast(z_n, z_a, text))
        return det, seg


def contrast(normal: torch.Tensor, abnormal: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``[y_n t_n - y_n t_a, y_a t_a - y_a t_n]`` ``[B, N, 2]`` (its ``dual_contrast``)."""
    n, a = normal @ text, abnormal @ text
    return torch.stack([n[..., 0] - n[..., 1], a[..., 1] - a[..., 0]], dim=-1)


class ContextPrompts(nn.Module):
    """CoOp prompts: a learnable context ``[states, n, width]`` per class and position (``ctx.{class}_{position}``)."""

    def __init__(self, backbone: ClipBackbone, length: int) -> None:
        super().__init__()
        if backbone.hf_text:
            raise BenchmarkError(f"madclip: '{backbone.spec.model}' has a BERT text tower; MadCLIP prompts CLIP's")
        self.backbone = [backbone]  # not a submodule: the tower stays frozen and out of state_dict
        self.length = length
        self.states = {"normal": NORMAL_STATES, "abnormal": ANOMALOUS_STATES}
        width = backbone.text_width
        self.ctx = nn.ParameterDict(
            {
                f"{name}_{position}": nn.Parameter(torch.randn(len(states), length, width) * 0.02)
                for name, states in self.states.items()
                for position in POSITIONS
            }
        )

    def sequences(self, name: str, organ: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The 21 token-embedding sequences of a class (end, front, middle; its ``PromptLearner``) and their EOTs."""
        backbone = self.backbone[0]
        phrases = [s.format(organ) for s in self.states[name]]
        tokens = backbone.tokenize([" ".join(["X"] * self.length) + f" {p}." for p in phrases])
        lengths = backbone.text_end(backbone.tokenize(phrases)) - 1  # BPE tokens of each phrase
        with torch.no_grad():
            embedded = backbone.token_embedding(tokens)
        prefix, suffix = embedded[:, :1], embedded[:, 1 + self.length :]
        half = self.length // 2
        rows = []
        for position in POSITIONS:
            ctx = self.ctx[f"{name}_{position}"].to(embedded.dtype)
            for i, n in enumerate(lengths.tolist()):
                words, rest = suffix[i, :n], suffix[i, n:]
                parts = {
                    "end": (ctx[i], suffix[i]),
                    "front": (words, ctx[i], rest),
                    "middle": (ctx[i, :half], words, ctx[i, half:], rest),
                }[position]
                rows.append(torch.cat([prefix[i], *parts]))
        return torch.stack(rows), backbone.text_end(tokens).repeat(len(POSITIONS))

    def forward(self, organ: str) -> torch.Tensor:
        """``[D, 2]``: each class's normalised mean of its sequences' EOT embeddings (non-causal text tower)."""
        backbone = self.backbone[0]
        columns = []
        for name in self.states:
            x, eot = self.sequences(name, organ)
            pooled = backbone.text_pool(backbone.run_text(x, eot, causal=False), eot)
            columns.append(F.normalize(pooled.mean(0), dim=-1))
        return torch.stack(columns, dim=1)


def det_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Its ``LossSigmoid`` with ``dec_type`` mean: ``-mean_b [mean_p log s(-s_b S_n) + mean_p log s(s_b S_a)]``."""
    sign = (2 * labels.to(scores.dtype) - 1)[:, None]
    return -(F.logsigmoid(-sign * scores[..., 0]).mean(-1) + F.logsigmoid(sign * scores[..., 1]).mean(-1)).mean()


def seg_probs(scores: torch.Tensor, size: int) -> torch.Tensor:
    """``softmax(up(S))`` ``[B, 2, size, size]``: logits upsampled bilinearly, corners aligned (its ``sync_AS``)."""
    return F.interpolate(to_grid(scores), size=size, mode="bilinear", align_corners=True).softmax(1)


VIEWS = mvfa.VIEWS + len(ZOOMS) + 1


def view(
    images: torch.Tensor, masks: torch.Tensor, index: int, jitter: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``index``-th of its 16 views of images ``[B, 3, S, S]`` and masks ``[B, S, S]``: MVFA's 11, four centre
    zooms (a crop of ``int(S / s)`` pixels resized back bilinearly), one brightness/contrast jitter (``jitter``:
    the factors, drawn once; the contrast about each image's per-column mean, as its ``color_jittering``; masks
    unchanged). Masks re-binarised at 0.5."""
    if index == VIEWS - 1:
        brightness, contrast_factor = jitter
        bright = images * brightness
        mean = bright.mean(dim=(1, 2), keepdim=True)
        return ((bright - mean) * contrast_factor + mean).clamp(0, 1), masks.bool()
    stacked = torch.cat([images, masks[:, None].to(images.dtype)], dim=1)
    if index < mvfa.VIEWS:
        out = mvfa.view(stacked, index)
    else:
        size, factor = images.shape[-1], ZOOMS[index - mvfa.VIEWS]
        n = int(size / factor)
        crop = stacked[..., (size - n) // 2 : (size + n) // 2, (size - n) // 2 : (size + n) // 2]
        out = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
    return out[:, :3], out[:, 3] > 0.5


def draw_jitter(generator: torch.Generator) -> tuple[float, float]:
    """Its jitter's brightness and contrast factors, each in [0.8, 1.2]."""
    brightness, contrast_factor = (0.8 + 0.4 * torch.rand(2, generator=generator)).tolist()
    return brightness, contrast_factor


def augment(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """All 16 views (``view``), view by view."""
    jitter = draw_jitter(generator)
    views = [view(images, masks, index, jitter) for index in range(VIEWS)]
    return torch.cat([v[0] for v in views]), torch.cat([v[1] for v in views])


class MadCLIPImpl(MadCLIP):
    def __init__(self, params: MadCLIPParams, context: MethodContext) -> None:
        super().__init__(params, context)
        spec = context.backbone
        if spec.quick_gelu is None:
            spec = dataclasses.replace(spec, quick_gelu=False)  # MVFA's CLIP rebuild: exact GELU
        self.backbone_spec = spec
        self.backbone = shared_clip(spec, context.image_size, context.device)
        if max(params.layers) > self.backbone.num_layers:
            raise BenchmarkError(
                f"madclip: layers {list(params.layers)} exceed the {self.backbone.num_layers} vision blocks"
            )
        torch.manual_seed(context.seed)
        self.adapters = MadAdapters(tuple(params.layers), self.backbone.width, self.backbone.embed_dim)
        self.prompts = ContextPrompts(self.backbone, params.context_length)
        self.adapters.to(context.device)
        self.prompts.to(context.device)
        self.cache = context.cache if params.cache_features else FeatureCache(None)
        self.recipe = {
            "features": "madclip-taps-v1",
            "backbone": spec.label(),
            "quick_gelu": spec.quick_gelu,
            "weights_file": weights_identity(spec.weights),
            "image_size": context.image_size,
            "layers": list(params.layers),
        }
        self.text: torch.Tensor | None = None
        self.stats: calibration.Stats = {}
        self.selected_epoch: int | None = None
        self.history: list[float] = []

    # ----- frozen taps -----
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tokens after each tapped block ``[B, 1 + N, width]`` (images not normalised, as MVFA's code)."""
        layers = self.params.layers
        _, outputs = self.backbone.run_blocks(self.backbone.embed(images), layers, end=max(layers))
        return {f"layer{ly}": outputs[ly] for ly in layers}

    def taps(self, images: torch.Tensor, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.cache.cached(self.recipe, keys, images.to(self.context.device), self.encode)

    # ----- training -----
    def loss(
        self,
        taps: dict[str, torch.Tensor],
        labels: torch.Tensor,
        masks: torch.Tensor,
        text: torch.Tensor,
        has_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Det loss of every level, plus Focal + Dice of every level on the images with masks."""
        det, seg = self.adapters(taps, text)
        loss = sum(det_loss(scores, labels) for scores in det)
        if has_mask.any():
            target = masks[has_mask]
            for scores in seg:
                probs = seg_probs(scores[has_mask], masks.shape[-1])
                loss = loss + focal_loss(probs, target) + dice_loss(probs[:, 1], target)
        return loss

    def fit(self, train: TrainSet) -> None:
        p, device = self.params, self.context.device
        specs = {s.path: train.datasets[s.dataset] for s in train.samples}
        generator = torch.Generator().manual_seed(self.context.seed)
        data = train.load()
        views = VIEWS if p.augment else 1
        jitter = draw_jitter(generator)

        def epoch_batches(_epoch: int) -> list[list[int]]:
            """Each batch: indices ``sample * views + view`` into the (virtual) augmented set, made per batch."""
            order = torch.randperm(len(data.labels) * views, generator=generator).tolist()
            return [order[k : k + p.batch_size] for k in range(0, len(order), p.batch_size)]

        def step(items: list[int]) -> torch.Tensor:
            samples = [i // views for i in items]
            paths = [data.paths[i] for i in samples]
            organs = [specs[path].organ for path in paths]
            texts = {organ: self.prompts(organ) for organ in dict.fromkeys(organs)}
            text = torch.stack([texts[o] for o in organs])
            flags = torch.tensor([specs[path].masks for path in paths], device=device)
            if p.augment:  # augmented views: no cache entry
                pairs = [view(data.images[i : i + 1], data.masks[i : i + 1], j % views, jitter) for i, j in
                         zip(samples, items, strict=True)]  # fmt: skip
                images, masks = torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs])
                taps = self.encode(images.to(device))
            else:
                masks = data.masks[samples]
                taps = self.taps(data.images[samples], [data.keys[i] for i in samples])
            return self.loss(taps, data.labels[samples].to(device), masks.to(device), text, flags)

        select = p.select_on_valid and len({s.label for s in train.valid}) == 2
        valid = list(train.subset(train.valid).batches(16)) if select else []
        best: dict = {"score": -float("inf")}

        def on_epoch_end(epoch: int, _loss: float) -> None:
            if not valid:
                return
            score = self._calibrate(valid)
            if score > best["score"]:
                state = {"adapters": self.adapters.state_dict(), "prompts": self.prompts.state_dict()}
                best.update(score=score, epoch=epoch, state=copy.deepcopy(state), stats=dict(self.stats))

        config = training.TrainConfig(epochs=p.epochs, lr=p.lr, betas=(0.5, 0.999), progress=p.progress)
        self.history = training.fit(
            [*self.adapters.parameters(), *self.prompts.parameters()],
            step,
            epoch_batches,
            config,
            device,
            desc=f"madclip {self.context.dataset.name}",
            on_epoch_end=on_epoch_end,
        )
        if "state" in best:
            self.adapters.load_state_dict(best["state"]["adapters"])
            self.prompts.load_state_dict(best["state"]["prompts"])
            self.stats, self.selected_epoch = best["stats"], best["epoch"]
            with torch.no_grad():
                self.text = self.prompts(self.context.dataset.organ)
            return
        calibrate = train.subset(train.valid) if train.valid else train
        self._calibrate(list(calibrate.batches(16)))

    @torch.no_grad()
    def _calibrate(self, batches: list[LabelledBatch]) -> float:
        """Min-max statistics of the raw map and score on ``batches``; returns the selection criterion."""
        self.text = self.prompts(self.context.dataset.organ)
        raws = [self.raw(batch.images, batch.keys) for batch in batches]
        self.stats = calibration.minmax({k: [r[k].cpu() for r in raws] for k in raws[0]})
        scored = ((*self.combine(r), b.labels, b.masks) for r, b in zip(raws, batches, strict=True))
        return calibration.selection_score(scored, self.context.dataset.masks)

    # ----- test -----
    @torch.no_grad()
    def raw(self, images: torch.Tensor, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Unnormalised map ``sum_l softmax(up(S_seg,l))_a`` ``[B, S, S]`` and det score ``[B]``."""
        det, seg = self.adapters(self.taps(images, keys), self.text[None])
        size = images.shape[-1]
        maps = sum(seg_probs(scores, size)[:, 1] for scores in seg)
        image = sum(scores.softmax(-1)[..., 1].mean(-1) for scores in det)
        return {"map": maps, "image": image}

    def combine(self, raw: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Min-max normalised map; the image score its maximum (datasets with masks), else the det score."""
        maps = calibration.squash(raw["map"], self.stats["map"])
        if self.context.dataset.masks:
            return maps.flatten(1).amax(-1), maps
        return calibration.squash(raw["image"], self.stats["image"]), maps

    def predict(self, batch: ImageBatch) -> Prediction:
        image, maps = self.combine(self.raw(batch.images, batch.keys))
        return Prediction(image, maps)

    def describe(self) -> dict[str, object]:
        trainable = sum(q.numel() for m in (self.adapters, self.prompts) for q in m.parameters())
        return {
            "variant": "MadCLIP",
            "trainable_params": trainable,
            "backbone": self.backbone_spec.label(),
            "selected_epoch": self.selected_epoch if self.selected_epoch is not None else "last",
            "final_train_loss": round(self.history[-1], 6) if self.history else float("nan"),
        }
