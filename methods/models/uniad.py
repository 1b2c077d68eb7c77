"""UniAD (You et al., "A Unified Model for Multi-class Anomaly Detection", NeurIPS 2022), as its official code
computes it (zhiyuanyou/UniAD, commit a5b9d9d, Apache-2.0: ``models/reconstructions/uniad.py``,
``models/necks/mfcn.py``, ``utils/eval_helper.py``, ``experiments/MVTec-AD/config.yaml``, ``tools/train_val.py``).

- backbone: frozen EfficientNet-B4, the ends of its stages 1, 2, 3 and 5 (strides 2, 4, 8, 16; 24 + 32 + 56 + 160
  = 272 channels). Its code uses lukemelas' EfficientNet-PyTorch with TF's AutoAugment weights, which are timm's
  ``tf_efficientnet_b4`` / ``aa_in1k``; lukemelas pads its stride-2 convolutions statically for 380 px whatever
  the input, so ``same_padding: 380`` fixes timm's dynamic 'SAME' padding likewise
  (``benchmark.backbones.cnn.static_same_padding``; without it the stride-8 and stride-16 features differ);
- neck (MFCN): every stage resized to stride 16 (bilinear, ``align_corners=True``) and concatenated;
- reconstruction: feature jitter on the raw tokens in training (``x + N(0, 1) * scale |x| / C``, scale 20,
  probability 1), ``Linear(272, 256)``, a learned position embedding ``cat(col[w], row[h])`` (two 128-wide
  tables, U(0, 1)), 4 post-norm encoder blocks (neighbourhood-masked self-attention, ReLU FFN 1024), 4 decoder
  blocks (learned queries attend to the encoder's output, then to the previous block's output, both masked;
  ``DecoderBlock``, also MCMIAD's), a final LayerNorm, ``Linear(256, 272)``; dropout 0.1; the mask blocks each
  query's own 7 x 7 neighbourhood, itself included. Initialised as its code: xavier-uniform weights and zero
  biases of every ``Linear``; the layers are copies of one, so at initialisation their attention input weights
  and the decoder's queries are equal;
- map: ``sqrt(sum_c (rec - f)^2)`` per location, upsampled bilinearly (``align_corners=True``); image score: the
  maximum of the map average-pooled over 16 x 16 windows (its ``max`` evaluator, the one its paper reports);
- training: MSE between the reconstruction of the jittered features and the clean ones, AdamW lr 1e-4 and weight
  decay 1e-4, gradient clipping 0.1, batches of 8, 1,000 epochs, StepLR 800 / 0.1 stepped after each epoch.

Departures:

- the device is the cell's (its code hard-codes CUDA and distributed training);
- the last epoch is evaluated (its training keeps the best pixel AUROC on the test set, evaluated every 10
  epochs; its evaluation loads the last checkpoint); its metric code also turns any AUROC below 0.5 into
  ``1 - AUROC``: ours never looks at test labels;
- trained per dataset (the published rows are per dataset: MCMIAD's Tables 1 and 3), not one model for all;
- scores in [0, 1] (the harness's contract): maps and image scores through ``calibration.beyond`` with the range
  of the training images (0.5: their maximum; strictly increasing: AUROCs are those of the raw values);
- images resized with PIL's bicubic filter (its loader: PIL's bilinear);
- the jitter's coin and noise come from torch's generator (its code: Python's ``random`` and a sequence-first draw).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmark import training
from benchmark.backbones.cnn import CnnBackbone, load_timm, static_same_padding
from benchmark.data.loading import ImageBatch
from benchmark.method import MethodContext, Prediction, TrainSet
from methods.models import calibration
from methods.uniad import UniAD, UniADParams


def neighbourhood_mask(h: int, w: int, size: int) -> torch.Tensor:
    """Boolean ``[hw, hw]``: True where attention is *blocked*, i.e. inside the ``size x size`` neighbourhood of
    each query's own position, itself included (UniAD's ``generate_mask``), so no token sees its own input."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    half = size // 2
    near = ((ys[:, None] - ys[None]).abs() <= half) & ((xs[:, None] - xs[None]).abs() <= half)
    if near.all(1).any():
        raise ValueError(
            f"a {size}x{size} neighbourhood covers the whole {h}x{w} token grid for some tokens, which would then "
            "attend to nothing; use a smaller neighbourhood or a larger image_size"
        )
    return near


def jitter(x: torch.Tensor, scale: float, prob: float) -> torch.Tensor:
    """UniAD's ``add_jitter``: with probability ``prob``, ``x + N(0, 1) * scale * |x| / D`` per token."""
    if prob < 1.0 and torch.rand(()) >= prob:
        return x
    return x + torch.randn_like(x) * (x.norm(dim=-1, keepdim=True) / x.shape[-1] * scale)


def _ffn(dim: int, ffn: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, dim))


class EncoderBlock(nn.Module):
    """UniAD's encoder layer (post-norm): masked self-attention, positions added to queries and keys, then a
    ReLU FFN, each with a residual and a LayerNorm."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = _ffn(dim, ffn, dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))
        self.drops = nn.ModuleList(nn.Dropout(dropout) for _ in range(2))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.attn(x + pos, x + pos, x, attn_mask=mask, need_weights=False)[0]
        x = self.norms[0](x + self.drops[0](y))
        return self.norms[1](x + self.drops[1](self.ffn(x)))


class DecoderBlock(nn.Module):
    """UniAD's decoder layer (post-norm): learned queries attend to ``memory`` (the decoder's input), then to
    ``out`` (the previous block's output), each attention neighbourhood-masked; then a ReLU FFN."""

    def __init__(self, dim: int, heads: int, ffn: int, tokens: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(tokens, dim))  # UniAD: nn.Embedding(H*W, dim).weight
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.masked_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = _ffn(dim, ffn, dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.drops = nn.ModuleList(nn.Dropout(dropout) for _ in range(3))

    def forward(self, out: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.query.unsqueeze(0).expand(memory.shape[0], -1, -1)
        x = self.self_attn(q + pos, memory + pos, memory, attn_mask=mask, need_weights=False)[0]
        x = self.norms[0](q + self.drops[0](x))
        y = self.masked_attn(x + pos, out + pos, out, attn_mask=mask, need_weights=False)[0]
        x = self.norms[1](x + self.drops[1](y))
        return self.norms[2](x + self.drops[2](self.ffn(x)))


class LearnedPosition(nn.Module):
    """UniAD's ``PositionEmbeddingLearned``: ``pos[h W + w] = cat(col[w], row[h])``, tables initialised U(0, 1)."""

    def __init__(self, grid: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.row = nn.Parameter(torch.rand(grid[0], dim // 2))
        self.col = nn.Parameter(torch.rand(grid[1], dim - dim // 2))

    def forward(self) -> torch.Tensor:
        h, w = self.row.shape[0], self.col.shape[0]
        pos = torch.cat([self.col.unsqueeze(0).expand(h, -1, -1), self.row.unsqueeze(1).expand(-1, w, -1)], -1)
        return pos.reshape(1, h * w, -1)


class UniADHead(nn.Module):
    """The reconstruction module: jitter (training), projection, encoder, decoder, back-projection."""

    def __init__(self, channels: int, grid: tuple[int, int], p: UniADParams) -> None:
        super().__init__()
        self.jitter_scale, self.jitter_prob = p.jitter_scale, p.jitter_prob
        tokens = grid[0] * grid[1]
        self.proj_in = nn.Linear(channels, p.dim)
        self.pos = LearnedPosition(grid, p.dim)
        encoder = EncoderBlock(p.dim, p.heads, p.ffn, p.dropout)
        decoder = DecoderBlock(p.dim, p.heads, p.ffn, tokens, p.dropout)
        self.encoder = nn.ModuleList(copy.deepcopy(encoder) for _ in range(p.encoder_blocks))
        self.decoder = nn.ModuleList(copy.deepcopy(decoder) for _ in range(p.decoder_blocks))
        self.norm = nn.LayerNorm(p.dim)
        self.proj_out = nn.Linear(p.dim, channels)
        for module in self.modules():  # its initializer: every Linear (attention out_proj included)
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.register_buffer("mask", neighbourhood_mask(*grid, p.neighbourhood), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` features -> their reconstruction, of the same shape."""
        b, c, h, w = features.shape
        tokens = features.flatten(2).transpose(1, 2)
        if self.training and self.jitter_scale > 0:
            tokens = jitter(tokens, self.jitter_scale, self.jitter_prob)
        pos = self.pos()
        x = self.proj_in(tokens)
        for block in self.encoder:
            x = block(x, pos, self.mask)
        out = x
        for block in self.decoder:
            out = block(out, x, pos, self.mask)
        return self.proj_out(self.norm(out)).transpose(1, 2).reshape(b, c, h, w)


def reconstruction_map(f_in: torch.Tensor, f_rec: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``sqrt(sum_c (rec - f)^2)`` per location, upsampled bilinearly with ``align_corners=True``: ``[B, H, W]``."""
    error = ((f_rec - f_in) ** 2).sum(1, keepdim=True).sqrt()
    return F.interpolate(error, size=size, mode="bilinear", align_corners=True)[:, 0]


def pooled_max(maps: torch.Tensor, pool: int) -> torch.Tensor:
    """Its ``max`` evaluator: the maximum of the map average-pooled over ``pool x pool`` windows (stride 1)."""
    k = min(pool, *maps.shape[-2:])
    return F.avg_pool2d(maps[:, None], k, stride=1).flatten(1).amax(1)


def fit_reconstruction(
    head: nn.Module,
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    features: torch.Tensor,
    p,
    context: MethodContext,
    name: str,
    lr_at: Callable[[int, int, int], float],
) -> list[float]:
    """UniAD's objective, MCMIAD's too: ``head`` learns to reconstruct frozen ``features`` ``[N, C, h, w]`` (MSE
    of ``reconstruct(f)`` to ``f``), in batches of ``p.batch_size`` shuffled by ``context.seed``, AdamW (``p.lr``,
    ``p.weight_decay``) with gradient clipping ``p.grad_clip``, ``p.epochs`` epochs; leaves ``head`` in
    evaluation mode and returns the epochs' mean losses."""
    generator = torch.Generator().manual_seed(context.seed)

    def epoch_batches(_epoch: int):
        order = torch.randperm(len(features), generator=generator)
        return [features[order[i : i + p.batch_size]] for i in range(0, len(order), p.batch_size)]

    def step(f_in: torch.Tensor) -> torch.Tensor:
        f_in = f_in.to(context.device)
        return F.mse_loss(reconstruct(f_in), f_in)

    config = training.TrainConfig(
        epochs=p.epochs,
        lr=p.lr,
        optimizer="adamw",
        weight_decay=p.weight_decay,
        grad_clip=p.grad_clip,
        progress=p.progress,
    )
    head.train()
    history = training.fit(
        head.parameters(), step, epoch_batches, config, context.device, f"{name} {context.dataset.name}", lr_at=lr_at
    )
    head.eval()
    return history


class UniADImpl(UniAD):
    def __init__(self, params: UniADParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.backbone: CnnBackbone = load_timm(context.backbone, params.levels, context.device)
        if params.same_padding:
            static_same_padding(self.backbone, params.same_padding)
        size = context.image_size
        if size % params.stride:
            raise ValueError(f"uniad: image_size {size} is not a multiple of stride {params.stride}")
        self.grid = (size // params.stride, size // params.stride)
        torch.manual_seed(context.seed)
        self.head = UniADHead(sum(self.backbone.channels), self.grid, params).to(context.device)
        self.stats: calibration.Stats = {}
        self.history: list[float] = []

    def features(self, images: torch.Tensor, keys: tuple[str, ...]) -> torch.Tensor:
        """MFCN: the frozen stages (cached on disk), resized to the common grid and concatenated."""
        maps = self.backbone.cached(self.context.cache, keys, images)
        return torch.cat([F.interpolate(m, size=self.grid, mode="bilinear", align_corners=True) for m in maps], 1)

    def raw(self, f_in: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw image scores and maps of features ``f_in``."""
        maps = reconstruction_map(f_in, self.head(f_in), size)
        return pooled_max(maps, self.params.pool), maps

    def fit(self, train: TrainSet) -> None:
        p = self.params
        normal = train.subset(train.normal)
        f_all = torch.cat([self.features(b.images, b.keys).cpu() for b in normal.batches(p.batch_size)])

        def lr_at(epoch: int, _index: int, _count: int) -> float:
            return p.lr * p.lr_gamma ** (max(epoch - 1, 0) // p.lr_step)  # its scheduler.step(epoch) after each

        self.history = fit_reconstruction(self.head, self.head, f_all, p, self.context, "uniad", lr_at)
        self.head.eval()
        size = (self.context.image_size, self.context.image_size)
        with torch.no_grad():
            outputs = (self.raw(f.to(self.context.device), size) for f in f_all.split(p.batch_size))
            self.stats = calibration.ranges(outputs)

    def predict(self, batch: ImageBatch) -> Prediction:
        with torch.no_grad():
            score, maps = self.raw(self.features(batch.images, batch.keys), tuple(batch.images.shape[-2:]))
        return Prediction(calibration.beyond(score, self.stats["image"]), calibration.beyond(maps, self.stats["map"]))

    def describe(self) -> dict[str, object]:
        return {
            "variant": "UniAD",
            "trainable_params": sum(q.numel() for q in self.head.parameters()),
            "final_train_loss": round(self.history[-1], 6) if self.history else float("nan"),
        }
