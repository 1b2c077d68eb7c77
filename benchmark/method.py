"""The method contract: a class registered by name, declaring the settings it supports.

A plugin module of ``methods/`` declares the class (settings, ``Params``, defaults) without importing
torch; its ``implementation`` names the subclass in ``methods/models/`` that holds ``fit``/``predict`` and
the ``nn.Module`` maths, imported only when a cell runs.

``fit(train)`` sees the training samples the cell's setting allows (with labels and masks);
``predict(batch)`` sees test images, their content hashes and, where the dataset gives one, each image's
text description (text-guided segmentation), never a label or mask, and returns image scores ``[B]`` and
anomaly maps ``[B,H,W]`` in [0,1] at the input resolution, and optionally uncertainty maps ``[B,H,W]``.
Model maths lives in plain ``nn.Module``s; a ``Method`` is the glue. Register in-tree plugins with
``@METHODS.register("name")`` in a module of ``methods/``; out-of-tree ones with an entry point in the
``medad_bench.methods`` group.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from benchmark.data.catalog import DatasetSpec
from benchmark.data.layout import Sample
from benchmark.errors import BenchmarkError
from benchmark.protocol import BackboneSpec
from benchmark.registry import Registry

if TYPE_CHECKING:  # declaring, listing and validating methods never imports torch
    import torch

    from benchmark.backbones.cache import FeatureCache
    from benchmark.data.loading import ImageBatch, LabelledBatch, LoaderConfig

# per-method protocol keys the harness reads
HARNESS_KEYS = (
    "method", "backbone", "image_size", "resources", "precision", "resize", "checkpoint", "checkpoint_format", "seeds",
)  # fmt: skip


@dataclass(frozen=True)
class Prediction:
    image_scores: torch.Tensor
    maps: torch.Tensor
    uncertainty: torch.Tensor | None = None  # [B,H,W] per-pixel predictive uncertainty, for methods that give one


@dataclass(frozen=True)
class TrainSet:
    """The training samples of one cell; images are loaded on demand at the protocol's size.

    ``datasets`` maps each sample's dataset name to its card (organ word, masks; in ``zero_shot_loo``
    the samples come from several datasets); ``valid`` holds the target's validation samples not used for
    training, for model selection or score calibration (empty in ``zero_shot_loo``: the target's files are
    never read); ``auxiliary`` the other datasets' labelled pools in a setting the method lists in its
    ``auxiliary_settings`` (empty otherwise).
    """

    samples: tuple[Sample, ...]
    setting: str
    shots: int | None
    image_size: int
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    valid: tuple[Sample, ...] = ()
    loader: LoaderConfig | None = None  # decoding processes and pinned memory (the cell's)
    auxiliary: tuple[Sample, ...] = ()  # other datasets' labelled pools, in the method's auxiliary_settings

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
        from benchmark.data.loading import load_batch

        resize = self.loader.resize if self.loader is not None else "bicubic"
        return load_batch(self.samples if samples is None else samples, self.image_size, resize)

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[LabelledBatch]:
        """Batches in a shuffled order when ``generator`` is given, else in sample order."""
        import torch

        from benchmark.data.loading import iterate_batches

        order = list(range(len(self.samples)))
        if generator is not None:
            order = torch.randperm(len(order), generator=generator).tolist()
        return iterate_batches([self.samples[i] for i in order], self.image_size, batch_size, self.loader)


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
class Released:
    """Where a method's authors publish their trained checkpoints, for ``checkpoint_format: official``:
    ``fetch-weights METHOD NAME`` downloads ``hub_path`` (``{name}`` filled in) from the Hugging Face repo
    ``hub_repo``; without one it prints ``where`` (a script cannot fetch a Google Drive link)."""

    where: str  # the page or links of the release
    files: str  # what it holds, per dataset or training set
    configuration: str  # the backbone, image size and parameters its files need (our names)
    per_dataset: bool = False  # one file per dataset (a protocol maps each dataset to its file), not one for all
    hub_repo: str = ""
    hub_path: str = ""
    names: tuple[str, ...] = ()  # the NAMEs hub_path takes


@dataclass(frozen=True)
class NoParams:
    """A method without parameters."""


class Method:
    """Base class of method plugins; subclasses set the class attributes and implement fit/predict."""

    name: ClassVar[str] = ""
    published_name: ClassVar[str] = ""
    settings: ClassVar[frozenset[str]] = frozenset()
    requires_masks: ClassVar[bool] = False  # trains on pixel masks: not run on image-label-only datasets
    # settings in which fit() also gets the other datasets' labelled pools (TrainSet.auxiliary)
    auxiliary_settings: ClassVar[frozenset[str]] = frozenset()
    # settings in which the result does not depend on the model seed (nothing trained or drawn at random):
    # where the cell's data do not depend on the sampling seed either, the cell runs once, not once per seed
    seed_free_settings: ClassVar[frozenset[str]] = frozenset()
    Params: ClassVar[type] = NoParams
    default_backbone: ClassVar[BackboneSpec | None] = None
    # trained from scratch on no pretrained backbone: its cells run on ``none / none`` whatever the protocol names (a
    # method entry naming a backbone is an error)
    backbone_free: ClassVar[bool] = False
    default_image_size: ClassVar[int | None] = None
    # how its published code resizes images (``benchmark.data.loading.decode_image``); None: bicubic
    default_resize: ClassVar[str | None] = None
    implementation: ClassVar[str] = ""  # "module:Class" that fits and predicts; empty: this class itself
    # the precision its published code runs in on a GPU: a cell's default on CUDA (fp32 on the CPU), unless the
    # protocol or the method entry sets ``precision`` (``benchmark.precision``)
    reference_precision: ClassVar[str] = "fp32"
    # what ``fit`` sets that ``predict`` needs beyond the frozen backbone: attributes as dotted paths (modules,
    # tensors, memory banks, constants), saved and loaded by ``benchmark.fits``; empty: nothing learnt to keep
    # (WinCLIP: its fit only encodes the cell's own reference images, which the feature cache keeps)
    fit_state: ClassVar[tuple[str, ...]] = ()
    fit_version: ClassVar[int] = 1  # raise it when the maths of fit or predict change: stored fits are retrained
    fit_reads_target: ClassVar[bool] = True  # fit reads the target's card (organ word, masks): part of the fit key
    test_params: ClassVar[frozenset[str]] = frozenset({"progress", "cache_features"})  # params fit never reads
    # fit reads only the normal training images (a one-class method): its cells in settings that differ only in the
    # anomalous training images compute one result (``benchmark.runner.result_identity``)
    one_class: ClassVar[bool] = False
    # neither fit nor predict reads the setting's name or K, only the data they bring (zero-shot LOO, whose target
    # files are never read, stays apart): cells of settings that bring the same data compute one result
    setting_blind: ClassVar[bool] = False
    reads_valid: ClassVar[bool] = True  # fit reads ``TrainSet.valid`` (model selection, calibration)
    released: ClassVar[Released | None] = None  # its authors' checkpoints (``import_official`` reads them)
    libraries: ClassVar[tuple[str, ...]] = ()  # packages beyond the usual ones whose versions key its fits

    @classmethod
    def reads_setting(cls, setting: str) -> bool:
        """Whether a cell's result and fit depend on its setting's name and K, beyond the data it brings: always,
        but for a ``setting_blind`` method outside zero-shot LOO (whose target files are never read)."""
        return not cls.setting_blind or setting == "zero_shot_loo"

    @classmethod
    def requirements(cls, params: dict[str, Any]) -> list[str]:
        """One line for each thing this machine lacks that the method's cells need besides weights (an optional
        extra, a class its parameters name), checked before anything is recorded; never imports torch."""
        return []

    @classmethod
    def backbone_for(cls, params: Any) -> BackboneSpec | None:
        """The backbone a method entry runs on when neither it nor the protocol names one: the method's default
        (a method whose variants run on different backbones picks by its parameters)."""
        return cls.default_backbone

    @classmethod
    def build(cls, params: Any, context: MethodContext) -> Method:
        """An instance of ``implementation_class()`` ready to fit."""
        return cls.implementation_class()(params, context)

    @classmethod
    def implementation_class(cls) -> type[Method]:
        """The class named by ``implementation``, imported only now (so declaring, listing and validating
        methods imports no torch), else this class itself."""
        if not cls.implementation:
            return cls
        module, _, attr = cls.implementation.partition(":")
        return getattr(importlib.import_module(module), attr)

    def __init__(self, params: Any, context: MethodContext) -> None:
        self.params = params
        self.context = context

    def fit(self, train: TrainSet) -> None:
        raise NotImplementedError

    def predict(self, batch: ImageBatch) -> Prediction:
        raise NotImplementedError

    def import_official(self, state: dict[str, Any], where: str) -> None:
        """Load the authors' released checkpoint (``state``: what ``torch.load(weights_only=True)`` read), mapping
        its names and shapes onto this method's modules; a file of another method, backbone or configuration is a
        one-line ``BenchmarkError`` naming the first key that does not fit (``where`` names the file)."""
        raise BenchmarkError(f"{where}: '{self.name}' has no importer of its authors' checkpoints")

    def complete_import(self, train: TrainSet) -> None:
        """After ``import_official``: what the authors' test code computes from the cell's own data and not from
        the file (a memory bank of the K normal references, score statistics)."""

    def describe(self) -> dict[str, Any]:
        """Extra MLflow params (e.g. the variant run, trainable parameter count)."""
        return {}

    def effective_params(self) -> dict[str, Any]:
        """Every parameter as the cell used it (a default chosen by mode or setting filled in), for the
        records and MLflow; call after ``fit``."""
        return dataclasses.asdict(self.params) if dataclasses.is_dataclass(self.params) else {}

    def curves(self) -> dict[str, list[float]]:
        """Per-epoch training curves (MLflow draws them as metric steps); ``train_loss`` from the shared loop."""
        history = getattr(self, "history", None)
        return {"train_loss": [float(v) for v in history]} if history else {}

    def published_as(self) -> str:
        """The method name of the papers' rows this configuration reproduces, or "" for a configuration no
        paper reports (an ablation variant): tables print published numbers beside matching rows only."""
        return self.published_name

    @classmethod
    def parse_params(cls, raw: dict[str, Any], where: str) -> Any:
        """Validate ``raw`` against ``cls.Params`` (a dataclass): unknown keys, wrong types, numbers that are
        not finite or out of their field's range and values outside its choices are errors."""
        fields = {f.name: f for f in dataclasses.fields(cls.Params)}
        raw = {k: v for k, v in raw.items() if k not in HARNESS_KEYS}
        for key, value in raw.items():
            if key not in fields:
                raise BenchmarkError(
                    f"{where}.{key}: unknown parameter of '{cls.name}' (expected one of {sorted(fields)})"
                )
            problem = check_param(fields[key], value)
            if problem:
                raise BenchmarkError(f"{where}.{key}: {problem}")
        converted = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        try:
            return cls.Params(**converted)
        except (TypeError, ValueError) as exc:
            raise BenchmarkError(f"{where}: {exc}") from None


def param(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: tuple[Any, ...] | None = None,
    kind: type | None = None,
    increasing: bool = False,
) -> Any:
    """A ``Params`` field with its valid values: bounds for a number (each number of a tuple), allowed
    ``choices``, the ``kind`` of value where the default (None: "the method decides") does not tell, and for a
    list whether it must increase strictly (layers whose last is taken as the deepest)."""
    metadata = {"ge": ge, "gt": gt, "le": le, "choices": choices, "kind": kind, "increasing": increasing}
    return dataclasses.field(default=default, metadata=metadata)


def check_param(f: dataclasses.Field, value: Any) -> str | None:
    """Why ``value`` does not fit field ``f`` (type, finiteness, range, choices), or None when it does."""
    default, meta = f.default, f.metadata
    if value is None:
        return None if default is None else f"expected {type(default).__name__}, got null"
    expected = meta.get("kind") or (type(default) if default is not None else None)
    if expected is not None and not same_type(expected, value):
        return f"expected {expected.__name__}, got {value!r}"
    if meta.get("choices") is not None and value not in meta["choices"]:
        return f"expected one of {', '.join(map(str, meta['choices']))}, got {value!r}"
    numbers = value if isinstance(value, list | tuple) else [value]
    if isinstance(default, tuple) and default and isinstance(value, list | tuple):
        wrong = [v for v in value if not same_type(type(default[0]), v)]
        if wrong:
            return f"expected a list of {type(default[0]).__name__}, got {wrong[0]!r}"
    if meta.get("increasing") and isinstance(value, list | tuple) and list(value) != sorted(set(value)):
        return f"expected strictly increasing values, got {list(value)}"
    for number in numbers:
        if isinstance(number, bool) or not isinstance(number, int | float):
            continue
        if not math.isfinite(number):
            return f"expected a finite number, got {number!r}"
        for bound, test, word in (("ge", float.__ge__, ">="), ("gt", float.__gt__, ">"), ("le", float.__le__, "<=")):
            limit = meta.get(bound)
            if limit is not None and not test(float(number), float(limit)):
                return f"expected a number {word} {limit:g}, got {number!r}"
    return None


def same_type(expected: type, value: Any) -> bool:
    """Whether ``value`` is of the ``expected`` type of a parameter: a bool only for bool, an int also for float,
    a list or tuple for tuple."""
    if expected is bool or isinstance(value, bool):
        return expected is bool and isinstance(value, bool)
    if expected is float:
        return isinstance(value, int | float)
    if expected is tuple:
        return isinstance(value, list | tuple)
    return isinstance(value, expected)


METHODS: Registry[type[Method]] = Registry("method", entry_point_group="medad_bench.methods", package="methods")
