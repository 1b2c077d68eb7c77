"""The times the README quotes, measured: its test command and its demo, on this machine.

    python tests/perf/readme_times.py [--skip-tests] [--skip-serial]

Runs ``python -m pytest -q`` (the README's test command) and ``python -m benchmark run protocols/demo.yaml``
into a fresh results folder (synthetic data written first, as on a new checkout; feature cache cold), by
default (local workers, one per core) and with ``--workers 1`` (one cell after another), and prints the
wall-clock times with the machine's core count and the ratio of the two demo runs, in the form the README
quotes.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def timed(args: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    run = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        sys.exit(f"{' '.join(args)} failed (exit {run.returncode}):\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
    return seconds, run.stdout


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s" if seconds >= 60 else f"{seconds:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-tests", action="store_true", help="time the demo only")
    parser.add_argument("--skip-serial", action="store_true", help="time the default demo run only")
    args = parser.parse_args()
    machine = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU used"
    print(f"machine: {machine}")
    if not args.skip_tests:
        seconds, out = timed([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"])
        passed = re.search(r"(\d+) passed", out)
        print(f"tests: {passed.group(1) if passed else '?'} passed in {minutes(seconds)}")
    times = {}
    for how, extra in (("default", []), ("--workers 1", ["--workers", "1"])):
        if how != "default" and args.skip_serial:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            demo = ["run", "protocols/demo.yaml", "--data-root", f"{tmp}/data", "--results-dir", f"{tmp}/r", *extra]
            seconds, out = timed([sys.executable, "-m", "benchmark", *demo])
        cells = re.search(r"finished (\d+)", out)
        workers = re.search(r"cells run on: ([^(\n]*)", out)
        where = workers.group(1).strip() if workers else "?"
        print(f"demo ({how}: {where}): {cells.group(1) if cells else '?'} cells in {minutes(seconds)} "
              "(synthetic data written first)")  # fmt: skip
        times[how] = seconds
    if len(times) == 2:
        print(f"demo, default / --workers 1: {times['default'] / times['--workers 1']:.2f}")


if __name__ == "__main__":
    main()
