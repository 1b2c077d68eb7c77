"""WinCLIP's prompt ensemble encoded by a frozen text tower, cold (computed and written) against warm (read from
the on-disk text cache), side by side in one run.

    python tests/perf/text_cache.py [--model ViT-B-16-plus-240] [--organ brain]

Builds the model's open_clip architecture with seeded random weights (the text tower costs what the pretrained
one costs), encodes the normal and anomalous ensembles through ``WinClipModel.set_text`` with an empty cache,
then again with the cache now holding them, and checks that both give the very same embeddings.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from benchmark.backbones.cache import FeatureCache
from benchmark.backbones.clip import load_clip
from benchmark.protocol import BackboneSpec
from methods.models.winclip import WinClipModel, prompt_ensemble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16-plus-240")
    parser.add_argument("--size", type=int, default=240)
    parser.add_argument("--organ", default="brain")
    args = parser.parse_args()
    model = WinClipModel(load_clip(BackboneSpec(args.model, "random-init", 0), args.size))
    prompts = sum(len(p) for p in prompt_ensemble(args.organ))
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(tmp)
        times, texts = [], []
        for _ in ("cold", "warm"):
            start = time.perf_counter()
            model.set_text(args.organ, cache)
            times.append(time.perf_counter() - start)
            texts.append(model.text.clone())
    same = torch.equal(texts[0], texts[1])
    print(f"{args.model} text tower, {prompts} prompts ({torch.get_num_threads()} threads)")
    cold, warm = times
    print(f"cold (encode and write): {cold:.2f} s; warm (read): {warm:.3f} s; warm/cold {warm / cold:.4f}")
    print(f"embeddings identical: {same}")


if __name__ == "__main__":
    main()
