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
from pathlib import Path

import open_clip
import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.timm_model import TimmModel
from torch import nn

from benchmark.backbones import unimedclip
from benchmark.backbones.cache import FeatureCache
from benchmark.backbones.medical import MEDICAL_CLIPS
from benchmark.backbones.weights import hub_snapshot, resolve_clip_weights, weights_identity
from benchmark.errors import BenchmarkError, WeightsUnavailableError
from benchmark.protocol import BackboneSpec

# a 4-layer BERT (open_clip's tokenizer: padding 0, its start token as [CLS])
TINY_BERT = {
    "vocab_size": 49408,
    "hidden_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "intermediate_size": 192,
    "max_position_embeddings": 77,
    "pad_token_id": 0,
}
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
    "tiny-vit-bert": {  # UniMedCLIP's shape: an open_clip ViT and a BERT text tower ([CLS] pooled, MLP projection)
        "embed_dim": 64,
        "vision_cfg": {"layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
        "bert": TINY_BERT,
    },
    "tiny-timm-bert": {  # BiomedCLIP's shape: a timm ViT in open_clip's TimmModel and a BERT text tower
        "embed_dim": 64,
        "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_pool": "", "timm_proj": "linear"},
        "timm": {
            "name": "vit_tiny_patch16_224",
            "kwargs": {"patch_size": 8, "depth": 4, "embed_dim": 128, "num_heads": 2},
        },
        "bert": TINY_BERT,
    },
    "tiny-unimedclip": {  # the shapes of tests/data/unimedclip_tiny.pt, written by UniMedCLIP's own code
        "embed_dim": 32,
        "vision_cfg": {"layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "bert": {
            "vocab_size": 1000,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 77,
            "pad_token_id": 0,
        },
    },
    "tiny-vit-8l": {
        "embed_dim": 64,
        "vision_cfg": {"layers": 8, "width": 128, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
    },
}
HF_HUB, LOCAL_DIR = "hf-hub:", "local-dir:"
# model configs we ship (open_clip finds them by name), each with the mapping of its publishers' checkpoint
open_clip.add_model_config(Path(__file__).parent / "model_configs")
SHIPPED_CONFIGS = {unimedclip.MODEL: unimedclip}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
Adapter = Callable[[torch.Tensor], torch.Tensor]
BlockOverride = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (block, tokens in) -> tokens out


class ClipBackbone(nn.Module):
    """Frozen open_clip model with block-wise access to both towers.

    The vision tower is open_clip's ``VisionTransformer`` or a timm ViT in open_clip's ``TimmModel``
    (BiomedCLIP); the text tower open_clip's causal transformer or a Hugging Face BERT in its ``HFTextEncoder``
    (UniMedCLIP, BiomedCLIP). The primitives below dispatch to whichever the model has; run block by block,
    they equal the model's own ``encode_image`` and ``encode_text``."""

    def __init__(self, model: nn.Module, spec: BackboneSpec, tokenizer: Callable, mean, std) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.spec = spec
        self.tokenizer = tokenizer
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        visual = model.visual
        self.timm_vision = isinstance(visual, TimmModel)
        if self.timm_vision:
            if getattr(visual.trunk, "global_pool", "token") != "token" or not hasattr(visual.trunk, "blocks"):
                raise BenchmarkError(f"backbone.model: '{spec.model}': its timm tower is no ViT pooled on [CLS]")
        elif getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise BenchmarkError(f"backbone.model: '{spec.model}' pools without a [CLS] token; use a ViT CLIP")
        self.visual = visual
        self.hf_text = isinstance(getattr(model, "text", None), HFTextEncoder)
        if self.hf_text and type(model.text.pooler).__name__ != "ClsLastHiddenStatePooler":
            raise BenchmarkError(
                f"backbone.model: '{spec.model}': its text tower pools with {type(model.text.pooler).__name__}; "
                "block by block only the [CLS] token's last hidden state (cls_last_hidden_state_pooler) is supported"
            )

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.trunk.blocks if self.timm_vision else self.visual.transformer.resblocks

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def width(self) -> int:
        return self.visual.trunk.embed_dim if self.timm_vision else self.visual.transformer.width

    @property
    def embed_dim(self) -> int:
        if self.timm_vision:
            return [m for m in self.visual.head.modules() if isinstance(m, nn.Linear)][-1].out_features
        return self.visual.output_dim

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.visual.trunk.patch_embed.grid_size if self.timm_vision else self.visual.grid_size)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's mean/std normalisation of images in [0,1]."""
        return (images - self.mean) / self.std

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding + [CLS] + positional embedding + ln_pre: the tokens entering block 1."""
        if self.timm_vision:
            trunk = self.visual.trunk
            return trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(images))))
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
        if overrides and self.timm_vision:
            raise BenchmarkError(f"'{self.spec.model}': block overrides need open_clip's ViT blocks, not timm's")
        outputs: dict[int, torch.Tensor] = {}
        for index in range(start, end + 1):
            block = self.blocks[index - 1]
            x = overrides[index](block, x) if overrides and index in overrides else block(x)
            if index in layers:
                outputs[index] = x
            if adapters and index in adapters:
                x = adapters[index](x)
        return x, outputs

    def post_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The norm after the last block (open_clip's ``ln_post``, timm's ``norm``)."""
        return self.visual.trunk.norm(x) if self.timm_vision else self.visual.ln_post(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The vision tower's projection into the joint space, alone (no norm)."""
        if self.timm_vision:
            return self.visual.head(x)
        return x @ self.visual.proj if self.visual.proj is not None else x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The post-norm on the [CLS] token and the projection: the image embedding in the joint space."""
        if self.timm_vision:
            return self.visual.head(self.visual.trunk.forward_head(self.post_norm(x)))
        return self.project(self.post_norm(x[:, 0]))

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The post-norm and projection applied to every token (patch features in the joint space)."""
        return self.project(self.post_norm(tokens))

    def forward_features(
        self, images: torch.Tensor, layers: Sequence[int] = (), adapters: Mapping[int, Adapter] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """Normalised images -> (image embedding, last tokens after the post-norm, tokens of ``layers``)."""
        x, outputs = self.run_blocks(self.embed(images), layers, adapters)
        return self.pool(x), self.post_norm(x), outputs

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(prompts)).to(self.mean.device)

    @property
    def text_blocks(self) -> nn.ModuleList:
        return self.model.text.transformer.encoder.layer if self.hf_text else self.model.transformer.resblocks

    @property
    def text_width(self) -> int:
        if self.hf_text:
            return self.model.text.config.hidden_size
        return self.model.ln_final.weight.shape[0]

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, L]`` -> the word embeddings alone ``[B, L, width]`` (learnable prompts replace some)."""
        if self.hf_text:
            return self.model.text.transformer.embeddings.word_embeddings(tokens)
        return self.model.token_embedding(tokens)

    def text_end(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B]``: the position of each prompt's last token (CLIP's EOT, the largest id; BERT's [SEP], the last
        token before the padding)."""
        if self.hf_text:
            return (tokens != self.model.text.config.pad_token_id).sum(-1) - 1
        return tokens.argmax(-1)

    def text_attention(self, end: torch.Tensor, length: int) -> torch.Tensor | None:
        """The text blocks' attention mask for prompts ending at ``end`` ``[B]``: BERT's additive padding mask
        ``[B, 1, 1, L]`` (0 on tokens, the dtype's minimum on padding); None for CLIP's causal tower (its mask is
        built in)."""
        if not self.hf_text:
            return None
        valid = torch.arange(length, device=end.device)[None] <= end[:, None]
        dtype = self.model.text.transformer.dtype
        return ((~valid)[:, None, None, :]).to(dtype) * torch.finfo(dtype).min

    def encode_token_embeddings(
        self, x: torch.Tensor, eot: torch.Tensor, text_hooks: Mapping[int, Adapter] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tower on token *embeddings* ``[B, L, width]`` (learnable prompts): the pooled embedding (at the
        EOT positions ``eot`` ``[B]`` for CLIP, the [CLS] token for BERT, whose padding starts after ``eot``) and
        every token's projected output ``[B, L, embed_dim]``. ``text_hooks[l]`` maps the tokens entering text
        block ``l`` (1-based)."""
        x = self.run_text(x, eot, text_hooks)
        tokens = self.text_project(x)
        if self.hf_text:  # as HFTextEncoder: the [CLS] token projected alone
            return self.text_pool(x, eot), tokens
        return tokens[torch.arange(len(eot), device=x.device), eot], tokens  # as before: all projected, EOT picked

    def run_text(
        self,
        x: torch.Tensor,
        eot: torch.Tensor,
        text_hooks: Mapping[int, Adapter] | None = None,
        causal: bool = True,
    ) -> torch.Tensor:
        """The text blocks on token *embeddings* ``[B, L, width]``: the last block's tokens, before the final norm and
        the projection (``encode_token_embeddings`` for the hooks and ``eot``). ``causal=False`` runs CLIP's blocks
        without their causal mask (MadCLIP's prompt encoder calls them so)."""
        bad = [ly for ly in text_hooks or {} if not 1 <= ly <= len(self.text_blocks)]
        if bad:
            raise BenchmarkError(f"text layer {bad[0]} out of range 1..{len(self.text_blocks)} for '{self.spec.model}'")
        if self.hf_text:
            x = self.model.text.transformer.embeddings(inputs_embeds=x)
        else:
            x = x + self.model.positional_embedding.to(x.dtype)
        attention = self.text_attention(eot, x.shape[1])
        for index in range(1, len(self.text_blocks) + 1):
            if text_hooks and index in text_hooks:
                x = text_hooks[index](x)
            x = self.text_block(index, x, attention, causal)
        return x

    def embed_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, L]`` -> what enters text block 1 (word + positional embeddings; BERT's also its
        token-type embedding, LayerNorm and dropout)."""
        if self.hf_text:
            return self.model.text.transformer.embeddings(input_ids=tokens)
        x = self.model.token_embedding(tokens)
        return x + self.model.positional_embedding.to(x.dtype)

    def text_block(
        self, index: int, x: torch.Tensor, attention: torch.Tensor | None = None, causal: bool = True
    ) -> torch.Tensor:
        """Text block ``index`` (1-based): CLIP's under its causal mask; BERT's under ``attention``
        (``text_attention``). A ``BertLayer`` returns a tuple in transformers 4.x and a tensor in 5.x."""
        if self.hf_text:
            out = self.text_blocks[index - 1](x, attention_mask=attention)
            return out[0] if isinstance(out, tuple) else out
        return self.text_blocks[index - 1](x, attn_mask=self.model.attn_mask if causal else None)

    def text_project(self, x: torch.Tensor) -> torch.Tensor:
        """Every token ``[B, L, width]`` into the joint space ``[B, L, embed_dim]``: CLIP's ``ln_final`` and
        projection; BERT's projection (open_clip's ``HFTextEncoder.proj``) alone."""
        if self.hf_text:
            return self.model.text.proj(x)
        x = self.model.ln_final(x)
        proj = self.model.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def text_pool(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """The text embedding: CLIP's EOT token (positions ``eot`` ``[B]``) after ``ln_final`` and the projection;
        BERT's [CLS] token's last hidden state through the projection."""
        if self.hf_text:
            return self.model.text.proj(x[:, 0])
        return self.text_project(x[torch.arange(len(eot), device=x.device), eot])

    def text_train(self, mode: bool) -> None:
        """Switch the text tower's dropout on (``mode``) or off; its weights stay frozen. BERT's dropout runs in
        training where a method's code trains with it (MedCLIPSeg); CLIP's text tower has none."""
        (self.model.text if self.hf_text else self.model.transformer).train(mode)

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

    ``spec.model`` is an open_clip name, a config we ship (``UniMedCLIP-ViT-B-16``), an ``hf-hub:`` name
    (BiomedCLIP) or a ``local-dir:`` folder (``open_clip_config.json`` and its weights); its weights a
    pretrained tag, a medical CLIP's tag (``benchmark.backbones.medical``), a checkpoint file or ``random-init``.
    Pretrained positional embeddings are resized to the image's grid with ``pos_interpolation``: open_clip's
    ``bicubic`` (antialiased), ``bilinear`` as AnomalyCLIP's CLIP does, or ``bicubic-no-antialias`` as AdaCLIP's
    (open_clip 2.16's) does."""
    if spec.random_init:
        model, tokenizer, mean, std = _random_init(spec, image_size)
    elif spec.model.startswith((HF_HUB, LOCAL_DIR)):
        model, tokenizer, mean, std = _named_model(spec, image_size, pos_interpolation)
    else:
        path, cfg = resolve_clip_weights(spec.model, spec.weights)
        _needs_transformers(spec.model)
        shipped = SHIPPED_CONFIGS.get(spec.model)
        if shipped is not None and spec.quick_gelu is False and open_clip.get_model_config(spec.model)["quick_gelu"]:
            raise BenchmarkError(
                f"backbone.quick_gelu: '{spec.model}' was trained with QuickGELU; false is not possible"
            )
        model = open_clip.create_model(
            spec.model,
            pretrained=None if shipped is not None else path,
            force_quick_gelu=bool(cfg.get("quick_gelu", False) if spec.quick_gelu is None else spec.quick_gelu),
            force_image_size=image_size if pos_interpolation == "bicubic" else None,
        )
        if shipped is not None:  # a checkpoint in its publishers' format, mapped onto open_clip's names
            shipped.load_into(model, path)
        if pos_interpolation != "bicubic":
            resize_positional(model.visual, image_size, pos_interpolation)
        tokenizer = open_clip.get_tokenizer(spec.model)
        mean, std = cfg.get("mean", OPENAI_MEAN), cfg.get("std", OPENAI_STD)
    return ClipBackbone(model, spec, tokenizer, mean, std).to(device)


def _random_init(spec: BackboneSpec, image_size: int) -> tuple[nn.Module, Callable, tuple, tuple]:
    """A seeded random-init model: one of ``TINY_CONFIGS`` or any open_clip architecture."""
    if spec.model not in TINY_CONFIGS and spec.model not in open_clip.list_models():
        raise BenchmarkError(f"backbone.model: unknown model '{spec.model}' (tiny configs: {sorted(TINY_CONFIGS)})")
    torch.manual_seed(spec.seed)
    quick_gelu = bool(spec.quick_gelu)
    if spec.model not in TINY_CONFIGS:
        _needs_transformers(spec.model)
        model = open_clip.create_model(
            spec.model, pretrained=None, force_image_size=image_size, force_quick_gelu=quick_gelu
        )
        return model, open_clip.get_tokenizer(spec.model), OPENAI_MEAN, OPENAI_STD
    cfg = TINY_CONFIGS[spec.model]
    vision = open_clip.CLIPVisionCfg(image_size=image_size, **cfg["vision_cfg"])
    if "bert" not in cfg:
        text = open_clip.CLIPTextCfg(**cfg["text_cfg"])
        model = open_clip.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu)
        return model, open_clip.tokenize, OPENAI_MEAN, OPENAI_STD
    _needs_transformers(spec.model, hf_text=True)
    from transformers import BertConfig

    # open_clip builds a Hugging Face text tower from the Hub's config only: a stand-in tower first, then the tiny
    # BERT in its place, built from its config as open_clip's HFTextEncoder does (UniMedCLIP's pooler and MLP)
    stub = open_clip.CLIPTextCfg(context_length=77, vocab_size=8, width=8, heads=1, layers=1)
    model = open_clip.CustomTextCLIP(cfg["embed_dim"], vision, stub, quick_gelu=quick_gelu)
    if "timm" in cfg:  # a timm ViT in open_clip's TimmModel, as BiomedCLIP's vision tower
        import timm

        t = cfg["timm"]
        trunk = timm.create_model(t["name"], pretrained=False, img_size=image_size, num_classes=0, **t["kwargs"])
        model.visual.trunk = trunk  # TimmModel builds its trunk at the name's own size and depth: a smaller one
        model.visual.head.proj = nn.Linear(model.visual.trunk.embed_dim, cfg["embed_dim"], bias=False)
        model.visual.image_size = (image_size, image_size)
    bert = BertConfig(**cfg["bert"])
    model.text = HFTextEncoder(
        "tiny-bert", cfg["embed_dim"], config=bert, pooler_type="cls_last_hidden_state_pooler", proj_type="mlp"
    )
    model.text.transformer.pooler = None  # as open_clip builds it for a [CLS]-token pooler: no BERT pooler
    return model, open_clip.tokenize, OPENAI_MEAN, OPENAI_STD


def _named_model(
    spec: BackboneSpec, image_size: int, pos_interpolation: str
) -> tuple[nn.Module, Callable, tuple, tuple]:
    """An ``hf-hub:`` model from the local Hugging Face cache, or a ``local-dir:`` folder; never downloads. Its
    weights come with the name: ``weights`` says so (``bundled``, or the medical CLIP's tag)."""
    known = next((c.tag for c in MEDICAL_CLIPS.values() if c.model == spec.model), None)
    if spec.weights not in ("bundled", known):
        also = f" or '{known}'" if known else ""
        raise BenchmarkError(
            f"backbone.weights: '{spec.model}' brings its own weights: write 'bundled'{also}, not '{spec.weights}'"
        )
    if pos_interpolation != "bicubic":
        raise BenchmarkError(f"backbone.model: '{spec.model}': positional embeddings resize bicubically only here")
    kind, _, where = spec.model.partition(":")
    if kind == "local-dir":
        folder = Path(where)
        if not (folder / "open_clip_config.json").is_file():
            raise WeightsUnavailableError(f"backbone.model: '{folder}' holds no open_clip_config.json")
        config = json.loads((folder / "open_clip_config.json").read_text())
    else:
        folder = hub_snapshot(where, spec.model, spec.weights)
        config = json.loads((folder / "open_clip_config.json").read_text())
    _needs_transformers(spec.model)
    vision = config.get("model_cfg", config).get("vision_cfg", {})
    size = vision.get("image_size", image_size)
    if size != image_size and "timm_model_name" in vision:
        raise BenchmarkError(
            f"backbone.model: '{spec.model}' runs at {size} px only (its timm tower), not {image_size}"
        )
    local = f"{LOCAL_DIR}{folder}"  # the cached snapshot, read as a local folder: no request to the Hub
    model = open_clip.create_model(local, force_image_size=image_size)
    pre = config.get("preprocess_cfg", {})
    return model, open_clip.get_tokenizer(local), pre.get("mean", OPENAI_MEAN), pre.get("std", OPENAI_STD)


def _needs_transformers(model: str, hf_text: bool | None = None) -> None:
    """A one-line error naming the extra when the model's text tower is a Hugging Face one (``hf_text``; None:
    as its name or open_clip config says) and transformers is absent."""
    if hf_text is None:
        named = model.startswith((HF_HUB, LOCAL_DIR))
        hf_text = named or "hf_model_name" in (open_clip.get_model_config(model) or {}).get("text_cfg", {})
    if not hf_text:
        return
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise BenchmarkError(
            f"backbone.model: '{model}' has a Hugging Face text tower, which needs transformers: "
            "pip install 'medad-bench[medical]'"
        ) from None


def resize_positional(visual: nn.Module, image_size: int, mode: str) -> None:
    """Resize a ViT's patch positional embeddings to the grid of ``image_size`` (``F.interpolate`` ``mode``,
    no corner alignment, no antialiasing: AnomalyCLIP's ``VisionTransformer.forward``; ``bicubic-no-antialias``:
    ``bicubic`` without antialiasing, open_clip 2.16's)."""
    patch = visual.patch_size[0] if isinstance(visual.patch_size, tuple) else visual.patch_size
    new = image_size // patch
    pos = visual.positional_embedding.data
    old = round((pos.shape[0] - 1) ** 0.5)
    if new != old:
        grid = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(grid, (new, new), mode=mode.removesuffix("-no-antialias"))
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
