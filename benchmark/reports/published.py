"""The papers' published numbers (``results/published/published_results.csv``), matched to our cells.

Matching is explicit (README, "Published numbers: how rows match"): a printed method name is normalised
(citation markers such as `` [57]`` stripped, spelling variants mapped by ``ALIASES``) and compared with our
methods' published names; each paper's setting names map onto our (setting, K) by ``SETTINGS``, with a note
where the paper leaves something unstated.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import NamedTuple

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
    ("medsad-clip", "zero-shot"): OurSetting(
        "zero_shot_loo",
        0,
        "MedSAD-CLIP does not state the auxiliary data of its zero-shot rows; we train on the other datasets "
        "of the table (leave one dataset out)",
    ),
}


def canonical(printed: str) -> str:
    """A printed method name without its citation marker, spelling variants unified."""
    name = re.sub(r"\s*\[\d+(,\s*\d+)*\]\s*$", "", str(printed)).strip()
    return ALIASES.get(name.lower(), name)


def our_setting(paper: str, setting: str) -> OurSetting | None:
    return SETTINGS.get((paper, setting))


def load_published(path: Path = PUBLISHED_CSV) -> pd.DataFrame:
    """The CSV with each row's normalised method (``method_key``, lower case) and our (setting, K)."""
    frame = pd.read_csv(path, dtype={"threshold": "float64"})
    frame["canonical"] = frame["method"].map(canonical)
    frame["method_key"] = frame["canonical"].str.lower()
    ours = [our_setting(p, s) for p, s in zip(frame["paper"], frame["setting"], strict=True)]
    frame["our_setting"] = [o.setting if o else None for o in ours]
    frame["our_shots"] = [o.shots if o else None for o in ours]
    frame["setting_note"] = [o.note if o else "" for o in ours]
    return frame


def lookup(
    published: pd.DataFrame,
    method: str,
    setting: str,
    shots: int | None,
    dataset: str,
    metric: str,
    threshold: float | None,
) -> tuple[float, str] | None:
    """Published value (percent) and its source ('mvfa Table 2'), or None."""
    rows = published[
        (published["method_key"] == canonical(method).lower())
        & (published["dataset"] == dataset)
        & (published["metric"] == metric)
        & (published["our_setting"] == setting)
        & (published["our_shots"] == (shots or 0))
    ]
    if metric == "dice":  # published Dice is at a fixed threshold: only a row at that threshold matches
        if threshold is None or math.isnan(threshold):
            return None
        rows = rows[(rows["threshold"] - threshold).abs() < 1e-9]
    if rows.empty:
        return None
    row = rows.iloc[0]
    return float(row["value_percent"]), f"{row['paper']} {row['table']}"
