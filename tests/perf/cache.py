"""WinCLIP test-set prediction with the frozen-feature cache warm against no cache, side by side in one run.

    python tests/perf/cache.py [--images 48] [--size 64] [--model tiny-vit]

Writes a synthetic data set to a temporary folder, then times ``WinCLIP.predict`` over its test images
three ways: no cache, cold cache (computing and writing), warm cache (reading only); checks the maps agree.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import methods.models.winclip as winclip
from benchmark.backbones.cache import FeatureCache
from benchmark.data.catalog import load_catalog
from benchmark.data.layout import read_split
from benchmark.data.loading import iterate_batches
from benchmark.data.synthetic import SyntheticConfig, write_dataset
from benchmark.method import MethodContext
from benchmark.protocol import BackboneSpec


def predict_all(cache: FeatureCache, samples, spec, args) -> tuple[float, list[torch.Tensor]]:
    context = MethodContext(
        spec,
        "zero_shot_loo",
        None,
        0,
        args.size,
        torch.device("cpu"),
        BackboneSpec(args.model, "random-init", 0),
        cache,
    )
    method = winclip.WinCLIP.build(winclip.WinCLIPParams(), context)
    batches = list(iterate_batches(samples, args.size, 16))
    start = time.perf_counter()
    maps = [method.predict(b.unlabelled()).maps for b in batches]
    return time.perf_counter() - start, maps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--model", default="tiny-vit")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spec = load_catalog()["SynthBrain"]
        half = args.images // 2
        write_dataset(Path(tmp), spec, SyntheticConfig(test_normal=half, test_anomalous=args.images - half))
        samples = read_split(Path(tmp), spec, "test")
        t_none, ref = predict_all(FeatureCache(None), samples, spec, args)
        cache = FeatureCache(Path(tmp) / "cache")
        t_cold, _ = predict_all(cache, samples, spec, args)
        t_warm, maps = predict_all(cache, samples, spec, args)
    same = all(torch.equal(a, b) for a, b in zip(ref, maps, strict=True))
    print(f"{len(samples)} images at {args.size} px, backbone {args.model} (random-init), WinCLIP scales (2, 3)")
    print(f"no cache {t_none:.2f} s | cold cache {t_cold:.2f} s | warm cache {t_warm:.2f} s")
    print(
        f"speed-up warm vs no cache: {t_none / t_warm:.1f}x; cold-cache overhead: {t_cold / t_none:.2f}x; "
        f"maps identical: {same}"
    )


if __name__ == "__main__":
    main()
