"""MCMIAD: frozen CNN features, a CLIP text prior and a denoising Transformer decoder (Lin et al., MIDL 2026
submission, ../shared/papers/mcmiad.txt). Trained on normal images only.

Pipeline (Sec. 3): frozen EfficientNet-B4 stages -> tokens ``X_vis`` (Eq. 1: stages resized to a common grid,
concatenated to ``C_org`` channels, linear projection to ``D``) -> shallow cross-attention with the offline
text embedding (Eq. 2, ``X_fused = X_vis + alpha Z``, alpha = 1) -> feature jittering during training (Eq. 3)
-> denoising decoder (attention, neighbourhood-masked attention, FFN; Fig. 2) -> linear map back to
``C_org`` -> score ``S = |F_in - F_out|^2 + (1 - cos(F_in, F_out))`` per location (Eq. 4-6), bilinear
upsampling, image score ``0.5 max + 0.3 mean + 0.2 top-5 mean`` (Eq. 7).

The text embedding (Sec. 3.2, App. A.2): the 15 normal prompts, each encoded by the CLIP text encoder,
L2-normalised, averaged. ``use_text_fusion: false`` replaces it by a zero vector (the paper's ablation), which
keeps the architecture and its parameter count.

With a single key, Eq. 2's softmax over keys is 1 for every query, so the cross-attention output is the same
vector for every token: ``Z = W_O W_V T``. We implement the equation as written (a multi-head attention
layer) and test that property.

Interpretations (the paper does not say; each is a parameter):

- backbone: the main text says EfficientNet-B4 (Sec. 4.2), the appendix OpenCLIP ViT-B/16 (A.1); we use timm
  ``efficientnet_b4`` (``ra2_in1k``) stages at strides 2, 4, 8, 16 (timm ``out_indices`` 0-3, UniAD's
  choice for its MoEAD-like head), resized to stride 16 (14 x 14 at 224 px), ``C_org`` = 272; the text
  encoder is OpenCLIP ViT-B/16 (``text_model``);
- decoder: UniAD's decoder layer as its official code writes it (``models/reconstructions/uniad.py``,
  ``TransformerDecoderLayer.forward_post``): per block, learned queries attend to the decoder's input and then
  to the previous block's output, both attentions neighbourhood-masked (UniAD's config masks both), each
  followed by a residual on the queries and a LayerNorm, then a ReLU FFN (dropout 0.1), and a final LayerNorm
  after the last block; weights initialised xavier-uniform (UniAD's initializer). The residual runs on the
  queries, never on the input tokens, and the 7 x 7 neighbourhood of every query's own position is *blocked*
  (the token itself included), so the decoder cannot copy its input. Width 256, 8 heads, FFN 1024, 2
  blocks, learned position embeddings; the paper gives 2.97 M trainable parameters but no sizes;
- jittering: UniAD's ``add_jitter``: Gaussian noise of standard deviation ``scale * |x| / D`` per token
  (scale 20), with probability 1 (UniAD's defaults; the paper: "proportional to the feature norm", sigma and
  p fixed but not given); as Eq. 3 says, it is added to the fused tokens (UniAD adds it to the backbone
  features before the input projection);
- training loss: mean squared error between ``F_in`` and ``F_out`` (not stated; the reconstruction objective);
- Eq. 6 is a direct sum, Sec. 4.2 mentions lambda = 0.7 in Eq. 5: ``score_weights`` = (MSE, cosine)
  weights, (1, 1) by default as Eq. 6;
- scores in [0, 1] (a harness contract): Eq. 7 is applied to the upsampled raw map ``S``, in the paper's
  order; then maps are ``S / (S + c)`` and image scores ``s / (s + c_img)``, with ``c`` and ``c_img`` the
  ``calibration_quantile`` of the training images' location scores and Eq. 7 scores (1.0: their maxima, so
  0.5 means "beyond every training image"); both are monotone, so AUROCs are those of ``S`` and Eq. 7;
- AdamW, lr 2e-4, weight decay 1e-4, gradient clipping 0.1, batch 16, 100 epochs, cosine decay (Sec. 4.2);
- the light CLIP adaptation of App. A.1 is not implemented (off by default in the issue; the appendix does not
  give enough detail to reproduce it): the text encoder is used as loaded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.backbones.clip import shared_clip
from benchmark.backbones.cnn import CnnBackbone, load_timm
from benchmark.data.loading import ImageBatch
from benchmark.method import MethodContext, Prediction, TrainSet
from benchmark.protocol import BackboneSpec
from methods.mcmiad import MCMIAD, MCMIADParams
from methods.models.uniad import DecoderBlock, fit_reconstruction, jitter, neighbourhood_mask

NORMAL_PROMPTS = (
    "A FLAIR brain MRI slice of a healthy adult with no tumor, mass effect, or abnormal hyperintense regions.",
    "A normal brain MRI FLAIR image showing symmetric ventricles and clean white matter without lesions.",
    "A T2-FLAIR axial brain MRI with intact gray-white matter boundaries and no signs of edema or glioma.",
    "A neurologically normal brain MRI without hemorrhage, infarction, or abnormal contrast in the parenchyma.",
    "A diagnostically unremarkable brain MRI scan used as a reference for healthy anatomy.",
    "A healthy retinal OCT B-scan with smooth, continuous retinal layers and a normal foveal depression.",
    "A normal macular OCT image without intraretinal or subretinal fluid, cysts, or hyperreflective foci.",
    "A high-quality retinal OCT slice showing intact outer retinal layers and a regular retinal pigment "
    "epithelium band.",
    "A clinically normal OCT scan of the macula used as a reference for healthy retinal structure.",
    "A retinal OCT image from an eye without diabetic macular edema, neovascularization, or drusen.",
    "A normal contrast-enhanced liver CT slice with homogeneous liver parenchyma and no focal lesions.",
    "An abdominal CT image where the liver appears smooth, with clear margins and no visible tumors or nodules.",
    "A healthy liver CT slice showing normal vessel enhancement and no hypodense or hyperdense abnormal areas.",
    "A diagnostic liver CT scan from a patient without hepatic tumors, cysts, or metastases.",
    "A standard liver CT image used as a normal reference in medical imaging studies.",
)


def image_score(maps: torch.Tensor, weights=(0.5, 0.3, 0.2), k: int = 5) -> torch.Tensor:
    """Eq. 7: ``w1 max + w2 mean + w3 mean(top-k)`` of each map ``[B, H, W]``."""
    flat = maps.flatten(1)
    top = flat.topk(min(k, flat.shape[1]), dim=1).values.mean(1)
    return weights[0] * flat.amax(1) + weights[1] * flat.mean(1) + weights[2] * top


def anomaly_scores(f_in: torch.Tensor, f_out: torch.Tensor, weights=(1.0, 1.0)) -> torch.Tensor:
    """Eq. 4-6 per location of ``[B, C, h, w]`` features: squared error plus cosine distance."""
    mse = ((f_in - f_out) ** 2).sum(1)
    cos = 1 - F.cosine_similarity(f_in, f_out, dim=1, eps=1e-8)
    return weights[0] * mse + weights[1] * cos


class MCMIADHead(nn.Module):
    """The trainable head: projection, text cross-attention fusion, jittering, decoder, back-projection."""

    def __init__(
        self,
        channels: int,
        grid: tuple[int, int],
        text_dim: int,
        dim: int = 256,
        heads: int = 8,
        ffn: int = 1024,
        blocks: int = 2,
        neighbourhood: int = 7,
        alpha: float = 1.0,
        jitter_scale: float = 20.0,
        jitter_prob: float = 1.0,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.grid, self.alpha = grid, alpha
        self.jitter_scale, self.jitter_prob = jitter_scale, jitter_prob
        tokens = grid[0] * grid[1]
        self.proj_in = nn.Linear(channels, dim)
        self.text_proj = nn.Linear(text_dim, dim)  # T = e_txt W (Sec. 3.3)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads, ffn, tokens, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, channels)
        for weight in self.parameters():  # UniAD's initializer: xavier-uniform for every matrix
            if weight.dim() > 1:
                nn.init.xavier_uniform_(weight)
        self.register_buffer("mask", neighbourhood_mask(*grid, neighbourhood), persistent=False)

    def fuse(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Eq. 2 and the residual: ``X + alpha CrossAttn(Q=X, K=T, V=T)`` with a single text key."""
        t = self.text_proj(text).view(1, 1, -1).expand(tokens.shape[0], 1, -1)
        z = self.cross_attn(tokens, t, t, need_weights=False)[0]
        return tokens + self.alpha * z

    def forward(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` features -> reconstructed features of the same shape."""
        b, c, h, w = features.shape
        memory = self.fuse(self.proj_in(features.flatten(2).transpose(1, 2)), text)
        if self.training:
            memory = jitter(memory, self.jitter_scale, self.jitter_prob)
        out = memory
        for block in self.blocks:
            out = block(out, memory, self.pos, self.mask)
        return self.proj_out(self.norm(out)).transpose(1, 2).reshape(b, c, h, w)


class MCMIADImpl(MCMIAD):
    def __init__(self, params: MCMIADParams, context: MethodContext) -> None:
        super().__init__(params, context)
        device = context.device
        self.backbone: CnnBackbone = load_timm(context.backbone, params.levels, device)
        size = context.image_size
        if size % params.stride:
            raise ValueError(f"mcmiad: image_size {size} is not a multiple of stride {params.stride}")
        grid = (size // params.stride, size // params.stride)
        text_spec = (
            BackboneSpec(params.text_model, params.text_weights, context.backbone.seed)
            if params.text_weights == "random-init"
            else BackboneSpec(params.text_model, params.text_weights)
        )
        clip = shared_clip(text_spec, 224 if params.text_weights != "random-init" else 32, device)
        with torch.no_grad():
            text = F.normalize(clip.encode_prompts(NORMAL_PROMPTS, context.cache), dim=-1).mean(0)
        self.text_spec = text_spec
        self.text = text if params.use_text_fusion else torch.zeros_like(text)
        torch.manual_seed(context.seed)
        self.head = MCMIADHead(
            sum(self.backbone.channels),
            grid,
            text.shape[0],
            params.dim,
            params.heads,
            params.ffn,
            params.blocks,
            params.neighbourhood,
            params.alpha,
            params.jitter_scale,
            params.jitter_prob,
            params.dropout,
        ).to(device)
        self.grid = grid
        self.calibration = (1.0, 1.0)  # c (maps) and c_img (image scores)
        self.history: list[float] = []

    def features(self, images: torch.Tensor, keys: tuple[str, ...]) -> torch.Tensor:
        """Frozen stages (cached on disk), resized to the common grid and concatenated: ``F_in``."""
        maps = self.backbone.cached(self.context.cache, keys, images)
        return torch.cat([F.interpolate(m, size=self.grid, mode="bilinear", align_corners=False) for m in maps], 1)

    def raw_scores(self, f_in: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        f_out = self.head(f_in, self.text)
        s = anomaly_scores(f_in, f_out, self.params.score_weights)
        return F.interpolate(s.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]

    def fit(self, train: TrainSet) -> None:
        p = self.params
        normal = train.subset(train.normal)
        f_all = torch.cat([self.features(b.images, b.keys).cpu() for b in normal.batches(p.batch_size)])

        def lr_at(epoch: int, index: int, count: int) -> float:
            progress = (epoch + index / max(count, 1)) / p.epochs
            return 0.5 * p.lr * (1 + math.cos(math.pi * progress))

        def reconstruct(f_in: torch.Tensor) -> torch.Tensor:
            return self.head(f_in, self.text)

        self.history = fit_reconstruction(self.head, reconstruct, f_all, p, self.context, "mcmiad", lr_at)
        self.calibration = self._calibrate(f_all)

    @torch.no_grad()
    def _calibrate(self, features: torch.Tensor) -> tuple[float, float]:
        """``c`` and ``c_img``: the ``calibration_quantile`` of the training images' upsampled location scores
        and of their Eq. 7 scores, batch by batch: the maxima (1.0) exactly, other quantiles of the location
        scores on a subsample of about a million."""
        size = (self.context.image_size, self.context.image_size)
        stride = max(1, len(features) * size[0] * size[1] // 1_000_000)
        peak, sample, images = 0.0, [], []
        for f in features.split(self.params.batch_size):
            scores = self.raw_scores(f.to(self.context.device), size)
            images.append(image_score(scores, self.params.image_weights, self.params.top_k).cpu())
            scores = scores.flatten().cpu()
            peak = max(peak, float(scores.max()))
            sample.append(scores[::stride])
        q = self.params.calibration_quantile
        location = peak if q >= 1.0 else float(torch.quantile(torch.cat(sample).double(), q))
        image = float(torch.quantile(torch.cat(images).double(), q))
        return max(location, 1e-12), max(image, 1e-12)

    def predict(self, batch: ImageBatch) -> Prediction:
        size = tuple(batch.images.shape[-2:])
        with torch.no_grad():
            s = self.raw_scores(self.features(batch.images, batch.keys), size)
        image = image_score(s, self.params.image_weights, self.params.top_k)  # Eq. 7 on the raw map
        c_map, c_img = self.calibration
        return Prediction(image / (image + c_img), s / (s + c_map))

    def head_flops(self) -> int:
        """FLOPs of one forward pass of the head on one image (torch's flop counter)."""
        from torch.utils.flop_counter import FlopCounterMode

        f = torch.zeros(1, sum(self.backbone.channels), *self.grid, device=self.context.device)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            self.head(f, self.text)
        return int(counter.get_total_flops())

    def published_as(self) -> str:
        """The paper's MCMIAD rows are the model with text fusion."""
        return self.published_name if self.params.use_text_fusion else ""

    def describe(self) -> dict[str, object]:
        return {
            "variant": "MCMIAD" if self.params.use_text_fusion else "MCMIAD (no text fusion)",
            "trainable_params": sum(q.numel() for q in self.head.parameters()),
            "head_flops": self.head_flops(),
            "text_encoder": self.text_spec.label(),
            "calibration": round(self.calibration[0], 6),
            "calibration_image": round(self.calibration[1], 6),
            "final_train_loss": round(self.history[-1], 6) if self.history else float("nan"),
        }
