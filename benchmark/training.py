"""The training loop shared by every trained method: optimizer, epochs, progress bar, seeding, device
placement, mixed precision as the cell's precision says (``benchmark.precision``), gradient clipping, and a
per-epoch hook for model selection.

A method supplies the parameters to train, a ``step(batch) -> loss`` function and the batches of an epoch;
the loop owns everything else, so that methods differ only in their maths.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence, Sized
from dataclasses import dataclass

import torch
from tqdm import tqdm

from benchmark import environment, precision


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 50
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | adamw | sgd
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9  # SGD's
    weight_decay: float = 0.0
    grad_clip: float | None = None
    amp: bool = True  # the method allows mixed-precision training (the cell's bf16 or fp16); False: fp32 always
    progress: bool = True


class Counted:
    """An epoch's batches streamed, their number known beforehand: a schedule (``fit``'s ``lr_at``) needs the
    epoch's length, and a plain iterator would be read into a list first."""

    def __init__(self, batches: Iterable[object], count: int) -> None:
        self.batches, self.count = batches, count

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return self.count


def make_optimizer(params: Iterable[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient")
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer '{config.optimizer}' (adam, adamw, sgd)")


def fit(
    params: Iterable[torch.nn.Parameter],
    step: Callable[[object], torch.Tensor],
    epoch_batches: Callable[[int], Iterable[object]],
    config: TrainConfig,
    device: torch.device,
    desc: str = "train",
    on_epoch_end: Callable[[int, float], None] | None = None,
    lr_at: Callable[[int, int, int], float] | None = None,
    optimizers: Sequence[torch.optim.Optimizer] = (),
) -> list[float]:
    """Train for ``config.epochs`` epochs; returns the mean loss of each epoch.

    ``epoch_batches(epoch)`` yields the batches of one epoch (the method shuffles them with its own seeded
    generator); ``step`` moves a batch to ``device`` itself and returns a scalar loss, or None to skip the
    batch. ``lr_at(epoch, index, count)`` sets the learning rate before each step (a schedule). ``optimizers``:
    the method's own, each stepped after every backward pass (SimpleNet: AdamW for its adaptor, Adam for its
    discriminator), instead of one made from ``config``.
    """
    params = [p for p in params if p.requires_grad]
    optimizers = list(optimizers) or [make_optimizer(params, config)]
    if lr_at is not None and len(optimizers) > 1:
        raise ValueError("one learning-rate schedule cannot drive several optimisers with their own rates")
    policy = precision.active()
    amp_dtype = precision.dtype(policy.name) if config.amp else None
    policy.trained_in = policy.name if config.amp or policy.name == "tf32" else "fp32"
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    history: list[float] = []
    # epochs shown on a terminal in the driver process; never in logs or workers
    quiet = not config.progress or environment.in_worker()
    bar = tqdm(
        range(config.epochs), desc=desc, unit="epoch", disable=True if quiet else None, leave=False, dynamic_ncols=True
    )
    for epoch in bar:
        total, count = 0.0, 0
        batches = epoch_batches(epoch)
        if lr_at is not None and not isinstance(batches, Sized):
            batches = list(batches)  # a schedule needs the epoch's length; otherwise batches stream from disk
        for index, batch in enumerate(batches):
            if lr_at is not None:
                for group in (g for optimizer in optimizers for g in optimizer.param_groups):
                    group["lr"] = lr_at(epoch, index, len(batches))
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = step(batch)
            if loss is None:
                continue
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip is not None:
                for optimizer in optimizers:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            for optimizer in optimizers:
                scaler.step(optimizer)
            scaler.update()
            total += float(loss.detach())
            count += 1
        history.append(total / max(count, 1))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, history[-1])
    return history


def poly(lr: float, epochs: int) -> Callable[[int, int, int], float]:
    """``lr_at`` of TransUNet's trainer (Swin-Unet's too): ``lr (1 - t/T)^0.9`` set after each step from the ``t``
    steps before it, so the first two steps run at ``lr``."""
    return lambda epoch, index, count: lr * (1 - max(epoch * count + index - 1, 0) / (epochs * count)) ** 0.9


def cosine(lr: float, lr_min: float, epochs: int) -> Callable[[int, int, int], float]:
    """``lr_at`` of PyTorch's ``CosineAnnealingLR(T_max=epochs, eta_min=lr_min)`` stepped once an epoch (MedCLIPSeg's
    and Rolling-UNet's training)."""
    return lambda epoch, _index, _count: lr_min + (lr - lr_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2
