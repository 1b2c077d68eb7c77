"""The local results store: one JSON line per cell attempt in ``results/<experiment>/results.jsonl``.

The last line of a config hash wins; ``--resume`` skips hashes whose last line is ``finished``. Lines are
appended and flushed whole, so a crash never leaves a cell recorded as finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark.errors import BenchmarkError

RECORD_KEYS = ("method", "dataset", "setting", "shots", "seed", "backbone", "threshold", "variant")


class ResultStore:
    def __init__(self, results_dir: str | Path, experiment: str) -> None:
        self.dir = Path(results_dir) / experiment
        self.path = self.dir / "results.jsonl"

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for i, line in enumerate(self.path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    raise BenchmarkError(f"{self.path}: line {i + 1} is not valid JSON") from None
        return out

    def latest(self) -> dict[str, dict[str, Any]]:
        latest: dict[str, dict[str, Any]] = {}
        for rec in self.records():
            latest[rec["config_hash"]] = rec
        return latest

    def finished_hashes(self) -> set[str]:
        return {h for h, rec in self.latest().items() if rec["status"] == "finished"}

    def append(self, record: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def frame(self) -> pd.DataFrame:
        """Finished cells as one long table: one row per cell and metric."""
        rows = []
        for rec in self.latest().values():
            if rec["status"] != "finished":
                continue
            for metric, value in rec["metrics"].items():
                rows.append(
                    {
                        **{k: rec[k] for k in RECORD_KEYS},
                        "plugin": rec.get("plugin", rec["method"]),
                        "metric": metric,
                        "value": value,
                    }
                )
        return pd.DataFrame(rows, columns=[*RECORD_KEYS[:1], "plugin", *RECORD_KEYS[1:], "metric", "value"])
