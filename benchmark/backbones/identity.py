"""Which backbone a run used, in the words a published table states it: ``MODEL / WEIGHTS``.

A published row's ``backbone`` (``results/published/published_results.csv``) is ``MODEL / TAG`` where the paper
or its code names the weights, ``MODEL`` alone where it names only the architecture, ``none`` for a method
without a pretrained backbone (DRAEM), and empty where nobody recorded it; where a paper leaves its baselines'
backbones unstated, the row holds the one we assume and its tables print that assumption
(``benchmark.reports.published.UNSTATED``). A run agrees with it when the
models are equal and, where the row names a tag, the weights are that tag (a checkpoint file counts as the tag
it is known under: ``benchmark.backbones.medical``). Random-init weights never agree: a tiny test backbone's
numbers are no reproduction of anybody's.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from benchmark.backbones.medical import tag_of_file


class Identity(NamedTuple):
    model: str
    weights: str  # a pretrained tag, a checkpoint's known tag or file name, or "random-init"

    def __str__(self) -> str:
        return f"{self.model} / {self.weights}"


def of_label(label: str) -> Identity:
    """The identity in a record's backbone label (``BackboneSpec.label()``: ``MODEL / WEIGHTS (kind...)``)."""
    text = str(label)
    if text.endswith(")") and " (" in text:
        text = text[: text.rindex(" (")]
    model, _, weights = text.partition(" / ")
    if os.sep in weights or "." in os.path.basename(weights):
        weights = tag_of_file(os.path.basename(weights))
    return Identity(model.strip(), weights.strip())


def agrees(published: str, label: str) -> bool:
    """Whether a run on the backbone ``label`` used the backbone a published row states."""
    published = str(published or "").strip()
    if not published or published == "nan":
        return False
    ours = of_label(label)
    model, _, tag = published.partition(" / ")
    if model == "none":
        return ours.model == "none"
    if ours.weights == "random-init" or ours.model != model:
        return False
    return not tag or ours.weights == tag
