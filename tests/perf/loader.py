"""Images per second of the input pipeline at 0, 1 and 2 decoding processes, for 256 and 512 px PNGs.

    python tests/perf/loader.py [--images 96] [--size 240]

Each image is decoded and resized to ``--size`` as a cell's evaluation does, in batches of 16; the batches
must be identical whatever the number of processes (checked). Printed side by side, as ratios to 0.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmark.data.layout import Sample
from benchmark.data.loading import LoaderConfig, iterate_batches


def images(folder: Path, count: int, side: int) -> list[Sample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        path = folder / f"{side}_{i:04d}.png"
        Image.fromarray((rng.random((side, side)) * 255).astype(np.uint8)).save(path)
        out.append(Sample(str(path), 0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", type=int, default=240)
    args = parser.parse_args()
    print(f"{'PNG side':>8s} {'processes':>9s} {'images/s':>9s} {'x 0':>6s}")
    with tempfile.TemporaryDirectory() as tmp:
        for side in (256, 512):
            samples = images(Path(tmp), args.images, side)
            reference, base = None, None
            for workers in (0, 1, 2):
                start = time.perf_counter()
                batches = list(iterate_batches(samples, args.size, 16, LoaderConfig(workers)))
                rate = len(samples) / (time.perf_counter() - start)
                stacked = torch.cat([b.images for b in batches])
                reference = stacked if reference is None else reference
                assert torch.equal(stacked, reference), "batches differ with the number of processes"
                base = base or rate
                print(f"{side:8d} {workers:9d} {rate:9.1f} {rate / base:6.2f}")


if __name__ == "__main__":
    main()
