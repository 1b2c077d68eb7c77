"""Executors run cell jobs and hand their results back to the driver as they finish.

- ``serial`` (``--workers 1``): one after another in the driver's process.
- ``local`` (``--workers N``; by default ``default_workers()``): N worker processes started once; each sets its
  torch threads to its share of the cores and, on a machine with GPUs, takes one device (round robin). A worker
  that dies (killed, out of memory) fails its cell with that reason and is replaced; the grid goes on.
- ``ray`` (``--executor ray [--address ADDR]``): one Ray task per cell with the resources the protocol asks
  (``resources: {cpus, gpus}``), results collected with ``ray.wait`` as they finish; Ray schedules.

An executor only computes: the driver writes every record, so no executor touches the results store or
MLflow, and a killed worker never leaves a half-written record.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING

from benchmark.environment import WORKER_ENV
from benchmark.errors import BenchmarkError

if TYPE_CHECKING:
    from benchmark.cells import Cell
    from benchmark.job import CellJob, CellResult

OnStart = Callable[["CellJob"], None]


WORKERS_ENV = "MEDAD_BENCH_WORKERS"  # the default number of workers, where set (the test suite sets 1)
# bytes of available memory per default CPU worker: room for a ViT-L/14 CLIP (1.7 GB of float32 weights) and its
# activations (a demo worker, with its tiny models, peaks at about 1.4 GB)
WORKER_MEMORY = 4 * 2**30


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the system tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _available_memory() -> int | None:
    """Memory a new process can have: Linux's ``MemAvailable`` (free memory plus the page cache the kernel can
    reclaim); elsewhere the free pages. Free pages alone fall to a few GiB on a machine that has read many files,
    though most of its memory is there for the taking."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_workers(devices: list[str]) -> int:
    """How many cells run at once when ``--workers`` is not given: ``$MEDAD_BENCH_WORKERS`` where set; else one
    worker per GPU; else one per core with one torch thread each (on 2 cores, 2 workers of one thread ran the demo
    in 0.55 to 0.67 of the time one process of two threads took: ``tests/perf/readme_times.py``), at most one per
    ``WORKER_MEMORY`` of available memory."""
    if (value := os.environ.get(WORKERS_ENV)) is not None:
        if not value.isdigit() or int(value) < 1:
            raise BenchmarkError(f"{WORKERS_ENV}: expected a number of processes >= 1, got '{value}'")
        return int(value)
    if devices:
        return len(devices)
    memory = _available_memory()
    by_memory = max(1, memory // WORKER_MEMORY) if memory else usable_cores()
    return max(1, min(usable_cores(), by_memory))


def _failed(job: CellJob, reason: str) -> CellResult:
    from benchmark.job import CellResult

    return CellResult(job.cell.cell_id, "failed", error=reason, traceback=reason)


class Executor:
    """Runs jobs, yielding each with its result as it finishes; ``prepare`` checks before anything is recorded
    that the cells can run at all, ``close`` releases what ``prepare`` took."""

    name = ""

    def describe(self) -> str:
        """Where the cells run, in a few words for the run's first lines."""
        return self.name

    def prepare(self, cells: list[Cell]) -> None:
        return None

    def close(self) -> None:
        return None

    def run(self, jobs: list[CellJob], on_start: OnStart) -> Iterator[tuple[CellJob, CellResult]]:
        raise NotImplementedError


class SerialExecutor(Executor):
    """Every job in this process, in order."""

    name = "serial"

    def describe(self) -> str:
        return "one cell after another in this process"

    def run(self, jobs: list[CellJob], on_start: OnStart) -> Iterator[tuple[CellJob, CellResult]]:
        from benchmark.job import run_job

        for job in jobs:
            on_start(job)
            yield job, run_job(job)


def _become_worker(threads: int) -> None:
    """Mark the process a worker (no progress bars) and give torch ``threads`` threads (the variables count where
    torch is not imported yet). tqdm's default lock is a multiprocessing one, created by every bar, even a
    disabled one: a killed worker left its semaphore behind and the resource tracker warned of a leak."""
    os.environ[WORKER_ENV] = "1"
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    import torch

    torch.set_num_threads(threads)


def _die_with_driver(driver: int) -> None:
    """End this worker when its driver (pid ``driver``) ends, even by SIGKILL (no ``finally`` of the driver runs
    then): on Linux the kernel sends SIGKILL at the driver's exit; elsewhere a thread watches for a new parent."""
    if os.getppid() != driver:  # the driver died while this worker started
        os._exit(1)
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        pr_set_pdeathsig = 1
        if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL) == 0:
            if os.getppid() != driver:  # the driver died before the request took effect
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == driver:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="driver-watch", daemon=True).start()


def _worker_main(conn: Connection, threads: int, device: str | None, driver: int) -> None:
    """A local worker: jobs in, results out, until told to stop (None) or its driver ends. Ctrl-C is the
    driver's business."""
    _die_with_driver(driver)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _become_worker(threads)
    from benchmark.job import run_job

    while True:
        job = conn.recv()
        if job is None:
            return
        conn.send(run_job(replace(job, device=device) if device else job))


@dataclass
class _Worker:
    process: multiprocessing.Process
    conn: Connection
    device: str | None
    job: CellJob | None = None


class LocalExecutor(Executor):
    """``workers`` processes on this machine, each with ``usable_cores() // workers`` torch threads (fixed for the
    run, whatever is left to do: a cell's numbers never depend on how many others were pending)."""

    name = "local"

    def __init__(self, workers: int, devices: list[str] | None = None) -> None:
        self.workers = workers
        self.devices = devices or []
        self.threads = max(1, usable_cores() // workers)
        self.started: list[_Worker] = []

    def prepare(self, cells: list[Cell]) -> None:
        """Start the workers now: they import torch and the harness while the driver checks the data."""
        self.started = [self._spawn(slot) for slot in range(min(self.workers, len(cells)))]

    def close(self) -> None:
        _stop(self.started)
        self.started = []

    def describe(self) -> str:
        where = f", on {', '.join(self.devices)}" if self.devices else ""
        each = f"{self.threads} torch thread(s) each{where}"
        return f"{self.workers} local worker processes of {each} (--workers 1: one cell after another here)"

    def _spawn(self, slot: int) -> _Worker:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        device = self.devices[slot % len(self.devices)] if self.devices else None
        # not a daemon: a worker starts the image-decoding processes of its cells
        process = ctx.Process(target=_worker_main, args=(child, self.threads, device, os.getpid()), daemon=False)
        process.start()
        child.close()
        return _Worker(process, parent, device)

    def run(self, jobs: list[CellJob], on_start: OnStart) -> Iterator[tuple[CellJob, CellResult]]:
        pending = deque(jobs)
        wanted = min(self.workers, len(jobs))
        workers = self.started[:wanted] or [self._spawn(slot) for slot in range(wanted)]
        _stop(self.started[wanted:])  # started for cells that were finished already (--resume)
        self.started = []

        def assign(worker: _Worker) -> None:
            if pending and worker.job is None:
                worker.job = pending.popleft()
                on_start(worker.job)
                with contextlib.suppress(OSError):  # a worker that died idle: its sentinel fails the job below
                    worker.conn.send(worker.job)

        try:
            for worker in workers:
                assign(worker)
            while any(w.job is not None for w in workers):
                busy = [w for w in workers if w.job is not None]
                ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
                for slot, worker in enumerate(workers):
                    if worker.job is None:
                        continue
                    job = worker.job
                    if worker.conn in ready:
                        try:
                            result = worker.conn.recv()
                        except (EOFError, OSError):  # the pipe closed: the worker is gone
                            worker.process.join()
                        else:
                            worker.job = None
                            yield job, result
                            assign(worker)
                            continue
                    if worker.process.sentinel in ready or not worker.process.is_alive():
                        worker.process.join()
                        code = worker.process.exitcode
                        cause = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit status {code}"
                        worker.job = None
                        reason = f"the worker process died ({cause}) while running the cell: killed, or out of memory"
                        yield job, _failed(job, reason)
                        workers[slot] = self._spawn(slot)
                        assign(workers[slot])
        finally:
            _stop(workers)


def _stop(workers: list[_Worker]) -> None:
    """Ask idle workers to end, give them 5 s; kill the rest (a busy one at once)."""
    for worker in workers:
        if worker.process.is_alive():
            with contextlib.suppress(OSError):
                worker.conn.send(None)
    for worker in workers:
        worker.process.join(timeout=5 if worker.job is None else 0)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()


def _ray_job(job: CellJob, threads: int) -> CellResult:
    _become_worker(threads)
    from benchmark.job import run_job

    return run_job(job)


def _answers(address: str, timeout_s: float = 5.0) -> str | None:
    """Why ``host:port`` (``[v6]:port`` too) does not take a connection within ``timeout_s``, or None; ``auto``
    and a ``ray://`` client address are Ray's to find."""
    host, _, port = address.rpartition(":")
    if address == "auto" or "://" in address or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
            return None
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__


class RayExecutor(Executor):
    """One Ray task per cell; ``resources(cell)`` gives its ``{cpus, gpus}`` (one CPU, no GPU by default)."""

    name = "ray"

    def describe(self) -> str:
        return f"Ray ({self.address or 'a local cluster'}), one task per cell"

    def __init__(self, address: str | None, resources: Callable[[Cell], dict[str, float]]) -> None:
        try:  # before anything is recorded
            import ray  # noqa: F401
        except ImportError:
            raise BenchmarkError("--executor ray needs Ray: pip install -e '.[ray]'") from None
        self.address, self.resources = address, resources
        self.started = False  # this executor started Ray (a local instance, or its connection to a cluster)

    def prepare(self, cells: list[Cell]) -> None:
        """Join the cluster (or start a local Ray) and check that every cell's resources fit some node: an
        address that does not answer and resources no node has are one line each, before any cell."""
        import ray

        if self.address and (why := _answers(self.address)):
            raise BenchmarkError(f"--address {self.address}: no Ray cluster answers there ({why})")
        if not ray.is_initialized():
            handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            except Exception as exc:
                raise BenchmarkError(f"--address {self.address}: no Ray cluster could be joined ({exc})") from None
            finally:
                for s, handler in handlers.items():  # ray.init installs its own: ours end runs KILLED, exit 143
                    signal.signal(s, handler)
            self.started = True
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        for cell in cells:
            asked = self.resources(cell)
            cpus, gpus = asked.get("cpus", 1.0), asked.get("gpus", 0.0)
            if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
                have = "; ".join(f"{n.get('CPU', 0):g} CPUs, {n.get('GPU', 0):g} GPUs" for n in nodes) or "none"
                self.close()
                raise BenchmarkError(
                    f"resources of '{cell.method}': {cpus:g} CPUs and {gpus:g} GPUs per cell, which no node of the "
                    f"Ray cluster has (its nodes: {have}); lower them or add such a node"
                )

    def close(self) -> None:
        """Leave the cluster (and stop the local Ray) if this executor joined it."""
        if self.started:
            import ray

            ray.shutdown()
            self.started = False

    def run(self, jobs: list[CellJob], on_start: OnStart) -> Iterator[tuple[CellJob, CellResult]]:
        import ray

        task = ray.remote(max_retries=0)(_ray_job)
        refs = {}
        try:
            for job in jobs:
                asked = self.resources(job.cell)
                cpus, gpus = asked.get("cpus", 1.0), asked.get("gpus", 0.0)
                ref = task.options(num_cpus=cpus, num_gpus=gpus).remote(job, max(1, int(cpus)))
                on_start(job)  # its MLflow run is RUNNING from submission: Ray decides when it starts
                refs[ref] = job
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)  # signals are handled between waits
                for ref in done:
                    job = refs.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # the task's process or node died, or Ray refused it
                        first = (str(exc).strip().splitlines() or [""])[0][:300]
                        result = _failed(job, f"the Ray task failed ({type(exc).__name__}: {first})")
                    yield job, result
        finally:
            for ref in refs:
                ray.cancel(ref, force=True)
