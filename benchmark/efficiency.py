"""What a cell costs, measured as it runs: the efficiency figures papers print beside their accuracy.

Per finished cell (``CellResult.efficiency``, a record's ``efficiency``, MLflow metrics ``efficiency/*``):

- ``fit_s``: the method's ``fit``, wall clock (CUDA synchronised).
- ``model_ms_per_image``: ``predict`` on one batch of test images (the protocol's batch size, ``batch_images``),
  after the test pass (so warm), with the feature cache bypassed: what the model costs, not the cache;
  ``ms_per_image``: with the test pass's loading of batches (decoding, resizing) per image added;
  ``images_per_s``: one over the latter.
- ``peak_memory_mb``: the process's peak resident memory during the cell on the CPU (Linux ``VmHWM``, reset at the
  cell's start); ``torch.cuda.max_memory_allocated`` on a GPU.
- ``trainable_params`` and ``params``: the parameters of the method's modules, trainable and all (frozen
  backbones included).
- ``gflops_per_image``: one test image's whole forward pass, counted by torch's own ``FlopCounterMode`` with the
  feature cache bypassed (every module computes), so cached features never hide a backbone's cost. It counts
  through torch's dispatcher, so any model it runs is counted, unlike tracing counters (fvcore traces with the
  JIT and fails on data-dependent control flow; ptflops counts module hooks and misses functional calls).
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class LoadTimer:
    """Seconds the test pass spent waiting for its batches (decoding, resizing), and the images they held."""

    load_s: float = 0.0
    images: int = 0

    def timed(self, batches: Iterable) -> Iterator:
        """``batches`` with the time spent producing each one added to ``load_s``."""
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.load_s += time.perf_counter() - start
            self.images += len(batch.keys)
            yield batch


def time_forward(forward: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``forward()``, synchronised on CUDA."""
    synchronise(device)
    start = time.perf_counter()
    with torch.no_grad():
        forward()
    synchronise(device)
    return time.perf_counter() - start


def speed(load: LoadTimer, model_s: float, batch: int) -> dict[str, float]:
    """Per image: the model's time on a batch of ``batch`` test images, the loading's, both; images per second."""
    model_ms = 1000 * model_s / batch
    total_ms = model_ms + 1000 * load.load_s / max(load.images, 1)
    return {
        "batch_images": float(batch),
        "model_ms_per_image": model_ms,
        "ms_per_image": total_ms,
        "images_per_s": 1000 / total_ms if total_ms > 0 else float("nan"),
    }


def _status_kb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak-memory count of a cell: the GPU's allocator statistics, or the process's ``VmHWM`` (Linux lets
    a process reset its own by writing 5 to ``/proc/self/clear_refs``; elsewhere the process's lifetime peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: the lifetime peak (kilobytes on Linux, bytes on macOS)
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def modules_of(obj: Any) -> list[torch.nn.Module]:
    """The ``nn.Module``s an object holds in its attributes (and in their lists, tuples and dicts)."""
    found, seen = [], set()

    def visit(value: Any, depth: int) -> None:
        if isinstance(value, torch.nn.Module):
            if id(value) not in seen:
                seen.add(id(value))
                found.append(value)
        elif depth < 2 and isinstance(value, list | tuple):
            for v in value:
                visit(v, depth + 1)
        elif depth < 2 and isinstance(value, dict):
            for v in value.values():
                visit(v, depth + 1)

    for value in vars(obj).values():
        visit(value, 0)
    return found


def parameter_counts(obj: Any) -> dict[str, float]:
    """Trainable and all parameters of the modules ``obj`` holds, each parameter counted once."""
    params = {id(p): p for m in modules_of(obj) for p in m.parameters()}
    return {
        "trainable_params": float(sum(p.numel() for p in params.values() if p.requires_grad)),
        "params": float(sum(p.numel() for p in params.values())),
    }


def count_flops(forward: Callable[[], object], images: int) -> float:
    """GFLOPs per image of ``forward()`` on ``images`` images (torch's flop counter: matrix products and
    convolutions, 2 FLOPs per multiply-add)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        forward()
    return counter.get_total_flops() / max(images, 1) / 1e9
