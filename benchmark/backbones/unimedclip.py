"""UniMedCLIP (Khattak et al., 2024; official code mbzuai-oryx/UniMed-CLIP) in pip open_clip, without its fork.

Its checkpoint (``unimed_clip_vit_b16.pt``) is the fork's training checkpoint: ``{"epoch", "name", "state_dict",
"optimizer", "scaler"}``, keys prefixed ``module.`` (DDP), the text tower under ``text_encoder.``. The fork's
model is open_clip's ``CustomTextCLIP``: a ViT-B/16 with QuickGELU and open_clip's own ``HFTextEncoder`` on
BiomedBERT (the [CLS] token's last hidden state, an MLP projection 768 -> 640 -> 512 without biases, no BERT
pooler), so the file loads strictly into pip open_clip under ``model_configs/UniMedCLIP-ViT-B-16.json`` once the
keys are renamed. Its tokenizer is BiomedBERT's with 256 tokens; its images are normalised with OpenAI's
constants.
"""

from __future__ import annotations

import _codecs

import numpy as np
import torch

from benchmark.errors import WeightsUnavailableError

MODEL = "UniMedCLIP-ViT-B-16"
# what the optimizer state of its training checkpoint pickles besides tensors: numpy scalars (the cosine
# schedule's learning rate); allowed by name, so the file still loads with weights_only=True (data, never code)
_SCALAR = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
NUMPY_GLOBALS = [
    (_SCALAR, "numpy.core.multiarray.scalar"),  # the name numpy 1.x pickled it under
    _SCALAR,
    np.dtype,
    type(np.dtype(np.float64)),
    _codecs.encode,
]


def load_into(model: torch.nn.Module, path: str) -> None:
    """The checkpoint at ``path`` loaded strictly into ``model`` (pip open_clip under our config), its positional
    embedding resized to the model's grid as open_clip resizes pretrained ones (bicubic, antialiased)."""
    from open_clip.model import resize_pos_embed

    weights = state_dict(path)
    resize_pos_embed(weights, model)
    own = model.state_dict()
    problems = [f"key '{k}' missing" for k in own if k not in weights]
    problems += [f"key '{k}' unexpected" for k in weights if k not in own]
    problems += [
        f"'{k}' is {tuple(v.shape)}, expected {tuple(own[k].shape)}"
        for k, v in weights.items()
        if k in own and v.shape != own[k].shape
    ]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise WeightsUnavailableError(f"backbone.weights: '{path}' does not fit {MODEL}: {problems[0]}{more}")
    model.load_state_dict(weights, strict=True)


def state_dict(path: str) -> dict[str, torch.Tensor]:
    """The checkpoint at ``path`` under pip open_clip's names: ``module.`` stripped, ``text_encoder.`` ->
    ``text.``; the position-id buffers older transformers saved dropped."""
    try:
        with torch.serialization.safe_globals(NUMPY_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        message = f"backbone.weights: '{path}' is no readable UniMedCLIP checkpoint ({reason})"
        raise WeightsUnavailableError(message) from None
    weights = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(weights, dict) or not any(k.endswith("visual.class_embedding") for k in weights):
        raise WeightsUnavailableError(f"backbone.weights: '{path}' holds no UniMedCLIP state dict (no visual.* keys)")
    out = {}
    for key, value in weights.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        if key.endswith(("embeddings.position_ids", "embeddings.token_type_ids")):
            continue
        out["text." + key.removeprefix("text_encoder.") if key.startswith("text_encoder.") else key] = value
    return out
