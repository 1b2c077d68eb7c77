"""Peak memory of anomalib's PatchCore and PaDiM cells against the size of their memory banks, in one run.

    python tests/perf/memory_banks.py [--size 256] [--images 16] [--model resnet18]

Writes a synthetic SynthBrain set (``--images`` normal training images) to a temporary folder, then fits
each model through the bridge at ``--size`` px with a random-init backbone, each in its own process, which
reports its peak resident memory (``getrusage``), its resident memory just before the fit and the bytes of
its bank tensors (the model's buffers outside the feature extractor: PatchCore's coreset, PaDiM's means and
inverse covariances).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = ("Patchcore", "Padim")


def rss_mb() -> float:
    """Current resident memory of this process, from /proc."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def cell(args: argparse.Namespace) -> None:
    """Fit one model and print its figures as one JSON line (run in a child process)."""
    import torch

    from benchmark.backbones.cache import FeatureCache
    from benchmark.data.catalog import load_catalog
    from benchmark.data.splits import make_split
    from benchmark.method import METHODS, MethodContext, TrainSet
    from benchmark.protocol import BackboneSpec

    catalog = load_catalog()
    cls = METHODS.get(f"anomalib:{args.cell}")
    context = MethodContext(catalog["SynthBrain"], "full_normal", None, 0, args.size, torch.device("cpu"),
                            BackboneSpec(args.model, "random-init", 0), FeatureCache(None))  # fmt: skip
    split = make_split(Path(args.root), catalog, "SynthBrain", "full_normal", None, 0)
    method = cls.build(cls.Params(), context)
    before = rss_mb()
    method.fit(TrainSet(split.train, "full_normal", None, args.size))
    bank = sum(b.nbytes for name, b in method.module.model.named_buffers() if not name.startswith("feature_extractor."))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"bank_mb": bank / 2**20, "before_mb": before, "peak_mb": peak}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--cell", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        cell(args)
        return
    from benchmark.data.catalog import load_catalog
    from benchmark.data.synthetic import SyntheticConfig, write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(Path(tmp), load_catalog()["SynthBrain"], SyntheticConfig(train_normal=args.images))
        print(f"{args.images} normal images at {args.size} px, backbone {args.model} (random-init), one process each")
        print(f"{'model':<10} {'bank MB':>8} {'RSS before fit MB':>18} {'peak RSS MB':>12} {'peak / bank':>12} "
              f"{'(peak - before) / bank':>23}")  # fmt: skip
        for model in MODELS:
            child = [sys.executable, __file__, "--cell", model, "--root", tmp, "--size", str(args.size),
                     "--model", args.model]  # fmt: skip
            done = subprocess.run(child, capture_output=True, text=True, check=False)
            if done.returncode:
                print(f"{model:<10} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            ratio, growth = r["peak_mb"] / r["bank_mb"], (r["peak_mb"] - r["before_mb"]) / r["bank_mb"]
            print(f"{model:<10} {r['bank_mb']:8.1f} {r['before_mb']:18.0f} {r['peak_mb']:12.0f} {ratio:12.1f} "
                  f"{growth:23.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
