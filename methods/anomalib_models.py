"""anomalib's models as method plugins: ``anomalib:<Model>`` (``anomalib:Patchcore``, ``anomalib:Padim``,
``anomalib:ReverseDistillation``, ``anomalib:Cflow``, ...), through one bridge.

The family is resolved by the registry on first use: the member names an ``anomalib.models`` class. Its
constructor's parameters are the plugin's parameters (an unknown one is a one-line error listing the valid
names), beside ``epochs`` and ``batch_size`` of the bridge's training loop. The backbone is the harness's
``backbone`` (a timm model and its weights, or ``random-init``), defaulting to the model's own backbone with
timm's default pretrained tag. anomalib's models are one-class: every setting trains on the normal images
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
from benchmark.method import HARNESS_KEYS, METHODS, Method
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
    model_class: ClassVar[str] = ""
    constructor: ClassVar[dict[str, Any]] = {}  # name -> default

    @classmethod
    def build(cls, params: Any, context: Any) -> Method:
        """The bridge (imported only now) specialised to this model's class."""
        from methods.models.anomalib_bridge import AnomalibImpl

        return type(f"{cls.__name__}Impl", (AnomalibImpl, cls), {})(params, context)

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
        return cls.Params(**raw)


_RESOLVED: dict[str, type[Method]] = {}  # one class per anomalib model, whatever the case it was named in


def resolve(member: str) -> type[Method]:
    """The plugin class of ``anomalib:<member>``; an unknown member names the nearest anomalib model."""
    if member.lower() in _RESOLVED:
        return _RESOLVED[member.lower()]
    models = anomalib_models()
    names = [n for n in dir(models) if n[:1].isupper() and inspect.isclass(getattr(models, n))]
    names = [n for n in names if issubclass(getattr(models, n), models.AnomalibModule) and n != "AnomalibModule"]
    found = {n.lower(): n for n in names}.get(member.lower())
    if found is None:
        close = difflib.get_close_matches(member, names, n=1, cutoff=0.5)
        hint = f"did you mean 'anomalib:{close[0]}'?" if close else f"anomalib's models: {', '.join(names)}"
        raise BenchmarkError(f"unknown method 'anomalib:{member}'; {hint}")
    signature = inspect.signature(getattr(models, found).__init__)
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    constructor = {
        name: p.default
        for name, p in signature.parameters.items()
        if name != "self" and name not in BRIDGE_SET and p.kind in kinds
    }
    fields = [
        (name, Any, dataclasses.field(default=_frozen(default)))
        for name, default in {**BRIDGE_PARAMS, **constructor}.items()
        if default is not inspect.Parameter.empty
    ]
    params = dataclasses.make_dataclass(f"{found}Params", fields, frozen=True)
    backbone = signature.parameters.get("backbone")
    default_backbone = (
        BackboneSpec(backbone.default, _default_tag(backbone.default))
        if backbone is not None and isinstance(backbone.default, str)
        else BackboneSpec("none", "random-init")
    )
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
    """A default a frozen dataclass field can hold (lists become tuples; enums their value)."""
    if isinstance(value, list):
        return tuple(value)
    return getattr(value, "value", value)


def _default_tag(model: str) -> str:
    import timm

    cfg = timm.models.get_pretrained_cfg(model)
    return getattr(cfg, "tag", None) or "random-init"


METHODS.register_family("anomalib", resolve)
