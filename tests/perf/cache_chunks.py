"""What the feature cache's fixed chunks cost: a batch encoded whole against the same batch in chunks of
``CHUNK`` images (``benchmark.backbones.cache.computed_in_chunks``), side by side in one run.

    python tests/perf/cache_chunks.py [--batch 16] [--repeats 3]

Random-init backbones (the tiny ViT at 64 px and ViT-B-16 at 224 px), torch's threads as set; best of
``--repeats`` timings each.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from benchmark.backbones.cache import CHUNK, computed_in_chunks
from benchmark.backbones.clip import load_clip
from benchmark.protocol import BackboneSpec


def best_of(fn, images: torch.Tensor, repeats: int) -> float:
    """The shortest of ``repeats`` timings of ``fn(images)``, after one call to warm up."""
    fn(images)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(images)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"batch {args.batch}, chunks of {CHUNK}, {torch.get_num_threads()} torch threads")
    for name, size in (("tiny-vit", 64), ("ViT-B-16", 224)):
        backbone = load_clip(BackboneSpec(name, "random-init", 0), size).eval()

        def encode(x: torch.Tensor, backbone=backbone) -> dict[str, torch.Tensor]:
            return {"embedding": backbone.forward_features(backbone.normalize(x))[0]}

        images = torch.rand(args.batch, 3, size, size)
        with torch.no_grad():
            whole = best_of(encode, images, args.repeats)
            chunked = best_of(functools.partial(computed_in_chunks, encode), images, args.repeats)
        print(f"{name} at {size} px: whole {whole:.3f} s, in chunks {chunked:.3f} s, ratio {chunked / whole:.2f}")


if __name__ == "__main__":
    main()
