"""MedCLIPSeg (Koleilat et al., CVPR 2026; official code HealthX-Lab/MedCLIPSeg: ``trainers/layers.py``,
``trainers/medclipseg_{unimedclip,biomedclip,pubmedclip,clip}.py``, ``trainers/scale_block.py``, ``train.py``,
``test.py``). Only the abstract is in ``../shared/papers``; the points below follow the code.

Variants (``backbone_variant``, its ``MODEL.CLIP_MODEL``; every config of its, and so every published number,
uses ``unimedclip``): ``clip`` (OpenAI ViT-B/16) and ``pubmedclip`` (the same code on ViT-B/32 with PubMedCLIP's
weights) run the CLIP text tower; ``unimedclip`` (UniMedCLIP ViT-B/16: open_clip ViT, BiomedBERT) and
``biomedclip`` (BiomedCLIP: timm ViT, PubMedBERT) a BERT one, and differ from ``clip`` in three points: the
patch features are the last block's *full* tokens, normed and projected (not the value path); the text feature
is the [CLS] token's last hidden state through the MLP projection; and BERT's dropout runs while training (its
``model.train()``; 0.1 in the embeddings, attention and hidden states). The adapters see every BERT position,
[CLS], [SEP] and padding included; the BERT layers mask the padding as keys. ``biomedclip`` puts no adapter
before its first block even when 0 is in ``layers`` (its ``if i == 0``).

- PVL adapter (``PVL_Adapter``): bias-free down-projections of the vision and text tokens to 256-d, a
  two-way probabilistic cross-attention (image -> text, then text -> image with the updated image tokens),
  bias-free up-projections; both outputs added to the residual streams before the blocks ``i + 1`` of both
  towers for ``i`` in 1..10 (its ``LAYERS``), the towers run block by block side by side.
- Probabilistic cross-attention (``ProbCrossAttention``): keys and values each a mean (LayerNorm) and a
  softplus variance (+1e-6); scores ``Q K_mu^T / sqrt(C) - beta sqrt(Q^2 Var_K^T / C)`` (beta 2.35); values
  sampled ``V_mu + sqrt(Var_V) eps`` (a fresh ``eps`` at every forward, training included); output
  ``g W_o(A V) + (1 - g) Q_in`` with ``g = sigmoid(gate)``, gate initialised at 0.
- Patch features (``clip``, ``pubmedclip``): the *value path* of the last vision block, ``W_o W_v ln_1(x)`` (its
  ``ResidualAttentionBlock_CMM``; no attention), [CLS] dropped, ``ln_post`` and the projection. Text feature:
  the EOT output of the text tower, ``ln_final`` and the projection.
- Head: logits ``<MLP_3(t/|t|), Up(p/|p|)>`` with a 3-layer GELU MLP on the text feature and two scale blocks
  (transposed conv 2x2 stride 2, GELU, depthwise 3x3, LayerNorm2d) on the patch grid, bilinear to the image.
- Loss (``train.py``): ``0.5 Dice + 0.5 BCE`` on the logits + ``0.1`` soft contrastive loss (mean normalised
  patch feature against the *unnormalised* text features of the batch, temperature 0.2; soft targets
  ``softmax(row-L2-normalised(T T^T / 0.2))``, symmetric). The Dice term is MONAI's ``DiceLoss(sigmoid=True,
  include_background=False)`` on ``[B, H, W]`` logits, as the code calls it: MONAI reads H as the channel
  axis, so the Dice is taken per image row, row 0 left out, and averaged; we call it the same way.
- Training: Adam 3e-4, cosine to 1e-4 over the epochs (stepped each epoch), 100 epochs (``configs/EUS.yaml``: 10;
  ``configs/Covid19.yaml`` also sets the gates' initial value to -0.02), batch 24, 224 px, fp32,
  half the images rotated by a random integer angle in [-20, 20] (nearest neighbour, as PIL's default),
  ImageNet mean/std normalisation (its ``CLIP_NORMALIZE``, every variant), the last epoch (``USE_LATEST``).
- Colour: its loader reads images with ``cv2.imread`` and never converts them to RGB, so the published numbers of
  colour sets come from BGR images under RGB constants: ``colour: bgr`` (the default) feeds the channels in that
  order, ``rgb`` in the order the constants expect.
- Test: 30 forward passes with fresh noise; the map is the mean of the sigmoids, the uncertainty map its
  binary entropy ``-(p log(p + 1e-8) + (1 - p) log(1 - p + 1e-8))`` (nats, at most ln 2).
- Image score (MedCLIPSeg has none): the maximum of the mean map, the score a pixel-level segmenter implies
  for "is there a lesion"; reported on datasets with normal images only.

Text: each image's own description where its dataset provides one (MedCLIPSeg layout's ``Prompts_Folder``),
else ``prompt`` with the dataset card's organ word. Trainable: the adapters, the scale blocks and the mask head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from timm.layers import LayerNorm2d
from torch import nn

from benchmark import training
from benchmark.backbones.attention import block_values
from benchmark.backbones.clip import ClipBackbone, shared_clip, to_grid
from benchmark.data.loading import ImageBatch
from benchmark.errors import BenchmarkError
from benchmark.importers import load_mapped, tensors_of
from benchmark.method import MethodContext, Prediction, TrainSet
from methods.medclipseg import DATASET_EPOCHS, DATASET_GATE_INIT, MedCLIPSeg, MedCLIPSegParams
from methods.models.augment import rotate_half


class ProbabilisticCrossAttention(nn.Module):
    """Queries attend to a context whose keys and values carry a mean and a variance (``ProbCrossAttention``)."""

    def __init__(self, dim: int, beta: float = 2.35, gate_init: float = 0.0) -> None:
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim * 2)
        self.v_proj = nn.Linear(dim, dim * 2)
        self.out_proj = nn.Linear(dim, dim)
        self.norm_k = nn.LayerNorm(dim)
        self.norm_v = nn.LayerNorm(dim)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))
        self.beta = beta
        self.eps = 1e-6

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        dim = query.shape[-1]
        q = self.q_proj(query)
        k_mu, k_raw = self.k_proj(context).split(dim, -1)
        v_mu, v_raw = self.v_proj(context).split(dim, -1)
        k_mu, v_mu = self.norm_k(k_mu), self.norm_v(v_mu)
        k_var, v_var = F.softplus(k_raw) + self.eps, F.softplus(v_raw) + self.eps
        scores = q @ k_mu.transpose(1, 2) / math.sqrt(dim)
        scores = scores - self.beta * torch.sqrt(q.pow(2) @ k_var.transpose(1, 2) / dim)
        values = v_mu + torch.sqrt(v_var) * torch.randn_like(v_var)
        gate = torch.sigmoid(self.gate)
        return gate * self.out_proj(scores.softmax(-1) @ values) + (1 - gate) * query


class PVLAdapter(nn.Module):
    """Down-project both towers' tokens, attend image -> text then text -> image, up-project (``PVL_Adapter``)."""

    def __init__(self, vision: int, text: int, dim: int = 256, beta: float = 2.35, gate_init: float = 0.0) -> None:
        super().__init__()
        self.vision_down = nn.Linear(vision, dim, bias=False)
        self.text_down = nn.Linear(text, dim, bias=False)
        self.vision_up = nn.Linear(dim, vision, bias=False)
        self.text_up = nn.Linear(dim, text, bias=False)
        self.image_to_text = ProbabilisticCrossAttention(dim, beta, gate_init)
        self.text_to_image = ProbabilisticCrossAttention(dim, beta, gate_init)

    def forward(self, vision: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, t = self.vision_down(vision), self.text_down(text)
        v = self.image_to_text(v, t)
        t = self.text_to_image(t, v)
        return self.vision_up(v), self.text_up(t)


class ScaleBlock(nn.Module):
    """Transposed conv 2x2 stride 2, GELU, depthwise 3x3 (no bias), LayerNorm2d (its ``ScaleBlock``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.norm = LayerNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv2(self.act(self.conv1(x))))


class MedCLIPSegModel(nn.Module):
    """The frozen CLIP towers run side by side with PVL adapters, a mask head and scale blocks."""

    def __init__(
        self,
        backbone: ClipBackbone,
        layers=tuple(range(1, 11)),
        adapter_dim: int = 256,
        beta: float = 2.35,
        gate_init: float = 0.0,
        upscale_blocks: int = 2,
        variant: str = "clip",
    ) -> None:
        super().__init__()
        depth = backbone.num_layers
        if len(backbone.text_blocks) != depth:
            raise BenchmarkError(
                f"medclipseg: the backbone's towers must be equally deep (vision {depth}, text "
                f"{len(backbone.text_blocks)} blocks): they run block by block side by side"
            )
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise BenchmarkError(f"medclipseg: layers: {bad[0]} out of range 0..{depth - 1}")
        self.backbone = [backbone]  # frozen, not a submodule: out of state_dict and the optimiser
        self.layers = tuple(layers)
        self.full_tokens = variant in ("unimedclip", "biomedclip")  # dense features: full tokens, not values
        self.skip_first = variant == "biomedclip"
        text_width = backbone.text_width
        dim = backbone.embed_dim
        self.adapters = nn.ModuleList(
            PVLAdapter(backbone.width, text_width, adapter_dim, beta, gate_init) for _ in self.layers
        )
        self.mask_head = nn.Sequential(
            nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim)
        )
        self.upscale = nn.Sequential(*(ScaleBlock(dim) for _ in range(upscale_blocks)))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def encode(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] and their prompts' tokens -> patch features ``[B, N, D]``, text features ``[B, D]``."""
        backbone = self.backbone[0]
        x = backbone.embed((images - self.mean) / self.std)
        t = backbone.embed_text(tokens)
        end = backbone.text_end(tokens)
        attention = backbone.text_attention(end, tokens.shape[1])  # BERT's padding mask (None for CLIP's)
        depth = backbone.num_layers
        for index in range(depth):  # 0-based, as its LAYERS
            if index in self.layers and not (self.skip_first and index == 0):
                dv, dt = self.adapters[self.layers.index(index)](x, t)
                x, t = x + dv, t + dt
            if self.full_tokens or index < depth - 1:
                x = backbone.blocks[index](x)
            t = backbone.text_block(index + 1, t, attention)
        if self.full_tokens:  # the last block's full tokens, normed and projected
            return backbone.project_tokens(x[:, 1:]), backbone.text_pool(t, end)
        values = block_values(backbone.blocks[depth - 1], x)  # the last block's value path
        return backbone.project_tokens(values[:, 1:]), backbone.text_pool(t, end)

    def logits(self, patches: torch.Tensor, text: torch.Tensor, size: int) -> torch.Tensor:
        """``[B, size, size]`` segmentation logits (``compute_seg_logits``)."""
        grid = to_grid(F.normalize(patches, dim=-1))
        query = self.mask_head(F.normalize(text, dim=-1))
        out = torch.einsum("bc,bchw->bhw", query, self.upscale(grid))
        return F.interpolate(out.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]


def soft_contrastive(patches: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """The code's soft patch-level contrastive loss: mean normalised patch feature against the batch's text
    features (unnormalised, as the code), soft targets from the row-normalised text-text similarities."""
    mean = F.normalize(patches, dim=-1).mean(1)
    per_image = mean @ text.T / temperature
    per_text = text @ mean.T / temperature
    with torch.no_grad():
        similarity = text @ text.T / temperature
        targets = (similarity / similarity.norm(dim=-1, keepdim=True)).softmax(-1)
    loss_i = -(targets * per_image.log_softmax(-1)).sum(-1).mean()
    loss_t = -(targets.T * per_text.log_softmax(-1)).sum(-1).mean()
    return (loss_i + loss_t) / 2


# its checkpoints: the frozen backbone's prefixes, and its names inside an adapter -> ours
OFFICIAL_FROZEN = ("vision_model.", "text_model.", "clip_model.", "logit_scale")
# the frozen patch embedding its file holds, by variant: unimedclip, clip and pubmedclip, biomedclip
OFFICIAL_PATCH_EMBEDDINGS = (
    "vision_model.conv1.weight", "clip_model.visual.conv1.weight", "vision_model.trunk.patch_embed.proj.weight"
)  # fmt: skip
OFFICIAL_NAMES = (
    ("proj_vis_down.0.", "vision_down."),
    ("proj_txt_down.", "text_down."),
    ("proj_vis_up.", "vision_up."),
    ("proj_txt_up.", "text_up."),
    ("two_way.cross_attn_img_to_txt.", "image_to_text."),
    ("two_way.cross_attn_txt_to_img.", "text_to_image."),
)


class MedCLIPSegImpl(MedCLIPSeg):
    def __init__(self, params: MedCLIPSegParams, context: MethodContext) -> None:
        super().__init__(params, context)
        self.backbone = shared_clip(context.backbone, context.image_size, context.device)
        self._check_variant()
        torch.manual_seed(context.seed)
        gate_init = 0.0 if params.gate_init is None else params.gate_init
        self.model = MedCLIPSegModel(
            self.backbone,
            params.layers,
            params.adapter_dim,
            params.beta,
            gate_init,
            params.upscale_blocks,
            params.backbone_variant,
        ).to(context.device)
        self.resolved = {"epochs": params.epochs or 100, "gate_init": gate_init}
        from monai.losses import DiceLoss  # here, not at import: MONAI imports all its subpackages (seconds)

        # its call: [B, H, W] logits, so MONAI reads H as channels (a Dice per row, row 0 left out)
        self.dice = DiceLoss(include_background=False, sigmoid=True, reduction="mean")
        self.history: list[float] = []

    def _check_variant(self) -> None:
        """A variant's code path needs its kind of towers: BERT text for unimedclip and biomedclip (timm vision
        for biomedclip), CLIP text for clip and pubmedclip."""
        variant, backbone = self.params.backbone_variant, self.backbone
        bert, timm = variant in ("unimedclip", "biomedclip"), variant == "biomedclip"
        if backbone.hf_text != bert or backbone.timm_vision != timm:
            towers = f"{'a BERT' if bert else 'the CLIP'} text tower and {'a timm' if timm else 'an open_clip'} ViT"
            raise BenchmarkError(
                f"medclipseg: backbone_variant '{variant}' runs on {towers}; backbone "
                f"'{self.context.backbone.label()}' has {'a BERT' if backbone.hf_text else 'the CLIP'} text tower "
                f"and {'a timm' if backbone.timm_vision else 'an open_clip'} ViT"
            )

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Images in the channel order its loader feeds (``colour``: bgr as cv2.imread reads them)."""
        return images.flip(1) if self.params.colour == "bgr" else images

    def prompts(self, texts: tuple[str | None, ...], organs: list[str]) -> list[str]:
        """Each image's own description, else ``prompt`` with its dataset's organ word."""
        texts = texts or (None,) * len(organs)
        return [t or self.params.prompt.format(organ=o) for t, o in zip(texts, organs, strict=True)]

    def loss(self, images: torch.Tensor, masks: torch.Tensor, texts: list[str]) -> torch.Tensor:
        p = self.params
        patches, text = self.model.encode(self.inputs(images), self.backbone.tokenize(texts))
        logits = self.model.logits(patches, text, images.shape[-1])
        target = masks.float()
        seg = p.dice_weight * self.dice(logits, target) + p.bce_weight * F.binary_cross_entropy_with_logits(
            logits, target
        )
        return seg + p.contrastive_weight * soft_contrastive(patches, text, p.temperature)

    def fit(self, train: TrainSet) -> None:
        p, device = self.params, self.context.device
        generator = torch.Generator().manual_seed(self.context.seed)
        organ_of = {s.path: train.datasets[s.dataset].organ for s in train.samples}
        sources = {s.dataset for s in train.samples}
        source = next(iter(sources)) if len(sources) == 1 else ""  # its config: that of the set it trains on
        epochs = p.epochs or DATASET_EPOCHS.get(source, 100)  # its config's for the training set
        if p.gate_init is None and source in DATASET_GATE_INIT:
            with torch.no_grad():
                for module in self.model.modules():
                    if isinstance(module, ProbabilisticCrossAttention):
                        module.gate.fill_(DATASET_GATE_INIT[source])
            self.resolved["gate_init"] = DATASET_GATE_INIT[source]
        self.resolved["epochs"] = epochs

        def step(batch) -> torch.Tensor:
            images, masks = batch.images.to(device), batch.masks.to(device)
            if p.rotate:
                images, masks = rotate_half(images, masks, generator)
            return self.loss(images, masks, self.prompts(batch.texts, [organ_of[path] for path in batch.paths]))

        # its training runs in fp32 (no autocast), so on CUDA too
        config = training.TrainConfig(epochs=epochs, lr=p.lr, amp=False, progress=p.progress)
        self.model.train()
        self.backbone.text_train(self.backbone.hf_text)  # BERT's dropout on while training, as its model.train()
        try:
            self.history = training.fit(
                self.model.parameters(),
                step,
                lambda _epoch: train.batches(p.batch_size, generator),
                config,
                device,
                desc=f"medclipseg {self.context.dataset.name}",
                lr_at=training.cosine(p.lr, p.lr_min, epochs),
            )
        finally:
            self.backbone.text_train(False)  # the backbone is shared by the process's later cells
        self.model.eval()

    def import_official(self, state: dict, where: str) -> None:
        """Its ``train.py``: ``torch.save({'model': model.state_dict(), 'epoch', 'optimizer', 'scheduler', ...})``;
        of ``model`` the trainable ``pvl_adapters.*``, ``mask_head.*`` and ``upscale.*`` (its frozen backbone,
        ``vision_model.*``, ``text_model.*``, ``clip_model.*``, ``logit_scale``, is this cell's)."""
        tensors = {k.removeprefix("module."): v for k, v in tensors_of(state, where, "model").items()}
        self._check_backbone(tensors, where)
        mapped, origin = {}, {}
        for key, tensor in tensors.items():
            if key.startswith(OFFICIAL_FROZEN):
                continue
            ours = key
            if key.startswith("pvl_adapters."):
                ours = "adapters." + key.removeprefix("pvl_adapters.")
                for theirs, mine in OFFICIAL_NAMES:
                    ours = ours.replace(theirs, mine, 1)
            mapped[ours], origin[ours] = tensor, key
        load_mapped(self.model, mapped, origin, where, "MedCLIPSeg's adapters and head")
        self.model.eval()

    def _check_backbone(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Refuse a file trained on another backbone than this cell's: the patch embedding its file holds (a copy
        of its frozen backbone) against ours, within the fp16 rounding its PubMedCLIP loader applies."""
        visual = self.backbone.visual
        ours = visual.trunk.patch_embed.proj.weight if self.backbone.timm_vision else visual.conv1.weight
        for key in OFFICIAL_PATCH_EMBEDDINGS:
            if key in tensors:
                theirs = tensors[key].to(ours)
                gap = float((theirs - ours).abs().max()) if theirs.shape == ours.shape else math.inf
                if gap > 1e-3 * float(ours.abs().max()):
                    raise BenchmarkError(
                        f"{where}: key '{key}' differs from this cell's backbone ({self.context.backbone.label()}) by "
                        f"{gap:.3g}: a file trained on another backbone"
                    )
                return

    @torch.no_grad()
    def predict(self, batch: ImageBatch) -> Prediction:
        images = self.inputs(batch.images.to(self.context.device))
        tokens = self.backbone.tokenize(self.prompts(batch.texts, [self.context.dataset.organ] * len(images)))
        total = torch.zeros(images.shape[0], images.shape[-2], images.shape[-1], device=images.device)
        for _ in range(self.params.samples):
            patches, text = self.model.encode(images, tokens)
            total += torch.sigmoid(self.model.logits(patches, text, images.shape[-1]))
        mean = total / self.params.samples
        entropy = -(mean * torch.log(mean + 1e-8) + (1 - mean) * torch.log(1 - mean + 1e-8))
        return Prediction(mean.flatten(1).amax(-1), mean, uncertainty=entropy)

    def effective_params(self) -> dict[str, object]:
        """Its parameters with the per-dataset values of its configs filled in (epochs, gate_init)."""
        return super().effective_params() | self.resolved

    def describe(self) -> dict[str, object]:
        return {
            "variant": "MedCLIPSeg",
            "trainable_params": sum(q.numel() for q in self.model.parameters()),
            "backbone": self.context.backbone.label(),
            "mc_samples": self.params.samples,
            "final_train_loss": round(self.history[-1], 6) if self.history else float("nan"),
        }
