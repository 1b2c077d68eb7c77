"""The papers' published numbers (``results/published/published_results.csv``), matched to our cells."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

PUBLISHED_CSV = Path(__file__).resolve().parents[2] / "results" / "published" / "published_results.csv"


def published_settings(setting: str, shots: int | None) -> list[str]:
    """The paper setting names that correspond to one of our (setting, K)."""
    k = shots or 0
    return {
        "zero_shot_loo": ["zeroshot_loo"],
        "few_shot": [f"fewshot_k{k}"],
        "few_normal": [f"few-normal_k{k}"] + (["one-normal-shot"] if k == 1 else []),
        "supervised": ["supervised"],
        "full_normal": ["full-normal"],
    }.get(setting, [])


def load_published(path: Path = PUBLISHED_CSV) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype={"threshold": "float64"})
    frame["method_key"] = frame["method"].str.lower()
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
        (published["method_key"] == method.lower())
        & (published["dataset"] == dataset)
        & (published["metric"] == metric)
        & (published["setting"].isin(published_settings(setting, shots)))
    ]
    if metric == "dice":  # published Dice is at a fixed threshold: only a row at that threshold matches
        if threshold is None or math.isnan(threshold):
            return None
        rows = rows[(rows["threshold"] - threshold).abs() < 1e-9]
    if rows.empty:
        return None
    row = rows.iloc[0]
    return float(row["value_percent"]), f"{row['paper']} {row['table']}"
