"""A deterministic synthetic data set in the BMAD layout, so everything runs on a fresh machine.

Three visually distinct "modalities" (so that leave-one-dataset-out means something):

- ``brain``: a head with a bright skull ring, folded cortex texture and dark ventricles; lesions are bright.
- ``liver``: a body outline with a brighter liver blob and CT-like speckle; lesions are dark, inside the liver.
- ``retina``: wavy horizontal retinal layers with OCT speckle; lesions are dark fluid pockets across layers.

Lesions vary in size, contrast and shape (thresholded smooth noise inside a random ellipse).
``render(..., anomalous=True)`` differs from ``render(..., anomalous=False)`` with the same arguments only
inside the mask, so every mask is exact; the files use distinct anatomies for normal and anomalous images.
Everything is a function of ``(seed, modality, split, state, index)``: the same call writes the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from benchmark.data.catalog import DatasetSpec

MODALITIES = {"SynthBrain": "brain", "SynthLiver": "liver", "SynthRetina": "retina"}
COMPLETE_MARKER = ".synthetic-complete"
ANOMALOUS_OFFSET = 100_000


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes of the synthetic set; the defaults keep the demo to minutes on two cores."""

    seed: int = 0
    image_size: int = 80
    train_normal: int = 16
    train_anomalous: int = 8
    valid_normal: int = 8
    valid_anomalous: int = 8
    test_normal: int = 12
    test_anomalous: int = 12

    def counts(self) -> dict[str, tuple[int, int]]:
        return {
            "train": (self.train_normal, self.train_anomalous),
            "valid": (self.valid_normal, self.valid_anomalous),
            "test": (self.test_normal, self.test_anomalous),
        }


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """White noise low-passed by a Gaussian in the Fourier domain, scaled to zero mean, unit std."""
    noise = rng.standard_normal((size, size))
    freq = np.fft.fftfreq(size)
    kernel = np.exp(-2 * (np.pi * sigma) ** 2 * (freq[:, None] ** 2 + freq[None, :] ** 2))
    out = np.real(np.fft.ifft2(np.fft.fft2(noise) * kernel))
    return (out - out.mean()) / (out.std() + 1e-8)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ax = (np.arange(size) + 0.5) / size * 2 - 1
    return np.meshgrid(ax, ax, indexing="ij")


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0):
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u, v = c * dy + s * dx, -s * dy + c * dx
    return (u / ry) ** 2 + (v / rx) ** 2


def _brain(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = _grid(n)
    r = _ellipse(yy, xx, rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05), 0.82, 0.68, rng.uniform(-0.2, 0.2))
    head = r < 1.0
    skull = (r > 0.86) & head
    folds = 0.5 + 0.5 * np.sin(14 * r + 2.5 * _smooth_noise(rng, n, 3.0))
    img = np.where(head, 0.35 + 0.25 * folds, 0.02)
    img = np.where(skull, 0.9, img)
    for side in (-1, 1):
        vent = _ellipse(yy, xx, rng.uniform(-0.1, 0.05), side * rng.uniform(0.12, 0.2), 0.22, 0.08, side * 0.3)
        img = np.where(vent < 1, 0.12, img)
    img = img + 0.03 * rng.standard_normal((n, n))
    region = (r < 0.75) & head
    return img, region


def _liver(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = _grid(n)
    body = _ellipse(yy, xx, 0.0, 0.0, 0.7, 0.9) < 1.0
    liver = _ellipse(
        yy, xx, rng.uniform(-0.25, -0.1), rng.uniform(-0.45, -0.3), 0.38, 0.42, rng.uniform(-0.4, 0.4)
    ) < 1.0 + 0.15 * _smooth_noise(rng, n, 6.0)
    spine = _ellipse(yy, xx, 0.5, 0.0, 0.12, 0.12) < 1.0
    img = np.where(body, 0.4, 0.0)
    img = np.where(liver & body, 0.62, img)
    img = np.where(spine, 0.95, img)
    img = img + body * 0.06 * rng.standard_normal((n, n)) + 0.04 * _smooth_noise(rng, n, 1.0)
    return img, liver & body


def _retina(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = _grid(n)
    wave = 0.08 * np.sin(2.5 * xx + rng.uniform(0, 6.28)) + 0.04 * _smooth_noise(rng, n, 10.0)
    depth = yy - wave - rng.uniform(-0.1, 0.1)
    img = np.zeros((n, n))
    bands = [(-0.6, -0.5, 0.85), (-0.5, -0.2, 0.45), (-0.2, 0.0, 0.3), (0.0, 0.3, 0.55), (0.3, 0.42, 0.95)]
    for top, bottom, value in bands:
        img = np.where((depth >= top) & (depth < bottom), value, img)
    speckle = rng.gamma(4.0, 0.25, (n, n))
    img = img * speckle * 0.9 + 0.03 * rng.standard_normal((n, n))
    return img, (depth > -0.5) & (depth < 0.3)


_BASES = {"brain": _brain, "liver": _liver, "retina": _retina}
_LESION_SIGN = {"brain": 1.0, "liver": -1.0, "retina": -1.0}


def _lesion(rng: np.random.Generator, n: int, region: np.ndarray) -> np.ndarray:
    """A random blob: an ellipse of random size and angle, its edge roughened by smooth noise."""
    yy, xx = _grid(n)
    candidates = np.argwhere(region)
    cy, cx = candidates[rng.integers(len(candidates))] / n * 2 - 1 + 1.0 / n
    radius = rng.uniform(0.08, 0.3)
    r = _ellipse(yy, xx, cy, cx, radius, radius * rng.uniform(0.5, 1.5), rng.uniform(0, np.pi))
    mask = (r < 1.0 + 0.35 * _smooth_noise(rng, n, 3.0)) & (r < 1.6) & region
    if mask.sum() < 6:
        mask = ((r < 1.0) & region) | (r < (6.0 / n / radius) ** 2)
    return mask


def render(modality: str, seed: int, split: str, index: int, anomalous: bool, size: int):
    """One image in [0,1] (float) and its mask (bool); the image outside the mask does not depend on it."""
    key = [seed, list(_BASES).index(modality), ("train", "valid", "test").index(split), index]
    img, region = _BASES[modality](np.random.default_rng(key), size)
    mask = np.zeros((size, size), dtype=bool)
    if anomalous:
        rng = np.random.default_rng([*key, 1])
        mask = _lesion(rng, size, region)
        contrast = rng.uniform(0.15, 0.5) * _LESION_SIGN[modality]
        texture = 1.0 + 0.2 * _smooth_noise(rng, size, 1.5)
        img = np.where(mask, img + contrast * texture, img)
    return np.clip(img, 0.0, 1.0), mask


def _complete(out: Path, config: SyntheticConfig) -> bool:
    """Whether ``out`` holds a complete copy written with ``config`` (its marker is written last)."""
    marker = out / COMPLETE_MARKER
    return marker.is_file() and marker.read_text() == repr(config)


def write_dataset(root: Path, spec: DatasetSpec, config: SyntheticConfig) -> Path:
    """Write one synthetic data set under ``root/spec.folder`` unless a complete copy is there already."""
    modality = MODALITIES[spec.name]
    out = Path(root) / spec.folder
    if _complete(out, config):
        return out
    for split, (n_good, n_bad) in config.counts().items():
        for state, count in (("good", n_good), ("Ungood", n_bad)):
            img_dir = out / split / state / "img"
            img_dir.mkdir(parents=True, exist_ok=True)
            for old in img_dir.glob("*.png"):
                old.unlink()
            if state == "Ungood":
                (out / split / state / "anomaly_mask").mkdir(parents=True, exist_ok=True)
            for i in range(count):
                # anomalous images get their own anatomies: index offset, so no normal twin is in the set
                index = i + ANOMALOUS_OFFSET * (state == "Ungood")
                img, mask = render(modality, config.seed, split, index, state == "Ungood", config.image_size)
                name = f"{split}_{state.lower()}_{i:04d}.png"
                Image.fromarray((img * 255).round().astype(np.uint8)).save(img_dir / name)
                if state == "Ungood":
                    Image.fromarray(mask.astype(np.uint8) * 255).save(out / split / state / "anomaly_mask" / name)
    (out / COMPLETE_MARKER).write_text(repr(config))
    return out


SEGMENTATION_SETS = {"SynthBrainSeg": "brain", "SynthLiverSeg": "liver"}  # MedCLIPSeg layout: a lesion in every image
FRACTION_FILES = (10, 25, 50)
DESIGNS = ("original", "contradictory", "missing_location", "overdescriptive", "underdescriptive")


def describe_lesion(mask: np.ndarray, organ: str, design: str = "original") -> str:
    """A MedCLIPSeg-style description of a mask: its size and where it lies, in one of the prompt designs."""
    ys, xs = np.nonzero(mask)
    share = mask.mean()
    size = "small" if share < 0.02 else "medium" if share < 0.06 else "large"
    rows, cols = ys.mean() / mask.shape[0], xs.mean() / mask.shape[1]
    vertical = "top" if rows < 1 / 3 else "bottom" if rows > 2 / 3 else ""
    horizontal = "left" if cols < 1 / 3 else "right" if cols > 2 / 3 else ""
    where = " ".join(w for w in (vertical, horizontal) if w) or "center"
    return {
        "original": f"One {size} lesion at the {where} of the {organ} image.",
        "contradictory": f"The {organ} appears normal, yet one {size} lesion is seen at the {where}.",
        "missing_location": f"One {size} lesion in the {organ} image.",
        "overdescriptive": f"One {size} irregular bright lesion with a rough edge at the {where} of the {organ} image, "
        "seen clearly against the surrounding tissue.",
        "underdescriptive": "A lesion.",
    }[design]


def write_segmentation_dataset(root: Path, spec: DatasetSpec, config: SyntheticConfig) -> Path:
    """Write a synthetic set in MedCLIPSeg's layout: ``{Train,Val,Test}_Folder/{img,label}`` (a lesion in every
    image) and ``Prompts_Folder`` with the full and 10/25/50 % listings and the five test prompt designs."""
    import pandas as pd

    modality = SEGMENTATION_SETS[spec.name]
    out = Path(root) / spec.folder
    if _complete(out, config):
        return out
    prompts = out / "Prompts_Folder"
    prompts.mkdir(parents=True, exist_ok=True)
    folders = {"train": "Train_Folder", "valid": "Val_Folder", "test": "Test_Folder"}
    for split, (n_good, n_bad) in config.counts().items():
        base = out / folders[split]
        for sub in ("img", "label"):
            (base / sub).mkdir(parents=True, exist_ok=True)
            for old in (base / sub).glob("*.png"):
                old.unlink()
        rows = {design: [] for design in DESIGNS}
        for i in range(n_good + n_bad):
            img, mask = render(modality, config.seed, split, i + ANOMALOUS_OFFSET, True, config.image_size)
            name = f"{split}_{i:04d}.png"
            Image.fromarray((img * 255).round().astype(np.uint8)).save(base / "img" / name)
            Image.fromarray(mask.astype(np.uint8) * 255).save(base / "label" / name)
            for design in DESIGNS:
                rows[design].append({"Image": name, "Description": describe_lesion(mask, spec.organ, design),
                                     "Ground Truth": name})  # fmt: skip
        if split == "test":
            for design in DESIGNS:
                pd.DataFrame(rows[design]).to_excel(prompts / f"Test_text_{design}.xlsx", index=False)
            continue
        stem = "Train_text" if split == "train" else "Val_text"
        full = pd.DataFrame(rows["original"])
        full.to_excel(prompts / f"{stem}.xlsx", index=False)
        order = np.random.default_rng([config.seed, len(split)]).permutation(len(full))
        for p in FRACTION_FILES:
            keep = sorted(order[: max(1, round(len(full) * p / 100))])
            full.iloc[keep].to_excel(prompts / f"{stem}_{p}.xlsx", index=False)
    (out / COMPLETE_MARKER).write_text(repr(config))
    return out


def write_synthetic(root: Path, spec: DatasetSpec, config: SyntheticConfig) -> Path:
    """The synthetic set named by ``spec``, in its card's layout."""
    if spec.name in SEGMENTATION_SETS:
        return write_segmentation_dataset(root, spec, config)
    return write_dataset(root, spec, config)


SYNTHETIC_SETS = (*MODALITIES, *SEGMENTATION_SETS)
