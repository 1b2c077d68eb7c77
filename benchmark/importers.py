"""Checkpoints a protocol names (``checkpoint: PATH``): our fit files, and the authors' released files
(``checkpoint_format: official``) through each method's ``import_official``.

A checkpoint is data, never code: ours are safetensors; an official ``.pth`` is read with
``torch.load(weights_only=True)``, and a file that would need arbitrary unpickling is refused in one line.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmark import fits
from benchmark.errors import BenchmarkError

if TYPE_CHECKING:
    import torch

    from benchmark.method import Method, TrainSet

FORMATS = ("ours", "official")
SOURCES = {"ours": "checkpoint", "official": "authors' checkpoint"}  # what a row evaluated from one says


def torch_file(path: str | Path) -> Any:
    """A ``.pth`` file's tensors and plain containers; never its code."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise BenchmarkError(
            f"checkpoint '{path}': refused, it holds objects other than tensors and plain containers (loading them "
            "would run code it names)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise BenchmarkError(f"checkpoint '{path}' cannot be read ({str(exc).splitlines()[0][:200]})") from None


def load_checkpoint(method: Method, path: str, fmt: str, train: TrainSet) -> str:
    """Put the checkpoint at ``path`` into ``method`` in place of its fit; what the row is (``SOURCES``)."""
    where = f"checkpoint '{path}'"
    if fmt == "official":
        method.import_official(torch_file(path), where)
        method.complete_import(train)
    else:
        tensors, meta = fits.read_fit(Path(path))
        context = method.context
        fits.check_fits(meta, fits.identity(method, context.backbone.label(), context.image_size), where)
        fits.restore(method, tensors, meta["layout"])
    return SOURCES[fmt]


def load_mapped(
    module: torch.nn.Module, mapped: dict[str, torch.Tensor], origin: dict[str, str], where: str, what: str
) -> None:
    """Load ``mapped`` (our names) into ``module``, every key there with its shape and none missing; a mismatch
    names the first file key (``origin``: ours -> the file's) that does not fit."""
    ours = module.state_dict()
    for key, tensor in mapped.items():
        if key not in ours:
            raise BenchmarkError(f"{where}: key '{origin.get(key, key)}' has no place in {what}")
        if tuple(ours[key].shape) != tuple(tensor.shape):
            raise BenchmarkError(
                f"{where}: key '{origin.get(key, key)}' has shape {tuple(tensor.shape)}, {what} here needs "
                f"{tuple(ours[key].shape)} (a file of another backbone or configuration)"
            )
    missing = [k for k in ours if k not in mapped]
    if missing:
        raise BenchmarkError(f"{where}: no key for {what}'s '{missing[0]}' (a file of another method or configuration)")
    module.load_state_dict({k: v.to(ours[k].dtype) for k, v in mapped.items()})


def tensors_of(state: Any, where: str, key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict under ``key`` of a loaded file (the file itself without one); a file without it is refused."""
    import torch

    found = state.get(key) if key is not None and isinstance(state, dict) else state
    if not isinstance(found, dict) or not all(isinstance(v, torch.Tensor) for v in found.values()):
        keys = sorted(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise BenchmarkError(f"{where}: expected a state dict{f' under {key!r}' if key else ''}, found {keys}")
    return found
