"""The environment a run was made in: git commit, package versions, torch, CUDA and the device."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

WORKER_ENV = "MEDAD_BENCH_WORKER"  # set in worker processes: no per-cell progress bars (the driver shows the grid's)


def in_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


PACKAGES = ("torch", "torchvision", "open_clip_torch", "timm", "numpy", "scikit-learn", "mlflow", "pandas")


def git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip() or "unknown"
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def base() -> dict[str, str]:
    """Commit, Python, platform and package versions, without importing torch (the driver's environment)."""
    info = {"git_commit": git_commit(), "python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            info[f"pkg_{name}"] = version(name)
        except PackageNotFoundError:
            info[f"pkg_{name}"] = "absent"
    return info


def describe(device: torch.device) -> dict[str, str]:
    """The environment a cell ran in: ``base()`` and the device (the worker's, where workers run cells)."""
    import torch

    info = {**base(), "device": str(device), "cuda": torch.version.cuda or "none"}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
