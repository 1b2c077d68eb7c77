"""anomalib's models as method plugins: ``anomalib:<Model>`` (``anomalib:Patchcore``, ``anomalib:Padim``,
``anomalib:ReverseDistillation``, ``anomalib:Cflow``, ...), through one bridge.

The family is resolved by the registry on first use: the member names an ``anomalib.models`` class. Its
constructor's parameters are the plugin's parameters (an unknown one is a one-line error listing the valid
names; one named like a harness key is ``anomalib_<name>``: PatchCore's ``anomalib_precision``), beside
``epochs`` and ``batch_size`` of the bridge's training loop. The backbone is the harness's ``backbone`` (a timm
model and its weights, or ``random-init``), defaulting to the model's own backbone with timm's default pretrained
tag. anomalib's models are one-class: every setting trains on the normal images
the setting allows (``few_shot``/``supervised`` drop their anomalous images). The maths, training and
normalisation: ``methods/models/anomalib_bridge.py``.

anomalib is an optional extra: ``pip install -e ".[anomalib]"`` (the ``dev`` extra installs it).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import warnings
from typing import Any, ClassVar

from benchmark.errors import BenchmarkError
from benchmark.method import HARNESS_KEYS, METHODS, Method, same_type
from benchmark.protocol import BackboneSpec

# anomalib class -> the name the papers print (MVFA Table 1, MCMIAD Table 1)
PUBLISHED = {
    "Patchcore": "PatchCore",
    "Padim": "PaDiM",
    "Cflow": "CFlow",
    "ReverseDistillation": "RD4AD",
    "Draem": "DRAEM",
    "Stfpm": "STFPM",
    "EfficientAd": "EfficientAD",
    "Fastflow": "FastFlow",
}
# constructor arguments the bridge sets itself (the backbone from the harness; anomalib's pre/post-processing,
# metrics and visualisation are ours)
BRIDGE_SET = ("backbone", "pre_trained", "pre_processor", "post_processor", "evaluator", "visualizer")
BRIDGE_PARAMS = {"epochs": 1, "batch_size": 32}
# a constructor argument named like a key the harness reads itself (PatchCore's memory-bank ``precision``) is the
# plugin's ``anomalib_<name>``: the entry's ``precision`` is the cell's (``benchmark.precision``)
RENAMED_PREFIX = "anomalib_"


def plugin_name(anomalib_name: str) -> str:
    return RENAMED_PREFIX + anomalib_name if anomalib_name in HARNESS_KEYS else anomalib_name


def anomalib_name(name: str) -> str:
    """The constructor argument a plugin parameter sets (``plugin_name``'s inverse)."""
    bare = name.removeprefix(RENAMED_PREFIX)
    return bare if bare in HARNESS_KEYS else name


def anomalib_models():
    try:
        with warnings.catch_warnings():  # anomalib's own deprecation notices, of no use to a user
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            import anomalib.models as models
    except ImportError:
        raise BenchmarkError('anomalib methods need the anomalib extra: pip install -e ".[anomalib]"') from None
    return models


class AnomalibMethod(Method):
    """A method of the ``anomalib:`` family (one subclass per anomalib model, made by ``resolve``)."""

    settings = frozenset({"full_normal", "few_normal", "few_shot", "supervised"})
    default_image_size = 256
    implementation = "methods.models.anomalib_bridge:AnomalibImpl"
    fit_state = ("module", "calibration", "history")
    one_class = True  # the bridge trains on the normal training images only
    setting_blind = True
    reads_valid = False
    model_class: ClassVar[str] = ""
    constructor: ClassVar[dict[str, Any]] = {}  # name -> default

    @classmethod
    def implementation_class(cls) -> type[Method]:
        """The bridge (imported only now) specialised to this model's class."""
        return type(f"{cls.__name__}Impl", (super().implementation_class(), cls), {})

    @classmethod
    def parse_params(cls, raw: dict[str, Any], where: str) -> Any:
        raw = {k: v for k, v in raw.items() if k not in HARNESS_KEYS}
        valid = sorted({*cls.constructor, *BRIDGE_PARAMS})
        for key, value in raw.items():
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise BenchmarkError(f"{where}.{key}: unknown parameter; {hint}valid: {', '.join(valid)}")
            if key in BRIDGE_PARAMS and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise BenchmarkError(f"{where}.{key}: expected an integer >= 1, got {value!r}")
            expected = _expected_type(cls.constructor.get(key), value)
            if expected:
                raise BenchmarkError(f"{where}.{key}: expected {expected}, got {value!r}")
        return cls.Params(**raw)


def _expected_type(default: Any, value: Any) -> str | None:
    """The type a constructor parameter with this default takes, where ``value`` is not of it (the harness's
    ``same_type``: a float takes an int, a list a tuple); None where it is or the default cannot tell (none,
    None or not a literal)."""
    if value is None or default in (None, inspect.Parameter.empty, ANOMALIB_DEFAULT):
        return None
    expected = tuple if isinstance(default, list | tuple) else type(default)
    return None if same_type(expected, value) else "list" if expected is tuple else expected.__name__


_RESOLVED: dict[str, type[Method]] = {}  # one class per anomalib model, whatever the case it was named in
ANOMALIB_DEFAULT = "anomalib default"  # a default that is no literal (an enum member): the model's own applies


def _package_dir():
    """anomalib's folder, found without importing it (importing its models takes seconds)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("anomalib")
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkError('anomalib methods need the anomalib extra: pip install -e ".[anomalib]"')
    return Path(next(iter(spec.submodule_search_locations)))


def _imported_names(init) -> dict[str, str]:
    """``from .module import Name`` lines of a package's ``__init__.py``: name -> module."""
    import ast

    tree = ast.parse(init.read_text(encoding="utf-8"))
    return {
        alias.asname or alias.name: node.module
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
        for alias in node.names
    }


def model_signatures() -> dict[str, dict[str, Any]]:
    """Every anomalib model class and its constructor's defaults, read from the source (no import): the
    classes ``anomalib.models.image`` and ``.video`` export."""
    import ast

    root = _package_dir() / "models"
    found: dict[str, dict[str, Any]] = {}
    for kind in ("image", "video"):
        for name, module in _imported_names(root / kind / "__init__.py").items():
            package = root / kind / module
            where = _imported_names(package / "__init__.py").get(name) if package.is_dir() else None
            source = package / f"{where}.py" if where else package.with_suffix(".py")
            if not source.is_file():
                continue
            tree = ast.parse(source.read_text(encoding="utf-8"))
            cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
            init = (
                next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
                if cls
                else None
            )
            if init is None:
                continue
            args = init.args
            positional = args.posonlyargs + args.args
            defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
            pairs = list(zip(positional, defaults, strict=True)) + list(
                zip(args.kwonlyargs, args.kw_defaults, strict=True)
            )
            found[name] = {a.arg: _literal(d) for a, d in pairs if a.arg != "self"}
    return found


def _literal(node) -> Any:
    import ast

    if node is None:
        return inspect.Parameter.empty
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ANOMALIB_DEFAULT


def resolve(member: str) -> type[Method]:
    """The plugin class of ``anomalib:<member>``; an unknown member names the nearest anomalib model. Read
    from anomalib's source, so that naming a model imports neither anomalib nor torch."""
    if member.lower() in _RESOLVED:
        return _RESOLVED[member.lower()]
    signatures = model_signatures()
    names = sorted(signatures)
    found = {n.lower(): n for n in names}.get(member.lower())
    if found is None:
        close = difflib.get_close_matches(member, names, n=1, cutoff=0.5)
        hint = f"did you mean 'anomalib:{close[0]}'?" if close else f"anomalib's models: {', '.join(names)}"
        raise BenchmarkError(f"unknown method 'anomalib:{member}'; {hint}")
    signature = signatures[found]
    constructor = {plugin_name(name): default for name, default in signature.items() if name not in BRIDGE_SET}
    fields = [
        (name, Any, dataclasses.field(default=_frozen(default)))
        for name, default in {**BRIDGE_PARAMS, **constructor}.items()
        if default is not inspect.Parameter.empty
    ]
    params = dataclasses.make_dataclass(f"{found}Params", fields, frozen=True)
    backbone = signature.get("backbone")
    if isinstance(backbone, str) and backbone != ANOMALIB_DEFAULT:
        model, _, tag = backbone.partition(".")  # anomalib may name a tag: "wide_resnet50_2.tv_in1k"
        default_backbone = BackboneSpec(model, tag or _default_tag(model))
    else:
        default_backbone = BackboneSpec("none", "random-init")
    attrs = {
        "name": f"anomalib:{found}",
        "published_name": PUBLISHED.get(found, ""),
        "Params": params,
        "default_backbone": default_backbone,
        "model_class": found,
        "constructor": constructor,
        "__doc__": f"anomalib's {found}, run through the bridge (see ``methods.anomalib_models``).",
    }
    _RESOLVED[member.lower()] = type(f"Anomalib{found}", (AnomalibMethod,), attrs)
    return _RESOLVED[member.lower()]


def _frozen(value: Any) -> Any:
    """A default a frozen dataclass field can hold: lists become tuples."""
    return tuple(value) if isinstance(value, list) else value


# timm's default pretrained tag of anomalib's default backbones (a test keeps this equal to timm's own), so
# that naming an anomalib model imports no torch; other backbones ask timm
TIMM_DEFAULT_TAGS = {
    "resnet18": "a1_in1k",
    "resnet50": "a1_in1k",
    "wide_resnet50_2": "racm_in1k",
    "tf_efficientnet_b5": "ns_jft_in1k",
}


def _default_tag(model: str) -> str:
    if model in TIMM_DEFAULT_TAGS:
        return TIMM_DEFAULT_TAGS[model]
    import timm

    cfg = timm.models.get_pretrained_cfg(model)
    return getattr(cfg, "tag", None) or "random-init"


METHODS.register_family("anomalib", resolve)
