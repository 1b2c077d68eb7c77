"""A fit as a file, and the store that reuses fits across cells, workers and invocations.

A method lists in ``fit_state`` the attributes its ``fit`` sets that ``predict`` needs beyond the frozen backbone
(modules, tensors, memory banks, calibration constants, as dotted paths: ``model.adapters``). ``save_fit`` writes
them as ``<key>.safetensors`` (every tensor) and ``<key>.json`` (the rest as JSON, the layout that rebuilds them,
the metadata: method, effective params, backbone, image size, fit key, the method's ``fit_version``, training
manifest hash, and the SHA-256 of the tensor file). The JSON is written last: a fit without it was never finished.
``restore`` puts them back into a freshly built method; predictions then equal the original's bit for bit.

A fit key (``fit_key``) hashes everything a fit depends on. ``FitStore`` keeps fits under the results folder (a
shared file system on a cluster, as the feature cache) and lets one process at a time train a key (a file lock):
a cell whose key is being trained waits for it, then loads it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmark.backbones.weights import weights_identity
from benchmark.data.layout import file_hash, file_sha256
from benchmark.errors import BenchmarkError

if TYPE_CHECKING:
    import torch

    from benchmark.method import Method, TrainSet

FORMAT = "medad-bench-fit/1"
PACKAGES = ("torch", "open_clip_torch", "timm", "transformers", "anomalib", "FrEIA")  # their versions key a fit


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _resolve(obj: Any, path: str) -> tuple[Any, str]:
    """The object holding the last part of ``path`` and that part's name."""
    *parents, leaf = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    return obj, leaf


def _frozen(module: torch.nn.Module) -> tuple[str, ...]:
    """Prefixes (``name.``) of the frozen backbones inside ``module``: never part of a fit (``ClipBackbone``,
    ``CnnBackbone``, and an anomalib ``TimmFeatureExtractor`` or timm model none of whose weights train)."""
    from benchmark.backbones.clip import ClipBackbone
    from benchmark.backbones.cnn import CnnBackbone

    def frozen(m: torch.nn.Module) -> bool:
        if isinstance(m, ClipBackbone | CnnBackbone):
            return True
        if type(m).__name__ == "TimmFeatureExtractor":  # its flag: runs under no_grad (STFPM's student trains)
            return not m.requires_grad
        weights = list(m.parameters()) if type(m).__module__.startswith("timm.") else []
        return bool(weights) and not any(w.requires_grad for w in weights)

    return tuple(f"{name}." for name, m in module.named_modules() if name and frozen(m))


def _encode(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON for ``value``; its tensors go into ``tensors`` under names starting with ``name``."""
    import torch

    if isinstance(value, torch.nn.Module):
        frozen = _frozen(value)
        for key, tensor in value.state_dict().items():
            if not key.startswith(frozen):
                tensors[f"{name}.{key}"] = tensor.detach().cpu().clone().contiguous()
        return {"module": name}
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().cpu().clone().contiguous()
        return {"tensor": name}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {"dict": {str(k): _encode(v, f"{name}.{k}", tensors) for k, v in value.items()}}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"fit state '{name}': cannot store a {type(value).__name__}")


def _decode(layout: Any, tensors: dict[str, torch.Tensor], device: torch.device) -> Any:
    if isinstance(layout, list):
        return [_decode(v, tensors, device) for v in layout]
    if not isinstance(layout, dict):
        return layout
    if "tensor" in layout:
        return tensors[layout["tensor"]].to(device)
    if "tuple" in layout:
        return tuple(_decode(v, tensors, device) for v in layout["tuple"])
    return {k: _decode(v, tensors, device) for k, v in layout["dict"].items()}


def _load_module(module: torch.nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """``module``'s state from ``tensors``; a buffer whose size the fit set (a memory bank) is replaced whole."""
    state = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
    current = module.state_dict()
    for key, tensor in state.items():
        if key in current and current[key].shape != tensor.shape:
            owner, leaf = _resolve(module, key)
            if leaf not in owner._buffers:
                raise BenchmarkError(f"fit state '{name}.{key}': shape {tuple(tensor.shape)}, the model's is "
                                     f"{tuple(current[key].shape)}")  # fmt: skip
            owner._buffers[leaf] = tensor.to(current[key].device)
    frozen = _frozen(module)
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(frozen)]
    if missing or unexpected:
        raise BenchmarkError(f"fit state '{name}': {'no ' + missing[0] if missing else 'unknown ' + unexpected[0]}")


def state_of(method: Method) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The method's fit state: its tensors and the layout of every ``fit_state`` attribute."""
    tensors: dict[str, torch.Tensor] = {}
    layout = {}
    for path in method.fit_state:
        owner, leaf = _resolve(method, path)
        layout[path] = _encode(getattr(owner, leaf), path, tensors)
    return tensors, layout


def restore(method: Method, tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> None:
    """Put a fit state back into a freshly built ``method``."""
    import torch

    missing, unknown = sorted(set(method.fit_state) - set(layout)), sorted(set(layout) - set(method.fit_state))
    if missing or unknown:
        problem = f"no {missing[0]!r}, which" if missing else f"{unknown[0]!r}, which no"
        raise BenchmarkError(f"the fit holds {problem} '{method.name}' of this version keeps")
    device = method.context.device
    for path, value in layout.items():
        owner, leaf = _resolve(method, path)
        current = getattr(owner, leaf, None)
        if isinstance(value, dict) and "module" in value:
            if not isinstance(current, torch.nn.Module):
                raise BenchmarkError(f"fit state '{path}': a module in the file, not in '{method.name}'")
            _load_module(current, path, tensors)
            current.eval()  # as fit leaves its modules (dropout off)
        else:
            setattr(owner, leaf, _decode(value, tensors, device))


def save_fit(folder: Path, key: str, method: Method, meta: dict[str, Any]) -> dict[str, Any]:
    """``folder/<key>.safetensors`` and ``folder/<key>.json`` (last: the fit is complete once it is there); the
    metadata written (``meta`` with the key, the layout, the tensor file's SHA-256 and size)."""
    from safetensors.torch import save_file

    tensors, layout = state_of(method)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.safetensors"
    tmp = folder / f".{key}.{os.getpid()}.partial"
    try:
        save_file(tensors, str(tmp))
        digest, size = file_sha256(tmp), tmp.stat().st_size
        os.replace(tmp, path)
        info = {"format": FORMAT, "key": key, **meta, "layout": layout, "sha256": digest, "bytes": size}
        tmp.write_text(json.dumps(info, indent=1, default=str))
        os.replace(tmp, folder / f"{key}.json")
    finally:
        tmp.unlink(missing_ok=True)
    return info


def read_meta(path: Path) -> dict[str, Any]:
    """A fit file's metadata (``x.json`` beside ``x.safetensors``); a one-line error when absent or unreadable."""
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        raise BenchmarkError(f"fit file '{path}' does not exist")
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise BenchmarkError(
            f"fit file '{path}' has no metadata '{meta_path.name}' beside it (an authors' file needs "
            "checkpoint_format: official)"
        ) from None
    except (OSError, ValueError) as exc:
        raise BenchmarkError(f"fit file '{path}': its metadata '{meta_path}' cannot be read ({exc})") from None
    if meta.get("format") != FORMAT:
        raise BenchmarkError(f"fit file '{path}': metadata of format {meta.get('format')!r}, expected '{FORMAT}'")
    return meta


def read_fit(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A fit's tensors and metadata, its tensor file checked against the SHA-256 the metadata holds (a truncated or
    corrupt file is an error naming it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_meta(path)
    if file_sha256(path) != meta.get("sha256"):
        raise BenchmarkError(f"fit file '{path}' is corrupt or truncated (its SHA-256 differs from its metadata's)")
    try:
        return load_file(str(path)), meta
    except SafetensorError as exc:
        raise BenchmarkError(f"fit file '{path}' cannot be read ({exc})") from None


def check_fits(meta: dict[str, Any], wanted: dict[str, Any], where: str, params: dict[str, Any] | None = None) -> None:
    """Refuse, in one line, a fit whose metadata differs from ``wanted`` (method, maths version, backbone, image
    size) or whose parameters, as the protocol gave them, from ``params``."""
    given = meta.get("cell_params", {})
    checks = [(key, meta.get(key), value) for key, value in wanted.items()]
    checks += [(f"parameter {key}", given.get(key), value) for key, value in (params or {}).items()]
    for what, found, value in checks:
        if found != (list(value) if isinstance(value, tuple) else value):
            hint = " (an authors' file needs checkpoint_format: official)" if what == "method" else ""
            raise BenchmarkError(f"{where}: {what} {found!r} in the fit, {value!r} here{hint}")


def identity(method: type[Method] | Method, backbone_label: str, image_size: int) -> dict[str, Any]:
    """What a fit must share with the cell that loads it: the method, its maths version, backbone and image size."""
    return {"method": method.name, "fit_version": method.fit_version, "backbone": backbone_label,
            "image_size": image_size}  # fmt: skip


def samples_hash(samples) -> str:
    """One hash of what a set of samples holds: each image's and mask's bytes, label, mask threshold and
    description."""
    rows = sorted(
        f"{file_hash(s.path)} {s.label} {file_hash(s.mask) if s.mask else '-'} {s.mask_threshold} {s.text or ''}"
        for s in samples
    )
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def fit_key(cls: type[Method], cell: dict[str, Any], train: TrainSet, precision: str) -> str:
    """The key of what ``cls.fit`` makes of ``train`` in a cell (``cell``: its fields, ``dataclasses.asdict``): the
    method, its fit parameters and maths version, the versions of the libraries that compute it, backbone and
    weights, image size, resizing, precision, seed, setting, K, and the content of every image it trains on (target
    and auxiliary pools, validation images); the target's card where the fit reads it."""
    cards = {s.dataset for s in (*train.samples, *train.auxiliary, *train.valid)}
    if cls.fit_reads_target:
        cards.add(cell["dataset"])
    method = cell["plugin"] or cell["method"]
    blob = {
        "format": FORMAT,
        "method": method,
        "fit_version": cls.fit_version,
        "packages": {name: _version(name) for name in (*PACKAGES, *cls.libraries)},
        # a parameter naming a file (MCMIAD's text weights) is that file as it is now
        "params": {k: weights_identity(v) if isinstance(v, str) else v for k, v in cell["params"].items()
                   if k not in cls.test_params},
        "backbone": cell["backbone"],
        "weights": weights_identity(cell["backbone"]["weights"]),
        **{k: cell[k] for k in ("image_size", "resize", "seed")},
        **({k: cell[k] for k in ("setting", "shots")} if cls.reads_setting(cell["setting"]) else {}),
        "precision": precision,
        "train": samples_hash(train.samples),
        "auxiliary": samples_hash(train.auxiliary),
        "valid": samples_hash(train.valid) if cls.reads_valid else "",
        "cards": {n: [train.datasets[n].organ, train.datasets[n].masks, train.datasets[n].segmentation_only]
                  for n in sorted(cards)},
    }  # fmt: skip
    text = json.dumps(blob, sort_keys=True, default=str)
    return f"{method.replace(':', '-')}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"


class FitStore:
    """Fits by key in ``root`` (``<results>/fits``); ``claim`` lets one process at a time train a key."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    @contextmanager
    def claim(self, key: str) -> Iterator[None]:
        """Hold ``key``'s lock: a process that wants the same key waits here until this one has saved (or failed)."""
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / f".{key}.lock")):
            yield

    def find(self, key: str, newer_than: float = 0.0) -> tuple[tuple[dict, dict] | None, str]:
        """The stored fit of ``key`` (tensors, metadata) whose training began after ``newer_than``, else None; and
        why a stored one was not usable (corrupt, truncated), "" otherwise."""
        path = self.path(key)
        if not path.with_suffix(".json").is_file():
            return None, ""
        try:
            tensors, meta = read_fit(path)
        except BenchmarkError as exc:
            return None, f"{exc}; training it again"
        if meta.get("started", 0.0) < newer_than:  # trained by a run that began before this one (--refit)
            return None, ""
        return (tensors, meta), ""
