"""Fit reuse: ``medclipseg_demo``'s domain-generalisation part (one source, two targets, two prompt designs: 4
cells of one fit) run side by side in one results folder, first with ``--refit`` (the fit trained once, the other
cells loading it) and then again (every cell loading it), both with ``--workers 1``.

    python tests/perf/fit_reuse.py [--epochs 8]

Prints each run's wall time, how many cells trained and loaded, the seconds of training, and the ratio of the
two runs; checks that both runs record the very same metrics.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="MedCLIPSeg's epochs (the demo's: 8)")
    args = parser.parse_args()
    protocol = yaml.safe_load((ROOT / "protocols" / "medclipseg_demo.yaml").read_text())
    protocol["settings"] = [s for s in protocol["settings"] if s["name"] == "domain_generalization"]
    protocol["methods"]["medclipseg"]["epochs"] = args.epochs
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results"
        runs = []
        for name, flags in (("trained", ["--refit"]), ("reused", [])):
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(yaml.safe_dump({**protocol, "name": name, "data_root": str(Path(tmp) / "data")}))
            command = [sys.executable, "-m", "benchmark", "run", str(path), "--results-dir", str(results), "--workers",
                       "1", *flags]  # fmt: skip
            start = time.perf_counter()
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                sys.exit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
            records = [json.loads(line) for line in (results / name / "results.jsonl").read_text().splitlines()]
            trained = [r for r in records if r["params"]["fit"].startswith("trained ")]
            training = sum(r["efficiency"]["fit_s"] for r in trained)
            print(f"{name:>8}: {seconds:5.1f} s for {len(records)} cells; {len(trained)} trained ({training:.1f} s of "
                  f"training), {len(records) - len(trained)} loaded the fit")  # fmt: skip
            runs.append((seconds, {r["cell_id"]: r["metrics"] for r in records}))
        assert runs[0][1] == runs[1][1], "a reused fit gave other metrics"
        print(f"every cell reusing / one training: {runs[1][0] / runs[0][0]:.2f} (the same metrics in both runs)")


if __name__ == "__main__":
    main()
