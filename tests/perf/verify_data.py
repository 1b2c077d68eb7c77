"""Time and memory of ``verify-data --deep`` on a generated set of 20,000 images, with 1 and 2 processes.

    python tests/perf/verify_data.py [--images 20000] [--size 240] [--keep DIR]

Writes a BMAD-layout set (half the images normal training images, the rest split between valid/ and test/,
anomalous ones with a mask each) of 8-bit grayscale PNGs at BrainMRI's size, then runs ``verify`` (layout and
counts), ``verify --deep`` with 1 and with 2 processes, and a lock, one after the other in this process, and
prints images per second and peak memory (this process; the largest worker process) side by side.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmark.data.catalog import load_catalog
from benchmark.data.locks import snapshot
from benchmark.data.verify import verify

CARD = """---
name: PerfSet
folder: PerfSet_AD
modality: "generated"
organ: brain
masks: true
source: "tests/perf/verify_data.py"
licence: "generated"
expected: {{from: "the generator", train: {{good: {train}}}, valid: {valid}, test: {test}}}
---
"""


def write_set(root: Path, images: int, size: int) -> tuple[Path, dict[str, int]]:
    rng = np.random.default_rng(0)
    base = [(rng.random((size, size)) * 40 + np.linspace(60, 180, size)[None, :]).astype(np.uint8) for _ in range(16)]
    yy, xx = np.mgrid[:size, :size]
    mask = (((yy - size / 2) ** 2 + (xx - size / 3) ** 2) < (size / 8) ** 2).astype(np.uint8) * 255
    train = images // 2
    valid = max(2, images // 20) // 2 * 2
    test = images - train - valid
    plan = {("train", "good"): train, ("valid", "good"): valid // 2, ("valid", "Ungood"): valid // 2,
            ("test", "good"): test // 2, ("test", "Ungood"): test - test // 2}  # fmt: skip
    folder = root / "PerfSet_AD"
    for (split, state), count in plan.items():
        img_dir = folder / split / state / "img"
        img_dir.mkdir(parents=True)
        if state == "Ungood":
            (folder / split / state / "anomaly_mask").mkdir()
        for i in range(count):
            picture = base[i % len(base)].copy()
            picture[0, :8] = np.frombuffer(i.to_bytes(8, "little"), dtype=np.uint8)  # every file different
            name = f"{split}_{state}_{i:05d}.png"
            Image.fromarray(picture).save(img_dir / name, compress_level=1)
            if state == "Ungood":
                Image.fromarray(mask).save(folder / split / state / "anomaly_mask" / name, compress_level=1)
    cards = root / "cards"
    cards.mkdir()
    (cards / "PerfSet.md").write_text(CARD.format(train=train, valid=valid, test=test))
    return cards, {"train": train, "valid": valid, "test": test}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=240)
    parser.add_argument("--keep", help="write the set here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="verify-perf-"))
    try:
        started = time.perf_counter()
        cards, counts = write_set(root, args.images, args.size)
        print(f"generated {args.images:,} images ({counts}) at {args.size} px in {time.perf_counter() - started:.0f} s "
              f"on {os.cpu_count()} cores")  # fmt: skip
        spec = load_catalog([cards])["PerfSet"]
        rows = []
        for label, kwargs in (
            ("layout + counts", {"deep": False}),
            ("--deep, 1 process", {"deep": True, "workers": 1}),
            ("--deep, 2 processes", {"deep": True, "workers": 2}),
        ):
            started = time.perf_counter()
            check = verify(root, spec, **kwargs)
            seconds = time.perf_counter() - started
            assert check.ok, check.line()
            rows.append((label, seconds, args.images / seconds))
        started = time.perf_counter()
        snap = snapshot(root, spec, workers=2)
        seconds = time.perf_counter() - started
        rows.append((f"--lock, 2 processes ({len(snap.files):,} files)", seconds, args.images / seconds))
        print(f"{'':38s} {'seconds':>8s} {'images/s':>9s}")
        for label, seconds, rate in rows:
            print(f"{label:38s} {seconds:8.1f} {rate:9.0f}")
        print(f"deep: 2 processes / 1 process: {rows[1][1] / rows[2][1]:.2f}x the images per second")
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"peak memory: this process {own:.0f} MB, largest worker process {workers:.0f} MB")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
