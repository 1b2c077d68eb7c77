"""The papers' published numbers (``results/published/published_results.csv``), matched to our cells.

Matching is explicit (README, "Published numbers: how rows match"): a printed method name is normalised
(citation markers such as `` [57]`` stripped, spelling variants mapped by ``ALIASES``) and compared with our
methods' published names; each paper's setting names map onto our (setting, K) by ``SETTINGS``, with a note
where the paper leaves something unstated; and a run is matched only when its backbone agrees with the one the
row states (``benchmark.backbones.identity``).
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from benchmark.backbones.identity import agrees

if TYPE_CHECKING:  # the CLI's parser names the published tables without importing pandas
    import pandas as pd

PUBLISHED_CSV = Path(__file__).resolve().parents[2] / "results" / "published" / "published_results.csv"

# spelling variants as printed -> one name (lower-case keys)
ALIASES = {
    "april-gan": "APRIL-GAN",
    "aaclip": "AA-CLIP",
    "aa-clip": "AA-CLIP",
    "adaclip": "AdaCLIP",
    "anomalyclip": "AnomalyCLIP",
    "cflowad": "CFlow",
    "cflow-ad": "CFlow",
    "cflow": "CFlow",
    "rd4ad": "RD4AD",
    "patchcore": "PatchCore",
    "mfa": "MVFA",  # MVFA Table 7 labels its own method "MFA"
    "nnunet": "nnU-Net",
    "rollingunet": "Rolling-UNet",
    "rolling-unet": "Rolling-UNet",
}

# what a paper leaves unstated of how it ran its baselines, and what the CSV's backbones (and our defaults) assume:
# paper -> (the methods, the note its tables print)
UNSTATED = {
    "medclipseg": (
        {"UNet", "UNet++", "DeepLabv3", "Attention U-Net", "Swin-UNet", "TransUNet", "nnU-Net"},
        "MedCLIPSeg does not state how it trained its segmentation baselines (its README: the same instructions "
        "as for MedCLIPSeg); our assumption, not its statement: UNet, UNet++ and DeepLabv3 on "
        "segmentation_models_pytorch's default encoder (ResNet-34, ImageNet weights) and Attention U-Net from "
        "scratch, all four with MedCLIPSeg's training recipe; TransUNet and Swin-UNet on the pretrained weights "
        "and recipes of their official code; nnU-Net with its own 2d defaults.",
    ),
    "medsad-clip": (
        {"nnU-Net", "Rolling-UNet"},
        "MedSAD-CLIP does not state how it trained nnU-Net and Rolling-UNet; our assumption: nnU-Net's own 2d "
        "defaults and Rolling-UNet's official recipe.",
    ),
}


class OurSetting(NamedTuple):
    setting: str
    shots: int
    note: str = ""  # what the paper leaves unstated, and what we run instead


# (paper, setting as printed) -> ours
SETTINGS = {
    ("mvfa", "zeroshot_loo"): OurSetting("zero_shot_loo", 0),
    **{("mvfa", f"fewshot_k{k}"): OurSetting("few_shot", k) for k in (2, 4, 8, 16)},
    ("mvfa", "full-normal"): OurSetting("full_normal", 0),
    ("mvfa", "few-normal_k4"): OurSetting("few_normal", 4),
    ("mcmiad", "full-normal"): OurSetting("full_normal", 0),
    ("mcmiad", "one-normal-shot"): OurSetting("few_normal", 1),
    ("medsad-clip", "supervised"): OurSetting("supervised", 0),
    ("medsad-clip", "few-shot"): OurSetting(
        "few_shot", 4, "MedSAD-CLIP does not state K for its few-shot rows; we run K = 4 (MVFA's main setting)"
    ),
    **{("medclipseg", f"data_fraction_{p}"): OurSetting("data_fraction", p) for p in (10, 25, 50, 100)},
    ("medclipseg", "domain_generalization"): OurSetting(
        "domain_generalization", 0, "MedCLIPSeg trains on the first set of each domain and tests on all of its sets"
    ),
    ("medsad-clip", "zero-shot"): OurSetting(
        "zero_shot_loo",
        0,
        "MedSAD-CLIP does not state the auxiliary data of its zero-shot rows; we train on the other datasets "
        "of the table (leave one dataset out)",
    ),
}


# MedCLIPSeg's README prints averages over datasets (``../shared/published/README.md``): ours are the means
# of our per-dataset means over the same sets (all of them must have been run), and the harmonic mean of the
# in-domain and out-of-domain averages (in-domain: a domain's source set tested on itself).
EFFICIENCY_SETS = ("BUSI", "BTMRI", "ISIC", "Kvasir", "Covid19", "EUS")
DOMAIN_SOURCES = ("BUSI", "Kvasir", "ISIC", "BTMRI")  # its scripts/domain_generalization.sh: BUS, ENDO, DERM, BRAIN
AGGREGATES = ("avg_efficiency_sets", "avg_in_domain", "avg_out_of_domain", "harmonic_mean_id_ood")
AGGREGATES_OF = {  # our setting -> the averages its README table prints
    "data_fraction": ("avg_efficiency_sets",),
    "domain_generalization": ("avg_in_domain", "avg_out_of_domain", "harmonic_mean_id_ood"),
}


def average_sets(means: dict[str, tuple[float, int]], name: str) -> tuple[float, int] | None:
    """The averaged "dataset" ``name`` (``AGGREGATES``) from per-dataset (mean, seeds): the mean of the means
    and the fewest seeds among them; None when a set it needs is missing."""

    def mean_of(sets: list[str]) -> tuple[float, int] | None:
        if not sets:
            return None
        return sum(means[d][0] for d in sets) / len(sets), min(means[d][1] for d in sets)

    inside = [d for d in means if d in DOMAIN_SOURCES]
    outside = [d for d in means if d not in DOMAIN_SOURCES]
    if name == "avg_efficiency_sets":
        return mean_of(list(EFFICIENCY_SETS)) if all(d in means for d in EFFICIENCY_SETS) else None
    if name == "avg_in_domain":
        return mean_of(inside)
    if name == "avg_out_of_domain":
        return mean_of(outside)
    ids, ood = mean_of(inside), mean_of(outside)
    if ids is None or ood is None or ids[0] + ood[0] == 0:
        return None
    return 2 * ids[0] * ood[0] / (ids[0] + ood[0]), min(ids[1], ood[1])


def canonical(printed: str) -> str:
    """A printed method name without its citation marker, spelling variants unified."""
    name = re.sub(r"\s*\[\d+(,\s*\d+)*\]\s*$", "", str(printed)).strip()
    return ALIASES.get(name.lower(), name)


def our_setting(paper: str, setting: str) -> OurSetting | None:
    return SETTINGS.get((paper, setting))


def published_tables(path: Path = PUBLISHED_CSV) -> dict[str, list[str]]:
    """Each paper's tables in the CSV's order: ``{"medsad-clip": ["Table 2", "Table 4", "Table 7"], ...}``."""
    with path.open(newline="", encoding="utf-8") as f:
        pairs = dict.fromkeys((row["paper"], row["table"]) for row in csv.DictReader(f))
    tables: dict[str, list[str]] = {}
    for paper, table in pairs:
        tables.setdefault(paper, []).append(table)
    return tables


def load_published(path: Path = PUBLISHED_CSV) -> pd.DataFrame:
    """The CSV with each row's normalised method (``method_key``, lower case) and our (setting, K)."""
    import pandas as pd

    frame = pd.read_csv(
        path, dtype={"threshold": "float64", "backbone": "string"}, keep_default_na=False, na_values={"threshold": [""]}
    )
    frame["canonical"] = frame["method"].map(canonical)
    frame["method_key"] = frame["canonical"].str.lower()
    ours = [our_setting(p, s) for p, s in zip(frame["paper"], frame["setting"], strict=True)]
    frame["our_setting"] = [o.setting if o else None for o in ours]
    frame["our_shots"] = [o.shots if o else None for o in ours]
    frame["setting_note"] = [o.note if o else "" for o in ours]
    frame["method_note"] = [
        UNSTATED[p][1] if p in UNSTATED and m in UNSTATED[p][0] else ""
        for p, m in zip(frame["paper"], frame["canonical"], strict=True)
    ]
    return frame


def _rows(
    published: pd.DataFrame,
    method: str,
    setting: str,
    shots: int | None,
    dataset: str | None = None,
    metric: str | None = None,
) -> pd.DataFrame:
    rows = published[
        (published["method_key"] == canonical(method).lower())
        & (published["our_setting"] == setting)
        & (published["our_shots"] == (shots or 0))
    ]
    if dataset is not None:
        rows = rows[(rows["dataset"] == dataset) & (rows["metric"] == metric)]
    return rows


def lookup(
    published: pd.DataFrame,
    method: str,
    setting: str,
    shots: int | None,
    dataset: str,
    metric: str,
    threshold: float | None,
    backbone: str,
) -> tuple[float, str] | None:
    """Published value (percent) and its source ('mvfa Table 2'), or None: only a row whose stated backbone
    agrees with the run's ``backbone`` label."""
    rows = _rows(published, method, setting, shots, dataset, metric)
    if metric == "dice":  # published Dice is at a fixed threshold: only a row at that threshold matches
        if threshold is None or math.isnan(threshold):
            return None
        rows = rows[(rows["threshold"] - threshold).abs() < 1e-9]
    rows = rows[rows["backbone"].map(lambda b: agrees(b, backbone)).astype(bool)]
    if rows.empty:
        return None
    row = rows.iloc[0]
    return float(row["value_percent"]), f"{row['paper']} {row['table']}"


def other_backbones(published: pd.DataFrame, method: str, setting: str, shots: int | None, backbone: str) -> str:
    """The backbones the papers state for ``method``'s rows in that setting when none agrees with ``backbone``
    (``"ViT-L-14-336 / openai"``; ``"not stated"`` for rows that record none), else ""."""
    stated = list(dict.fromkeys(_rows(published, method, setting, shots)["backbone"]))
    if not stated or any(agrees(b, backbone) for b in stated):
        return ""
    return ", ".join(b or "not stated" for b in stated)
