"""Start-up time of the light commands against a bare interpreter, measured side by side in one run.

    python tests/perf/startup.py

``--help``, ``list``, ``run --dry-run`` and a protocol error import no torch, open_clip or MLflow; a real
``run`` of one tiny cell is shown for contrast. Each command runs 5 times; the median is printed.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def timed(args: list[str], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        demo = yaml.safe_load((ROOT / "protocols" / "demo.yaml").read_text())
        bad = Path(tmp) / "bad.yaml"
        bad.write_text(yaml.safe_dump({**demo, "methods": {"winclp": {}}}))
        one = Path(tmp) / "one.yaml"
        one.write_text(
            yaml.safe_dump(
                {
                    **demo,
                    "methods": {"winclip": {"image_size": 64}},
                    "datasets": ["SynthBrain"],
                    "seeds": [0],
                    "settings": [{"name": "few_normal", "shots": [2]}],
                    "results_dir": f"{tmp}/results",
                    "data_root": f"{tmp}/data",
                }
            )
        )
        subprocess.run(
            [sys.executable, "-m", "benchmark", "synth", "--out", f"{tmp}/data"], cwd=ROOT, capture_output=True
        )
        base = timed(["-c", "pass"])
        rows = [
            ("python -c pass", base),
            ("--help", timed(["-m", "benchmark", "--help"])),
            ("list", timed(["-m", "benchmark", "list"])),
            (
                "run demo --dry-run",
                timed(["-m", "benchmark", "run", "protocols/demo.yaml", "--dry-run", "--data-root", f"{tmp}/data"]),
            ),
            ("run (protocol error)", timed(["-m", "benchmark", "run", str(bad)])),
            ("run (one tiny cell)", timed(["-m", "benchmark", "run", str(one)], repeats=3)),
        ]
    print(f"{'command':24s} {'median s':>9s} {'x python -c pass':>17s}")
    for name, seconds in rows:
        print(f"{name:24s} {seconds:9.2f} {seconds / base:17.1f}")


if __name__ == "__main__":
    main()
