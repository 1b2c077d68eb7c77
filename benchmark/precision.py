"""The numerical precision a cell runs in: ``precision: fp32 | tf32 | bf16 | fp16`` (protocol, or method entry).

- ``fp32``: float32 throughout; TF32 tensor-core matmuls and convolutions switched off on CUDA.
- ``tf32``: float32 tensors, TF32 matmuls and convolutions on CUDA (Ampere and later); the CPU has no TF32,
  so there it computes as ``fp32``.
- ``bf16`` / ``fp16``: ``torch.autocast`` to bfloat16 / float16 for every forward pass (on the CPU too), and for
  training where the method allows mixed precision (``TrainConfig.amp``), fp16 with loss scaling.

Unset, a cell runs in its method's ``reference_precision`` on CUDA (the precision its published code runs in on
a GPU) and in fp32 on the CPU. The precision is recorded per cell, enters the config hash and the feature-cache
recipes when it is not fp32, and is named in the tables' captions.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
DEFAULT = "fp32"


def problem(value: object) -> str | None:
    """Why ``value`` is not a precision, or None."""
    if value in PRECISIONS:
        return None
    return f"expected one of {', '.join(PRECISIONS)}, got {value!r}"


def resolve(asked: str | None, reference: str, device_type: str) -> str:
    """The precision a cell runs in: the one asked for, else the method's reference precision on CUDA and fp32
    elsewhere (the reference codes' own CPU path)."""
    if asked is not None:
        return asked
    return reference if device_type == "cuda" else DEFAULT


@dataclass
class Policy:
    """The active precision of this cell, and what its training loop ran in (None: nothing trained)."""

    name: str = DEFAULT
    trained_in: str | None = None


_ACTIVE: contextvars.ContextVar[Policy | None] = contextvars.ContextVar("precision", default=None)


def active() -> Policy:
    """The policy of the cell running now; outside a cell, fp32."""
    return _ACTIVE.get() or Policy()


def dtype(name: str):
    """The autocast dtype of ``name``, or None for the float32 precisions."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)


@contextlib.contextmanager
def running(name: str, device_type: str) -> Iterator[Policy]:
    """Everything inside computes in precision ``name`` on ``device_type``: TF32 flags set (and restored), and
    autocast for bf16 and fp16."""
    import torch

    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
    policy = Policy(name)
    token = _ACTIVE.set(policy)
    try:
        with torch.autocast(device_type, dtype=dtype(name), enabled=dtype(name) is not None):
            yield policy
    finally:
        _ACTIVE.reset(token)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
