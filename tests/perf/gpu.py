"""Inference speed per method and precision on this machine's GPU, against a bare ``encode_image`` loop.

    python tests/perf/gpu.py [--model ViT-L-14-336] [--size 336] [--batch 32] [--device cuda]

Writes a small synthetic data set, then runs one few-shot cell per CLIP method (WinCLIP, April-GAN, AnomalyCLIP,
MVFA, MedSAD-CLIP; one training epoch: the test is the forward pass) in each precision (``fp32 tf32 bf16 fp16``)
on the model's open_clip architecture with seeded random weights, through ``python -m benchmark run`` as a user
would. It prints each cell's model throughput (images/s from the cell's ``model_ms_per_image``: one warm test
batch, feature cache bypassed) and its ratio to ``encode_image`` on a batch of the same size, in the same
precision, timed here. ``--device cpu`` with ``--model tiny-vit --size 64`` checks the script without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from benchmark import efficiency, precision
from benchmark.backbones.clip import ClipBackbone, load_clip
from benchmark.method import METHODS as REGISTRY
from benchmark.protocol import BackboneSpec

ROOT = Path(__file__).resolve().parents[2]
METHODS = {  # one training epoch each (the figure is the forward pass), layers within a 12-block tower
    "winclip": {},
    "april_gan": {"epochs": 1},
    "anomalyclip": {"epochs": 1},
    "mvfa": {"epochs": 1},
    "medsad_clip": {"epochs": 1},
}
TOWER_KEYS = ("layers", "memory_layers", "dpam_blocks", "deep_depth")  # set to the tower's depth where declared


def bare_images_per_s(backbone: ClipBackbone, size: int, batch: int, name: str, device: torch.device) -> float:
    """``encode_image`` on a batch of ``batch`` images in precision ``name``: warm-up, then the mean of 10 calls."""
    images = torch.rand(batch, 3, size, size, device=device)
    with precision.running(name, device.type), torch.no_grad():
        for _ in range(3):
            backbone.model.encode_image(images)
        seconds = efficiency.time_forward(lambda: [backbone.model.encode_image(images) for _ in range(10)], device)
    return 10 * batch / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-L-14-336")
    parser.add_argument("--size", type=int, default=336)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precisions", default=",".join(precision.PRECISIONS))
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    device = torch.device(args.device)
    spec = BackboneSpec(args.model, "random-init", 0)
    picked = args.methods.split(",")
    backbone = load_clip(spec, args.size, device)
    clip = backbone.model
    blocks = clip.visual.transformer.layers  # 24 for ViT-L: the papers' [6, 12, 18, 24]
    layers = [blocks * i // 4 for i in range(1, 5)]
    tower = {
        "layers": layers,
        "memory_layers": layers,
        "dpam_blocks": round(blocks * 19 / 24),
        "deep_depth": min(9, clip.transformer.layers),
    }  # AnomalyCLIP's DPAM in 19 of 24 blocks, prompts in 9
    declared = {m: {f.name for f in dataclasses.fields(REGISTRY.get(m).Params)} for m in picked}
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; {args.model} at "
          f"{args.size} px, batch {args.batch}, random-init weights")  # fmt: skip
    print(f"{'method':<14}{'precision':<11}{'images/s':>10}{'bare':>10}{'ratio':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.precisions.split(","):
            protocol = {
                "version": 1,
                "name": f"gpu-{name}",
                "data_root": f"{tmp}/data",
                "synthetic": {
                    "seed": 0,
                    "image_size": args.size,
                    "test_normal": args.batch,
                    "test_anomalous": args.batch,
                },
                "datasets": ["SynthBrain", "SynthLiver"],
                "settings": [{"name": "few_shot", "shots": [2]}],
                "batch_size": args.batch,
                "backbone": {"model": args.model, "weights": "random-init", "seed": 0},
                "device": args.device,
                "precision": name,
                "figure_samples": 0,
                "methods": {
                    m: {"image_size": args.size, **METHODS[m], **{k: tower[k] for k in TOWER_KEYS if k in declared[m]}}
                    for m in picked
                },
            }
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(yaml.safe_dump(protocol, sort_keys=False))
            run = [sys.executable, "-m", "benchmark", "run", str(path), "--datasets", "SynthBrain", "--results-dir",
                   f"{tmp}/r", "--workers", "1"]  # fmt: skip
            done = subprocess.run(run, cwd=ROOT, capture_output=True, text=True)
            results = Path(tmp) / "r" / f"gpu-{name}" / "results.jsonl"
            if not results.exists():
                print(f"{name}: the run failed (exit {done.returncode}):\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
                continue
            bare = bare_images_per_s(backbone, args.size, args.batch, name, device)
            for line in results.read_text().splitlines():
                record = json.loads(line)
                if record["status"] != "finished":
                    print(f"{record['method']:<14}{name:<11}failed: {record.get('error', '')}")
                    continue
                speed = 1000 / record["efficiency"]["model_ms_per_image"]
                print(f"{record['method']:<14}{name:<11}{speed:>10.1f}{bare:>10.1f}{speed / bare:>8.3f}")


if __name__ == "__main__":
    main()
