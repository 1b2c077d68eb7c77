"""A protocol expands into cells (method, dataset, setting, K, seed): each an atomic job with a config hash."""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmark import __version__, fits
from benchmark.backbones.weights import weights_identity
from benchmark.data.catalog import DatasetSpec
from benchmark.errors import BenchmarkError
from benchmark.method import METHODS
from benchmark.precision import problem as precision_problem
from benchmark.protocol import (
    RESIZES,
    SHOT_SETTINGS,
    BackboneSpec,
    Protocol,
    image_size_problem,
    parse_backbone,
    parse_resources,
)


@dataclass(frozen=True)
class Cell:
    """One atomic job. ``method`` is the protocol's entry name; ``plugin`` the registered method it runs
    (they differ for aliases, e.g. ``medsad_no_tpca: {method: medsad_clip, use_tpca: false}``)."""

    method: str
    dataset: str
    setting: str
    shots: int | None
    seed: int
    sampling_seed: int
    params: dict[str, Any]
    backbone: BackboneSpec
    image_size: int
    loo_sources: tuple[str, ...] = ()
    plugin: str = ""
    prompt_design: str | None = None  # MedCLIPSeg's test prompts (protocol axis); None: not an axis
    precision: str | None = None  # set by the protocol or method entry; None: the method's default on the device
    resize: str | None = None  # the method entry's, else the protocol's, else the method's own; None: bicubic
    checkpoint: str | None = None  # evaluate this file instead of fitting (the method entry's ``checkpoint``)
    checkpoint_format: str | None = None  # ours | official (the authors' released format); None: ours

    @property
    def plugin_name(self) -> str:
        return self.plugin or self.method

    @property
    def seed_free(self) -> bool:
        """Whether the cell's result depends on no seed (``seed_free``): it runs once, under the first seed."""
        return seed_free(METHODS.get(self.plugin_name), self.setting)

    @property
    def trained_on(self) -> str | None:
        """The training dataset of a domain-generalisation cell (a given checkpoint's own data are unknown)."""
        return self.loo_sources[0] if self.setting == "domain_generalization" and not self.checkpoint else None

    @property
    def cell_id(self) -> str:
        k = (f"-p{self.shots}" if self.setting == "data_fraction" else f"-k{self.shots}") if self.shots else ""
        source = f"-from-{self.loo_sources[0]}" if self.setting == "domain_generalization" else ""
        design = f"-prompt-{self.prompt_design}" if self.prompt_design else ""
        precision = f"-{self.precision}" if self.precision not in (None, "fp32") else ""
        return f"{self.method}-{self.dataset}-{self.setting}{k}{source}{design}-seed{self.seed}{precision}"

    def config(self, protocol: Protocol) -> dict[str, Any]:
        """Everything the cell's result depends on, as recorded and hashed (an unused axis left out, so that
        adding an axis kept earlier cells' hashes)."""
        cell = {**asdict(self), "backbone": asdict(self.backbone)}
        for axis in ("prompt_design", "precision", "resize", "checkpoint", "checkpoint_format"):
            if cell[axis] is None:
                del cell[axis]
        if self.checkpoint:  # a new file at the same path is a new cell
            cell["checkpoint_identity"] = weights_identity(self.checkpoint)
        return {
            "harness_version": __version__,
            "protocol": {"name": protocol.name, "version": protocol.version},
            "cell": cell,
            "threshold": asdict(protocol.threshold),
            "sweep": list(protocol.sweep),
            "batch_size": protocol.batch_size,
            "manifests": protocol.manifests,
            **({"evaluation_size": protocol.evaluation_size} if protocol.evaluation_size != "model" else {}),
        }

    def config_hash(self, protocol: Protocol) -> str:
        blob = json.dumps(self.config(protocol), sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


def seed_free(cls: type, setting: str) -> bool:
    """A method that declares ``setting`` seed-free, in a setting whose training data are not drawn with the
    sampling seed (the K-shot settings draw K samples per sampling seed): every seed would give the same
    result."""
    return setting in cls.seed_free_settings and setting not in SHOT_SETTINGS


def plugin_of(name: str, raw: dict[str, Any]) -> str:
    """The registered method a protocol entry runs: its ``method`` key, else the entry's own name."""
    return raw.get("method", name)


def expand(
    protocol: Protocol,
    catalog: dict[str, DatasetSpec],
    methods: list[str] | None = None,
    datasets: list[str] | None = None,
    seeds: list[int] | None = None,
    settings: list[str] | None = None,
    shots: list[int] | None = None,
) -> list[Cell]:
    """The protocol's grid, optionally narrowed by ``--methods``/``--datasets``/``--seeds``/``--settings``/
    ``--shots`` (K, or a data fraction's percentage: settings without one are left out); names checked."""
    where = protocol.path
    for i, name in enumerate(protocol.datasets):
        if name not in catalog:
            close = difflib.get_close_matches(name, list(catalog), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise BenchmarkError(f"{where}: datasets[{i}]: unknown dataset '{name}'{hint}")
    for name, raw in protocol.methods.items():
        plugin = plugin_of(name, raw)
        if not isinstance(plugin, str):
            raise BenchmarkError(f"{where}: methods.{name}.method: expected a method name, got {plugin!r}")
        METHODS.get(plugin, where=f"{where}: methods.{name}" + (".method" if "method" in raw else ""))
    picked_methods = _narrow(list(protocol.methods), methods, "--methods")
    picked_datasets = _narrow(list(protocol.datasets), datasets, "--datasets")
    picked_settings = _narrow(list(dict.fromkeys(s.name for s in protocol.settings)), settings, "--settings")
    if shots is not None:
        offered = sorted({k for s in protocol.settings if s.name in picked_settings for k in s.shots})
        for k in shots:
            if k not in offered:
                raise BenchmarkError(f"--shots: {k} is not a K (or fraction) of the settings picked (they list "
                                     f"{', '.join(map(str, offered)) or 'none'})")  # fmt: skip
    seed_pairs = list(zip(protocol.seeds, protocol.sampling_seeds, strict=True))
    if seeds is not None:
        unknown = [s for s in seeds if s not in protocol.seeds]
        if unknown:
            raise BenchmarkError(f"--seeds: seed {unknown[0]} is not in the protocol's seeds {list(protocol.seeds)}")
        seed_pairs = [p for p in seed_pairs if p[0] in seeds]
    cells = []
    for m in picked_methods:
        raw = protocol.methods[m]
        plugin = plugin_of(m, raw)
        cls = METHODS.get(plugin)
        params = cls.parse_params(raw, f"{where}: methods.{m}")
        parse_resources(where, raw.get("resources"), f"methods.{m}.resources")
        if cls.backbone_free:
            if "backbone" in raw:
                raise BenchmarkError(
                    f"{where}: methods.{m}.backbone: '{plugin}' is trained from scratch on no backbone"
                )
            backbone = BackboneSpec("none", "none")
        elif "backbone" in raw:
            backbone = parse_backbone(where, raw["backbone"], f"methods.{m}.backbone")
        else:
            backbone = protocol.backbone or cls.backbone_for(params)
        if backbone is None:
            raise BenchmarkError(f"{where}: backbone: method '{m}' has no default backbone; set one")
        # a method entry's own size, else the method's native size, else the protocol's general one
        image_size = raw.get("image_size", cls.default_image_size or protocol.image_size)
        problem = image_size_problem(image_size)
        if problem:
            raise BenchmarkError(f"{where}: methods.{m}.image_size: {problem}")
        precision = raw.get("precision", protocol.precision)
        if precision is not None and precision_problem(precision):
            raise BenchmarkError(f"{where}: methods.{m}.precision: {precision_problem(precision)}")
        resize = raw.get("resize", protocol.resize or cls.default_resize)
        if resize is not None and resize not in RESIZES:
            raise BenchmarkError(f"{where}: methods.{m}.resize: expected one of {', '.join(RESIZES)}, got {resize!r}")
        resize = None if resize == "bicubic" else resize
        files, checkpoint_format = _checkpoints(where, m, raw, cls, backbone, image_size)
        entry_pairs = _entry_seeds(where, m, raw, protocol.seeds, seed_pairs)
        supported = [s for s in protocol.settings if s.name in cls.settings]
        if not supported:
            names = ", ".join(s.name for s in protocol.settings)
            raise BenchmarkError(
                f"{where}: settings: method '{m}' supports none of {names} (it supports {sorted(cls.settings)})"
            )
        for setting in supported:
            if setting.name not in picked_settings:
                continue
            for d in picked_datasets:
                if cls.requires_masks and not catalog[d].masks:
                    continue  # reported by skipped_pairs
                others = setting.name == "zero_shot_loo" or setting.name in cls.auxiliary_settings
                loo = tuple(x for x in protocol.datasets if x != d) if others else ()
                if setting.name == "domain_generalization":
                    loo = (setting.source,)
                trained_on = setting.source if setting.name == "domain_generalization" else d
                if files and None not in files and trained_on not in files:
                    raise BenchmarkError(f"{where}: methods.{m}.checkpoint: no file for dataset '{trained_on}' (it "
                                         f"names {', '.join(map(str, files))})")  # fmt: skip
                checkpoint, fitted = files.get(None) or files.get(trained_on) or (None, {})
                for k in setting.shots or (None,):
                    if shots is not None and k not in shots:
                        continue
                    for design in protocol.prompt_designs or (None,):
                        # a seed-free cell runs once, under the first seed picked
                        for seed, sampling_seed in entry_pairs[:1] if seed_free(cls, setting.name) else entry_pairs:
                            cells.append(
                                Cell(
                                    m,
                                    d,
                                    setting.name,
                                    k,
                                    seed,
                                    sampling_seed,
                                    {**asdict(params), **fitted},
                                    backbone,
                                    image_size,
                                    loo,
                                    plugin if plugin != m else "",
                                    design,
                                    precision,
                                    resize,
                                    checkpoint,
                                    checkpoint_format,
                                )
                            )
    return cells


def _entry_seeds(
    where: str, name: str, raw: dict[str, Any], protocol_seeds: tuple[int, ...], pairs: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """The (seed, sampling seed) pairs a method entry runs: its own ``seeds``, a subset of the protocol's (a slow
    method in a quick grid), else all of them."""
    own = raw.get("seeds")
    if own is None:
        return pairs
    if not isinstance(own, list) or not own or any(isinstance(s, bool) or s not in protocol_seeds for s in own):
        raise BenchmarkError(
            f"{where}: methods.{name}.seeds: expected a list of the protocol's seeds {list(protocol_seeds)}, "
            f"got {own!r}"
        )
    return [pair for pair in pairs if pair[0] in own]


def _checkpoints(
    where: str, name: str, raw: dict[str, Any], cls: type, backbone: BackboneSpec, image_size: int
) -> tuple[dict[str | None, tuple[str, dict[str, Any]]], str | None]:
    """A method entry's ``checkpoint``: one file for every cell (key None), or one per dataset its fit was trained
    on (a mapping: the authors release one file per dataset); each an existing file of a method that keeps a fit,
    with, for a fit of ours, the parameters it was trained with (the entry's own must agree; its method, backbone
    and image size too, read from its metadata). And the files' format."""
    from benchmark.importers import FORMATS

    fmt = raw.get("checkpoint_format")
    if fmt is not None and fmt not in FORMATS:
        raise BenchmarkError(
            f"{where}: methods.{name}.checkpoint_format: expected one of {', '.join(FORMATS)}, got {fmt!r}"
        )
    given = raw.get("checkpoint")
    if given is None:
        if fmt is not None:
            raise BenchmarkError(f"{where}: methods.{name}.checkpoint_format: given without a checkpoint")
        return {}, None
    if not cls.fit_state:
        raise BenchmarkError(
            f"{where}: methods.{name}.checkpoint: method '{cls.name}' learns no fit state; there is no checkpoint "
            "to evaluate"
        )
    if fmt == "official" and cls.released is None:
        raise BenchmarkError(f"{where}: methods.{name}.checkpoint_format: '{cls.name}' has no importer of its "
                             "authors' checkpoints")  # fmt: skip
    paths = given if isinstance(given, dict) else {None: given}
    files = {}
    for dataset, path in paths.items():
        key = f"methods.{name}.checkpoint" + (f".{dataset}" if dataset is not None else "")
        if not isinstance(path, str) or not path:
            raise BenchmarkError(
                f"{where}: {key}: expected a file path or a mapping of datasets to files, got {path!r}"
            )
        if not Path(path).is_file():
            raise BenchmarkError(f"{where}: {key}: file '{path}' does not exist")
        files[dataset] = (path, {} if fmt == "official" else _fitted(f"{where}: {key}", path, raw, cls, backbone,
                                                                     image_size))  # fmt: skip
    return files, fmt


def _fitted(where: str, path: str, raw: dict[str, Any], cls: type, backbone: BackboneSpec, image_size: int) -> dict:
    """The parameters a fit file of ours was trained with, once its method, maths version, backbone, image size
    and the parameters the entry gives agree with the fit's."""
    try:
        meta = fits.read_meta(Path(path))
    except BenchmarkError as exc:
        raise BenchmarkError(f"{where}: {exc}") from None
    fitted = {k: v for k, v in meta.get("cell_params", {}).items() if k not in cls.test_params}
    given = {k: v for k, v in raw.items() if k in fitted}  # the others are the fit's
    fits.check_fits(meta, fits.identity(cls, backbone.label(), image_size), f"{where} '{path}'", given)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fitted.items()}


def cell_resources(protocol: Protocol, cell: Cell) -> dict[str, float]:
    """What one cell asks of a Ray cluster: the protocol's ``resources``, updated by its method entry's."""
    own = parse_resources(protocol.path, protocol.methods[cell.method].get("resources"), f"methods.{cell.method}")
    return {**protocol.resources, **own}


def skipped_pairs(
    protocol: Protocol, catalog: dict[str, DatasetSpec], methods=None, datasets=None
) -> list[tuple[str, str]]:
    """(method, setting or dataset) pairs of the protocol, narrowed like ``expand``, that are not run: settings
    the method does not support, and datasets without pixel masks for methods that train on masks."""
    skipped = []
    for m in _narrow(list(protocol.methods), methods, "--methods"):
        cls = METHODS.get(plugin_of(m, protocol.methods[m]))
        skipped += [(m, s.name) for s in protocol.settings if s.name not in cls.settings]
        if cls.requires_masks:
            picked = _narrow(list(protocol.datasets), datasets, "--datasets")
            skipped += [(m, d) for d in picked if d in catalog and not catalog[d].masks]
    return list(dict.fromkeys(skipped))


def skipped_note(skipped: list[tuple[str, str]], catalog: dict[str, DatasetSpec]) -> str:
    """The skipped pairs as one line, grouped by method; "" when none."""
    if not skipped:
        return ""
    by_method: dict[str, list[str]] = {}
    for method, what in skipped:
        by_method.setdefault(method, []).append(f"{what} (no masks)" if what in catalog else what)
    parts = "; ".join(f"{m}: {', '.join(whats)}" for m, whats in by_method.items())
    return f"not run (setting not supported, or a mask-trained method on a dataset without masks): {parts}"


def _narrow(available: list[str], wanted: list[str] | None, flag: str) -> list[str]:
    if wanted is None:
        return available
    for w in wanted:
        if w not in available:
            raise BenchmarkError(f"{flag}: '{w}' is not in the protocol (it lists {', '.join(available)})")
    return [a for a in available if a in wanted]
