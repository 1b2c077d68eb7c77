"""The demo's wall time serially, with ``--workers 2`` and on a local Ray, side by side in one run.

    python tests/perf/executors.py [--protocol protocols/demo.yaml]

Each run goes to a fresh results folder (no cache shared between them) over the same generated data; the
script checks that the three give the same metrics and prints the times and their ratios to serial.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def timed_run(protocol: str, data: str, results: str, extra: list[str]) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "benchmark", "run", protocol, "--data-root", data, "--results-dir", results]
    subprocess.run([*cmd, *extra], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--protocol", default="protocols/demo.yaml")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from benchmark.protocol import load_protocol
    from benchmark.store import ResultStore

    name = load_protocol(ROOT / args.protocol).name
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/data"
        subprocess.run([sys.executable, "-m", "benchmark", "synth", "--out", data], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        runs = {
            "serial": timed_run(args.protocol, data, f"{tmp}/serial", []),
            "--workers 2": timed_run(args.protocol, data, f"{tmp}/workers", ["--workers", "2"]),
            "--executor ray": timed_run(args.protocol, data, f"{tmp}/ray", ["--executor", "ray"]),
        }
        metrics = [
            {r["cell_id"]: r["metrics"] for r in ResultStore(f"{tmp}/{folder}", name).latest().values()}
            for folder in ("workers", "ray")
        ]
    print(f"{'executor':16s} {'wall s':>8s} {'x serial':>9s}")
    for label, seconds in runs.items():
        print(f"{label:16s} {seconds:8.1f} {seconds / runs['serial']:9.2f}")
    workers, ray = metrics
    differ = {
        cell: max(abs(workers[cell][m] - ray[cell].get(m, float("inf"))) for m in workers[cell])
        for cell in workers
        if workers[cell] != ray.get(cell)
    }
    print(f"--workers 2 and Ray metrics identical, cell for cell: {not differ} ({len(workers)} cells)")
    for cell, gap in sorted(differ.items()):
        print(f"  differs: {cell} (largest metric difference {gap:.3g})")


if __name__ == "__main__":
    main()
