"""Executors run cell jobs and hand their results back to the driver as they finish.

``serial`` runs them one after another in the driver's process. An executor only computes: the driver
writes every record, so an executor never touches the results store or MLflow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmark.job import CellJob, CellResult

OnStart = Callable[["CellJob"], None]


class SerialExecutor:
    """Every job in this process, in order."""

    name = "serial"

    def run(self, jobs: list[CellJob], on_start: OnStart) -> Iterator[tuple[CellJob, CellResult]]:
        from benchmark.job import run_job

        for job in jobs:
            on_start(job)
            yield job, run_job(job)
