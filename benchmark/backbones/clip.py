"""A wrapper over an open_clip ViT that runs its blocks one by one.

It returns the [CLS] embedding and the tokens of chosen layers (1-based, as the papers count: layer ``l``
is the output of block ``l``), and lets a method insert modules between blocks: ``adapters[l]`` maps the
tokens after block ``l`` to the tokens that enter block ``l + 1``; ``overrides[l]`` runs block ``l`` in
its place (``benchmark/backbones/attention.py``: the block's attention recomputed with another similarity,
e.g. AnomalyCLIP's DPAM). The text tower runs block by block too: ``text_hooks[l]`` maps the tokens that
enter text block ``l`` (deep prompts that replace token positions, adapters).

Tests and the demo use ``tiny-vit`` (4 layers, width 128, patch 8; a 2-layer text tower), built from
open_clip's own ``CLIP`` class with seeded random weights and labelled ``random-init`` in every output.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence

import open_clip
import torch
from torch import nn

from benchmark.backbones.cache import FeatureCache, weights_identity
from benchmark.backbones.weights import resolve_clip_weights
from benchmark.errors import BenchmarkError
from benchmark.protocol import BackboneSpec

TINY_CONFIGS: dict[str, dict] = {
    "tiny-vit": {
        "embed_dim": 64,
        "vision_cfg": {"layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
    },
    "tiny-vit-twin": {  # equally deep towers, for methods that run them block by block side by side
        "embed_dim": 64,
        "vision_cfg": {"layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 96, "heads": 2, "layers": 4},
    },
    "tiny-vit-8l": {
        "embed_dim": 64,
        "vision_cfg": {"layers": 8, "width": 128, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
    },
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
Adapter = Callable[[torch.Tensor], torch.Tensor]
BlockOverride = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (block, tokens in) -> tokens out


class ClipBackbone(nn.Module):
    """Frozen open_clip model with block-wise access to its vision tower."""

    def __init__(self, model: open_clip.CLIP, spec: BackboneSpec, tokenizer: Callable, mean, std) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.spec = spec
        self.tokenizer = tokenizer
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        visual = model.visual
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise BenchmarkError(f"backbone.model: '{spec.model}' pools without a [CLS] token; use a ViT CLIP")
        self.visual = visual

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def width(self) -> int:
        return self.visual.transformer.width

    @property
    def embed_dim(self) -> int:
        return self.visual.output_dim

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.visual.grid_size)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's mean/std normalisation of images in [0,1]."""
        return (images - self.mean) / self.std

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding + [CLS] + positional embedding + ln_pre: the tokens entering block 1."""
        return self.visual._embeds(images)

    def run_blocks(
        self,
        x: torch.Tensor,
        layers: Sequence[int] = (),
        adapters: Mapping[int, Adapter] | None = None,
        start: int = 1,
        end: int | None = None,
        overrides: Mapping[int, BlockOverride] | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run blocks ``start..end`` (1-based, inclusive); returns the last tokens and those of ``layers``.

        ``overrides[l](block, x)`` runs in place of block ``l``. The tokens recorded for layer ``l`` are the
        block's output before ``adapters[l]`` is applied.
        """
        end = self.num_layers if end is None else end
        bad = [ly for ly in (*layers, *(adapters or {}), *(overrides or {})) if not 1 <= ly <= self.num_layers]
        if bad:
            raise BenchmarkError(f"layer {bad[0]} out of range 1..{self.num_layers} for '{self.spec.model}'")
        outputs: dict[int, torch.Tensor] = {}
        for index in range(start, end + 1):
            block = self.blocks[index - 1]
            x = overrides[index](block, x) if overrides and index in overrides else block(x)
            if index in layers:
                outputs[index] = x
            if adapters and index in adapters:
                x = adapters[index](x)
        return x, outputs

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """ln_post on the [CLS] token and the projection: the image embedding in the joint space."""
        pooled = self.visual.ln_post(x[:, 0])
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_post and projection applied to every token (patch features in the joint space)."""
        out = self.visual.ln_post(tokens)
        return out @ self.visual.proj if self.visual.proj is not None else out

    def forward_features(
        self, images: torch.Tensor, layers: Sequence[int] = (), adapters: Mapping[int, Adapter] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """Normalised images -> (image embedding, last tokens after ln_post, tokens of ``layers``)."""
        x, outputs = self.run_blocks(self.embed(images), layers, adapters)
        return self.pool(x), self.visual.ln_post(x), outputs

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(prompts)).to(self.mean.device)

    @property
    def text_blocks(self) -> nn.ModuleList:
        return self.model.transformer.resblocks

    def encode_token_embeddings(
        self, x: torch.Tensor, eot: torch.Tensor, text_hooks: Mapping[int, Adapter] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tower on token *embeddings* ``[B, L, width]`` (learnable prompts): the pooled embedding at the
        EOT positions ``eot`` ``[B]`` and every token's projected output ``[B, L, embed_dim]``.
        ``text_hooks[l]`` maps the tokens entering text block ``l`` (1-based)."""
        bad = [ly for ly in text_hooks or {} if not 1 <= ly <= len(self.text_blocks)]
        if bad:
            raise BenchmarkError(f"text layer {bad[0]} out of range 1..{len(self.text_blocks)} for '{self.spec.model}'")
        x = x + self.model.positional_embedding.to(x.dtype)
        for index in range(1, len(self.text_blocks) + 1):
            if text_hooks and index in text_hooks:
                x = text_hooks[index](x)
            x = self.text_block(index, x)
        tokens = self.text_project(x)
        return tokens[torch.arange(len(eot), device=x.device), eot], tokens

    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, L]`` -> token embeddings plus positional embeddings: what enters text block 1."""
        x = self.model.token_embedding(tokens)
        return x + self.model.positional_embedding.to(x.dtype)

    def text_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Text block ``index`` (1-based) under the tower's causal mask."""
        return self.text_blocks[index - 1](x, attn_mask=self.model.attn_mask)

    def text_project(self, x: torch.Tensor) -> torch.Tensor:
        """``ln_final`` and the text projection on every token ``[B, L, width]`` -> ``[B, L, embed_dim]``."""
        x = self.model.ln_final(x)
        proj = self.model.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def text_pool(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """The text embedding: the EOT token (positions ``eot`` ``[B]``) after ``ln_final`` and the projection."""
        return self.text_project(x[torch.arange(len(eot), device=x.device), eot])

    def text_recipe(self) -> dict:
        """What the frozen text tower's embeddings depend on: the model and its weights (random-init weights also on
        the image size: open_clip draws the text tower after the vision tower, whose size depends on it)."""
        spec = self.spec
        recipe = {"features": "text", "model": spec.model, "weights": weights_identity(spec.weights)}
        recipe["quick_gelu"] = spec.quick_gelu
        if spec.random_init:
            recipe |= {"seed": spec.seed, "image_size": list(self.visual.image_size)}
        return recipe

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], cache: FeatureCache | None = None) -> torch.Tensor:
        """L2-normalised text embeddings of the prompts, ``[len(prompts), embed_dim]``; with a ``cache``, computed
        once per text tower and exact prompt list, then read from disk."""
        prompts = list(prompts)

        def compute() -> torch.Tensor:
            out = self.model.encode_text(self.tokenizer(prompts).to(self.mean.device))
            return out / out.norm(dim=-1, keepdim=True)

        if cache is None:
            return compute()
        key = hashlib.sha1(json.dumps(prompts).encode()).hexdigest()
        return cache.entry(self.text_recipe(), key, compute).to(self.mean.device)


def to_grid(values: torch.Tensor) -> torch.Tensor:
    """Per-patch values ``[B, N, C]`` of a square patch grid -> ``[B, C, h, h]``."""
    side = round(values.shape[1] ** 0.5)
    return values.transpose(1, 2).reshape(values.shape[0], -1, side, side)


def load_clip(
    spec: BackboneSpec, image_size: int, device: torch.device | str = "cpu", pos_interpolation: str = "bicubic"
) -> ClipBackbone:
    """Build the backbone ``spec`` at ``image_size``; pretrained weights must be on this machine.

    Pretrained positional embeddings are resized to the image's grid with ``pos_interpolation``: open_clip's
    ``bicubic`` (antialiased), or ``bilinear`` as AnomalyCLIP's CLIP does."""
    if spec.random_init:
        if spec.model not in TINY_CONFIGS and spec.model not in open_clip.list_models():
            raise BenchmarkError(f"backbone.model: unknown model '{spec.model}' (tiny configs: {sorted(TINY_CONFIGS)})")
        torch.manual_seed(spec.seed)
        if spec.model in TINY_CONFIGS:
            cfg = TINY_CONFIGS[spec.model]
            vision = open_clip.CLIPVisionCfg(image_size=image_size, **cfg["vision_cfg"])
            text = open_clip.CLIPTextCfg(**cfg["text_cfg"])
            model = open_clip.CLIP(
                embed_dim=cfg["embed_dim"], vision_cfg=vision, text_cfg=text, quick_gelu=bool(spec.quick_gelu)
            )
        else:
            model = open_clip.create_model(
                spec.model, pretrained=None, force_image_size=image_size, force_quick_gelu=bool(spec.quick_gelu)
            )
        tokenizer = open_clip.tokenize
        mean, std = OPENAI_MEAN, OPENAI_STD
    else:
        path, cfg = resolve_clip_weights(spec.model, spec.weights)
        model = open_clip.create_model(
            spec.model,
            pretrained=path,
            force_quick_gelu=bool(cfg.get("quick_gelu", False) if spec.quick_gelu is None else spec.quick_gelu),
            force_image_size=image_size if pos_interpolation == "bicubic" else None,
        )
        if pos_interpolation != "bicubic":
            resize_positional(model.visual, image_size, pos_interpolation)
        tokenizer = open_clip.get_tokenizer(spec.model)
        mean, std = cfg.get("mean", OPENAI_MEAN), cfg.get("std", OPENAI_STD)
    return ClipBackbone(model, spec, tokenizer, mean, std).to(device)


def resize_positional(visual: nn.Module, image_size: int, mode: str) -> None:
    """Resize a ViT's patch positional embeddings to the grid of ``image_size`` (``F.interpolate`` ``mode``,
    no corner alignment, no antialiasing: AnomalyCLIP's ``VisionTransformer.forward``)."""
    patch = visual.patch_size[0] if isinstance(visual.patch_size, tuple) else visual.patch_size
    new = image_size // patch
    pos = visual.positional_embedding.data
    old = round((pos.shape[0] - 1) ** 0.5)
    if new != old:
        grid = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(grid, (new, new), mode=mode)
        visual.positional_embedding = nn.Parameter(torch.cat([pos[:1], grid[0].flatten(1).T]), requires_grad=False)
    visual.grid_size = (new, new)
    visual.image_size = (image_size, image_size)


_SHARED: dict[tuple, ClipBackbone] = {}


def shared_clip(
    spec: BackboneSpec, image_size: int, device: torch.device | str = "cpu", pos_interpolation: str = "bicubic"
) -> ClipBackbone:
    """One frozen backbone per (spec, size, device, interpolation) in this process, reused by every cell."""
    key = (spec, image_size, str(device), pos_interpolation)
    if key not in _SHARED:
        _SHARED.clear()
        _SHARED[key] = load_clip(spec, image_size, device, pos_interpolation)
    return _SHARED[key]
