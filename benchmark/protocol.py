"""Protocol files: YAML validated on load into a frozen ``Protocol``.

Every error is one line naming the file and the key (``protocols/x.yaml: settings[1].shots: ...``).
A protocol never chooses anything on test data: thresholds are fixed or chosen on the validation split.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmark.errors import BenchmarkError
from benchmark.precision import problem as precision_problem

SETTINGS = (
    "zero_shot_loo", "few_shot", "few_normal", "supervised", "full_normal", "data_fraction", "domain_generalization"
)  # fmt: skip
SHOT_SETTINGS = ("few_shot", "few_normal")
ALLOWED_SHOTS = (1, 2, 4, 8, 16)
ALLOWED_FRACTIONS = (10, 25, 50, 100)  # MedCLIPSeg's data-efficiency subsets (percent)
PROMPT_DESIGNS = ("original", "contradictory", "missing_location", "overdescriptive", "underdescriptive")
DEFAULT_SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
PROTOCOL_VERSION = 1
EVALUATION_SIZES = ("model", "native")
RESIZES = ("bicubic", "bilinear")  # benchmark.data.loading.decode_image


@dataclass(frozen=True)
class SettingSpec:
    """One training setting; ``shots`` is K for the few-shot settings and the percentage of the training and
    validation images for ``data_fraction`` (its ``fractions`` key); ``source`` is the training dataset of
    ``domain_generalization`` (every listed dataset is then a test target)."""

    name: str
    shots: tuple[int, ...] = ()
    source: str | None = None


@dataclass(frozen=True)
class BackboneSpec:
    """An open_clip (or timm) model and its weights: a pretrained tag, a checkpoint path or ``random-init``; ``none /
    none`` for a method trained from scratch on no pretrained backbone (``Method.backbone_free``)."""

    model: str
    weights: str
    seed: int = 0
    quick_gelu: bool | None = None  # None: as the weights were trained

    @property
    def random_init(self) -> bool:
        return self.weights == "random-init"

    @property
    def absent(self) -> bool:
        """No backbone at all: the method's network is trained from scratch (its weights drawn with the cell's seed)."""
        return self.model == "none" and self.weights == "none"

    def label(self) -> str:
        kind = f"random-init, seed {self.seed}" if self.random_init else "no backbone" if self.absent else "pretrained"
        act = "" if self.quick_gelu is None else (", QuickGELU" if self.quick_gelu else ", exact GELU")
        return f"{self.model} / {self.weights} ({kind}{act})"


@dataclass(frozen=True)
class ThresholdSpec:
    """``fixed`` uses ``value``; ``validation`` picks the sweep threshold best on the validation split."""

    mode: str = "fixed"
    value: float = 0.5


@dataclass(frozen=True)
class Protocol:
    path: str
    name: str
    version: int
    description: str
    datasets: tuple[str, ...]
    settings: tuple[SettingSpec, ...]
    methods: dict[str, dict[str, Any]]
    seeds: tuple[int, ...]
    sampling_seeds: tuple[int, ...]
    manifests: str | None
    image_size: int
    batch_size: int
    backbone: BackboneSpec | None
    threshold: ThresholdSpec
    sweep: tuple[float, ...]
    data_root: str
    dataset_cards: tuple[str, ...]
    synthetic: dict[str, Any]
    tracking_uri: str | None
    results_dir: str
    device: str
    figure_samples: int
    resources: dict[str, float] = field(default_factory=dict)  # per cell on a Ray cluster: {cpus, gpus}
    prompt_designs: tuple[str, ...] = ()  # MedCLIPSeg's test-prompt designs: one cell each (empty: its original)
    loader_workers: int | None = None  # image-decoding processes per cell; None: from the CPU count
    precision: str | None = None  # fp32 | tf32 | bf16 | fp16; None: each method's default (benchmark.precision)
    # each cell's samples.png, sweep.png and roc.png (about 0.3 s a cell on a CPU core); false for large grids:
    # evidence.npz keeps the examples and curves the report draws
    cell_figures: bool = True
    # where per-image DSC and NSD are scored: at the model's size, or ``native``: the binary prediction upsampled
    # (nearest) to each mask's own size, as MedCLIPSeg's utils/eval.py
    evaluation_size: str = "model"
    resize: str | None = None  # how images are resized to a cell's size (RESIZES); None: bicubic, or a method's own
    # dataset -> lock file (``verify-data NAME --lock``): a copy that differs is refused before any cell
    data_locks: dict[str, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key written twice in one mapping is an error (merge keys ``<<`` aside)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


class _Reader:
    """Typed access to a mapping that reports the file and key path on any mismatch."""

    def __init__(self, path: str, data: Any, where: str = ""):
        self.path, self.where = path, where
        if not isinstance(data, dict):
            self.fail(f"expected a mapping, got {type(data).__name__}")
        self.data = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def fail(self, msg: str, key: str | None = None) -> None:
        where = key if key is not None else (self.where or "top level")
        raise BenchmarkError(f"{self.path}: {where}: {msg}")

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ..., required: bool = False) -> Any:
        self.used.add(name)
        if name not in self.data or self.data[name] is None:
            if required or default is ...:
                self.fail("missing required key", self.key(name))
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            self.fail(f"expected {names}, got {type(value).__name__} {value!r}", self.key(name))
        return value

    def get_list(self, name: str, item: type, default: Any = ...) -> tuple:
        value = self.get(name, (list, item), default)
        if value is default and not isinstance(value, list | item):
            return value
        items = value if isinstance(value, list) else [value]
        out = []
        for i, v in enumerate(items):
            if item is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if isinstance(v, bool) or not isinstance(v, item):
                self.fail(f"expected a list of {item.__name__}, got {v!r}", f"{self.key(name)}[{i}]")
            out.append(v)
        if not out:
            self.fail("must not be empty", self.key(name))
        return tuple(out)

    def sub(self, name: str) -> _Reader:
        self.used.add(name)
        return _Reader(self.path, self.data.get(name) or {}, self.key(name))

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            self.fail(f"unknown key (expected one of {sorted(self.used)})", self.key(unknown[0]))


def _settings(r: _Reader) -> tuple[SettingSpec, ...]:
    value = r.get("settings", list, required=True)
    out = []
    for i, entry in enumerate(value):
        entry = {"name": entry} if isinstance(entry, str) else entry
        s = _Reader(r.path, entry, f"settings[{i}]")
        name = s.get("name", str, required=True)
        if name not in SETTINGS:
            s.fail(f"unknown setting '{name}' (expected one of {', '.join(SETTINGS)})", s.key("name"))
        shots: tuple[int, ...] = ()
        source = None
        if name in SHOT_SETTINGS:
            shots = s.get_list("shots", int)
            bad = [k for k in shots if k not in ALLOWED_SHOTS]
            if bad:
                s.fail(f"K={bad[0]} not allowed (expected K in {ALLOWED_SHOTS})", s.key("shots"))
        elif name == "data_fraction":
            shots = s.get_list("fractions", int)
            bad = [p for p in shots if p not in ALLOWED_FRACTIONS]
            if bad:
                s.fail(f"{bad[0]} % not allowed (expected one of {ALLOWED_FRACTIONS})", s.key("fractions"))
        elif name == "domain_generalization":
            source = s.get("source", str, required=True)
            if source not in r.data.get("datasets", []):
                s.fail(f"source '{source}' is not one of the protocol's datasets", s.key("source"))
        s.finish()
        out.append(SettingSpec(name, shots, source))
    if not out:
        r.fail("must not be empty", "settings")
    return tuple(out)


def _backbone(r: _Reader) -> BackboneSpec | None:
    if r.data.get("backbone") is None:
        r.used.add("backbone")
        return None
    b = r.sub("backbone")
    spec = BackboneSpec(
        b.get("model", str, required=True),
        b.get("weights", str, required=True),
        b.get("seed", int, 0),
        b.get("quick_gelu", bool, None),
    )
    b.finish()
    return spec


def parse_backbone(path: str, data: Any, where: str) -> BackboneSpec:
    """Validate a per-method ``backbone`` mapping (same keys as the protocol's)."""
    r = _Reader(path, {"backbone": data}, where.rsplit(".", 1)[0] if "." in where else "")
    spec = _backbone(r)
    assert spec is not None
    return spec


RESOURCE_KEYS = ("cpus", "gpus")
# image sizes a cell may ask for: below, a ViT's patch grid or a CNN's deepest stage has no room; above, one
# image's activations outgrow any accelerator's memory (100,000 px tried to allocate 80 GB)
IMAGE_SIZES = (32, 4096)


def image_size_problem(value: Any) -> str | None:
    """Why ``value`` is no image size a cell can run at, or None."""
    low, high = IMAGE_SIZES
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return f"expected an integer from {low} to {high} (pixels per side), got {value!r}"
    return None


def parse_resources(path: str, data: Any, where: str) -> dict[str, float]:
    """``{cpus: N, gpus: N}``, what one cell asks of a Ray cluster (numbers, cpus > 0, gpus >= 0)."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BenchmarkError(f"{path}: {where}: expected a mapping such as {{gpus: 1, cpus: 4}}, got {data!r}")
    out = {}
    for key, value in data.items():
        if key not in RESOURCE_KEYS:
            raise BenchmarkError(f"{path}: {where}.{key}: unknown key (expected one of {', '.join(RESOURCE_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= (0 if key == "gpus" else 1e-9):
            raise BenchmarkError(f"{path}: {where}.{key}: expected a number {'>= 0' if key == 'gpus' else '> 0'}, "
                                 f"got {value!r}")  # fmt: skip
        out[key] = float(value)
    return out


def _nearest_protocol(path: str) -> str:
    """A hint naming the shipped protocol closest to ``path`` (``demo`` -> ``protocols/demo.yaml``)."""
    shipped = Path(__file__).resolve().parents[1] / "protocols"
    names = {p.stem: p for p in shipped.glob("*.yaml")}
    close = difflib.get_close_matches(Path(path).stem, list(names), n=1, cutoff=0.5)
    if not close:
        return ""
    found = names[close[0]]
    try:
        shown = found.relative_to(Path.cwd())
    except ValueError:
        shown = found
    return f"; did you mean '{shown}'?"


def load_protocol(path: str | Path) -> Protocol:
    """Read and validate one protocol file; raises ``BenchmarkError`` naming the file and key."""
    path = str(path)
    if not Path(path).is_file():
        raise BenchmarkError(f"{path}: protocol file not found{_nearest_protocol(path)}")
    try:
        data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", "") or ""
        detail = f": {problem}" if problem.startswith("duplicate key") else ""
        raise BenchmarkError(f"{path}: not valid YAML{line}{detail}") from None
    r = _Reader(path, data)
    version = r.get("version", int, required=True)
    if version != PROTOCOL_VERSION:
        r.fail(f"unsupported protocol version {version} (this harness reads version {PROTOCOL_VERSION})", "version")
    name = r.get("name", str, required=True)
    if not name.replace("_", "").replace("-", "").isalnum():
        r.fail("use letters, digits, '-' and '_' only", "name")
    methods_raw = r.get("methods", (dict, list), required=True)
    if isinstance(methods_raw, list):
        methods_raw = {m: {} for m in methods_raw}
    methods = {}
    for m, params in methods_raw.items():
        if params is not None and not isinstance(params, dict):
            r.fail(f"expected a mapping of parameters, got {params!r}", f"methods.{m}")
        methods[str(m)] = dict(params or {})
    seeds = r.get_list("seeds", int, (0,))
    sampling = r.sub("sampling")
    sampling_seeds = sampling.get_list("seeds", int, seeds)
    if len(sampling_seeds) != len(seeds):
        sampling.fail(f"needs one sampling seed per seed ({len(seeds)})", sampling.key("seeds"))
    manifests = sampling.get("manifests", str, None)
    sampling.finish()
    thr = r.sub("threshold")
    threshold = ThresholdSpec(thr.get("mode", str, "fixed"), thr.get("value", float, 0.5))
    if threshold.mode not in ("fixed", "validation"):
        thr.fail(f"expected 'fixed' or 'validation', got '{threshold.mode}'", thr.key("mode"))
    if not 0.0 <= threshold.value <= 1.0:
        thr.fail("expected a number in [0, 1]", thr.key("value"))
    thr.finish()
    sweep = r.get_list("sweep", float, DEFAULT_SWEEP)
    if any(not 0.0 < t < 1.0 for t in sweep) or list(sweep) != sorted(set(sweep)):
        r.fail("expected increasing thresholds in (0, 1)", "sweep")
    tracking = r.sub("tracking")
    tracking_uri = tracking.get("uri", str, None)
    tracking.finish()
    synthetic = r.get("synthetic", dict, {})
    protocol = Protocol(
        path=path,
        name=name,
        version=version,
        description=r.get("description", str, ""),
        datasets=r.get_list("datasets", str),
        settings=_settings(r),
        methods=methods,
        seeds=seeds,
        sampling_seeds=sampling_seeds,
        manifests=manifests,
        image_size=r.get("image_size", int, 240),
        batch_size=r.get("batch_size", int, 16),
        backbone=_backbone(r),
        threshold=threshold,
        sweep=sweep,
        data_root=r.get("data_root", str, "data"),
        dataset_cards=r.get_list("dataset_cards", str, ()),
        synthetic=synthetic,
        tracking_uri=tracking_uri,
        results_dir=r.get("results_dir", str, "results"),
        device=r.get("device", str, "auto"),
        figure_samples=r.get("figure_samples", int, 4),
        resources=parse_resources(path, data.get("resources") if isinstance(data, dict) else None, "resources"),
        loader_workers=r.get("loader_workers", int, None),
        prompt_designs=r.get_list("prompt_designs", str, ()),
        precision=r.get("precision", str, None),
        cell_figures=r.get("cell_figures", bool, True),
        evaluation_size=r.get("evaluation_size", str, "model"),
        resize=r.get("resize", str, None),
        data_locks=r.get("data_locks", dict, {}),
        raw=data,
    )
    r.used.add("resources")  # read above from the raw mapping
    r.finish()
    if protocol.batch_size <= 0:
        r.fail("expected a positive integer", "batch_size")
    problem = image_size_problem(protocol.image_size)
    if problem:
        r.fail(problem, "image_size")
    bad = [d for d in protocol.prompt_designs if d not in PROMPT_DESIGNS]
    if bad:
        r.fail(f"unknown prompt design '{bad[0]}' (expected one of {', '.join(PROMPT_DESIGNS)})", "prompt_designs")
    if protocol.precision is not None and precision_problem(protocol.precision):
        r.fail(precision_problem(protocol.precision), "precision")
    if protocol.evaluation_size not in EVALUATION_SIZES:
        r.fail(f"expected one of {', '.join(EVALUATION_SIZES)}, got '{protocol.evaluation_size}'", "evaluation_size")
    if protocol.resize is not None and protocol.resize not in RESIZES:
        r.fail(f"expected one of {', '.join(RESIZES)}, got '{protocol.resize}'", "resize")
    for dataset, lock in protocol.data_locks.items():
        if dataset not in protocol.datasets:
            r.fail(f"'{dataset}' is not one of the protocol's datasets", f"data_locks.{dataset}")
        if not isinstance(lock, str) or not lock:
            what = f"expected the path of a lock file (verify-data {dataset} --lock), got {lock!r}"
            r.fail(what, f"data_locks.{dataset}")
    if protocol.figure_samples < 0:
        r.fail("expected 0 or more images", "figure_samples")
    if protocol.loader_workers is not None and protocol.loader_workers < 0:
        r.fail("expected 0 or more processes", "loader_workers")
    if protocol.device not in ("auto", "cpu", "cuda") and not protocol.device.startswith("cuda:"):
        r.fail(f"expected auto, cpu, cuda or cuda:N, got '{protocol.device}'", "device")
    return protocol
