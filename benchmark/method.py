"""The method contract: a class registered by name, declaring the settings it supports.

``fit(train)`` sees the training samples the cell's setting allows (with labels and masks);
``predict(batch)`` sees test images and their content hashes only, never a label, and returns image
scores ``[B]`` and anomaly maps ``[B,H,W]`` in [0,1] at the input resolution. Model maths lives in plain
``nn.Module``s; a ``Method`` is the glue. Register in-tree plugins with ``@METHODS.register("name")`` in a
module of ``methods/``; out-of-tree ones with an entry point in the ``medad_bench.methods`` group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from benchmark.backbones.cache import FeatureCache
from benchmark.data.catalog import DatasetSpec
from benchmark.data.layout import Sample
from benchmark.data.loading import ImageBatch, LabelledBatch, iterate_batches, load_batch
from benchmark.errors import BenchmarkError
from benchmark.protocol import BackboneSpec
from benchmark.registry import Registry

HARNESS_KEYS = ("method", "backbone", "image_size")  # per-method protocol keys the harness reads


@dataclass(frozen=True)
class Prediction:
    image_scores: torch.Tensor
    maps: torch.Tensor


@dataclass(frozen=True)
class TrainSet:
    """The training samples of one cell; images are loaded on demand at the protocol's size.

    ``datasets`` maps each sample's dataset name to its card (organ word, masks; in ``zero_shot_loo``
    the samples come from several datasets); ``valid`` holds the target's validation samples not used for
    training, for model selection or score calibration (empty in ``zero_shot_loo``: the target's files are
    never read).
    """

    samples: tuple[Sample, ...]
    setting: str
    shots: int | None
    image_size: int
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    valid: tuple[Sample, ...] = ()

    def subset(self, samples: tuple[Sample, ...]) -> TrainSet:
        return dataclasses.replace(self, samples=tuple(samples))

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def normal(self) -> tuple[Sample, ...]:
        return tuple(s for s in self.samples if not s.label)

    @property
    def anomalous(self) -> tuple[Sample, ...]:
        return tuple(s for s in self.samples if s.label)

    def load(self, samples: tuple[Sample, ...] | None = None) -> LabelledBatch:
        return load_batch(self.samples if samples is None else samples, self.image_size)

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[LabelledBatch]:
        """Batches in a shuffled order when ``generator`` is given, else in sample order."""
        order = list(range(len(self.samples)))
        if generator is not None:
            order = torch.randperm(len(order), generator=generator).tolist()
        return iterate_batches([self.samples[i] for i in order], self.image_size, batch_size)


@dataclass(frozen=True)
class MethodContext:
    """What a method may know of its cell besides the training data."""

    dataset: DatasetSpec
    setting: str
    shots: int | None
    seed: int
    image_size: int
    device: torch.device
    backbone: BackboneSpec
    cache: FeatureCache


@dataclass(frozen=True)
class NoParams:
    """A method without parameters."""


class Method:
    """Base class of method plugins; subclasses set the class attributes and implement fit/predict."""

    name: ClassVar[str] = ""
    published_name: ClassVar[str] = ""
    settings: ClassVar[frozenset[str]] = frozenset()
    requires_masks: ClassVar[bool] = False  # trains on pixel masks: not run on image-label-only datasets
    Params: ClassVar[type] = NoParams
    default_backbone: ClassVar[BackboneSpec | None] = None
    default_image_size: ClassVar[int | None] = None

    def __init__(self, params: Any, context: MethodContext) -> None:
        self.params = params
        self.context = context

    def fit(self, train: TrainSet) -> None:
        raise NotImplementedError

    def predict(self, batch: ImageBatch) -> Prediction:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Extra MLflow params (e.g. the variant run, trainable parameter count)."""
        return {}

    @classmethod
    def parse_params(cls, raw: dict[str, Any], where: str) -> Any:
        """Validate ``raw`` against ``cls.Params`` (a dataclass); unknown keys and wrong types are errors."""
        fields = {f.name: f for f in dataclasses.fields(cls.Params)}
        raw = {k: v for k, v in raw.items() if k not in HARNESS_KEYS}
        for key, value in raw.items():
            if key not in fields:
                raise BenchmarkError(
                    f"{where}.{key}: unknown parameter of '{cls.name}' (expected one of {sorted(fields)})"
                )
            default = fields[key].default
            if default is not dataclasses.MISSING and default is not None and not _same_type(default, value):
                raise BenchmarkError(f"{where}.{key}: expected {type(default).__name__}, got {value!r}")
        converted = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        return cls.Params(**converted)


def _same_type(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    if isinstance(default, tuple):
        return isinstance(value, list | tuple)
    return isinstance(value, type(default))


METHODS: Registry[type[Method]] = Registry("method", entry_point_group="medad_bench.methods", package="methods")
