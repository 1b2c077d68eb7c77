"""The local results store: one JSON line per cell attempt in ``results/<experiment>/results.jsonl``.

The last line of a config hash wins; ``--resume`` skips hashes whose last line is ``finished``. Lines are
appended and flushed whole, so a crash never leaves a cell recorded as finished. Lines are strict JSON: a
number that is not finite is written ``null``, never ``NaN``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas


RECORD_KEYS = (
    "method", "dataset", "setting", "shots", "seed", "backbone", "threshold", "variant", "published_as", "seed_free",
    "precision", "evaluation_size", "fit_source", "same_result_as", "data_lock",
)  # fmt: skip


OVER_NORMAL_IMAGES_TOO = ("dice_per_image", "nsd")


def _over_normal_images_too(rec: dict[str, Any]) -> bool:
    """Whether a record's per-image DSC and NSD averaged normal test images in (records written before they were
    taken over the anomalous images only): there an empty prediction scored 1, so they are not shown."""
    return "image_auroc" in rec["metrics"] and rec.get("params", {}).get("segmentation_images") != "anomalous"


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, so that ``json.dumps`` writes strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


class ResultStore:
    def __init__(self, results_dir: str | Path, experiment: str) -> None:
        self.dir = Path(results_dir) / experiment
        self.path = self.dir / "results.jsonl"

    def records(self) -> list[dict[str, Any]]:
        """Every readable line; a line cut short by an interrupted write is reported on stderr and skipped."""
        if not self.path.is_file():
            return []
        out = []
        for i, line in enumerate(self.path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or "config_hash" not in record or "status" not in record:
                print(f"warning: {self.path}: line {i + 1} is not a whole record (a write cut short?); ignored",
                      file=sys.stderr)  # fmt: skip
                continue
            out.append(record)
        return out

    def latest(self) -> dict[str, dict[str, Any]]:
        latest: dict[str, dict[str, Any]] = {}
        for rec in self.records():
            latest[rec["config_hash"]] = rec
        return latest

    def finished_hashes(self) -> set[str]:
        return {h for h, rec in self.latest().items() if rec["status"] == "finished"}

    def append(self, record: dict[str, Any]) -> None:
        """Add one line, whole: a line left torn by an earlier interrupted write is closed first, so that it
        never swallows this record."""
        self.dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps(strict_json(record), default=str, allow_nan=False) + "\n"
        with self.path.open("a+b") as fh:
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    line = "\n" + line
            fh.write(line.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())

    def frame(self) -> pandas.DataFrame:
        """Cells as one long table: one row per finished cell and metric, and one row with no metric for
        each failed cell (so that tables can say how many seeds make a mean)."""
        rows = []
        for rec in self.latest().values():
            base = {**{k: rec.get(k) for k in RECORD_KEYS}, "plugin": rec.get("plugin", rec.get("method"))}
            base["evaluation_size"] = base["evaluation_size"] or "model"  # records before the key: the model's
            base["fit_source"] = base["fit_source"] or "retrain"  # records before the key: trained in the cell
            if rec["status"] != "finished":
                rows.append({**base, "status": rec["status"], "metric": None, "value": float("nan")})
                continue
            for metric, value in rec["metrics"].items():
                if metric in OVER_NORMAL_IMAGES_TOO and _over_normal_images_too(rec):
                    continue
                rows.append({**base, "status": "finished", "metric": metric, "value": value})
        import pandas as pd

        columns = [*RECORD_KEYS[:1], "plugin", *RECORD_KEYS[1:], "status", "metric", "value"]
        frame = pd.DataFrame(rows, columns=columns)
        return frame.astype({"value": "float64"})
