"""Named points where tests stop the process, to check what each kind of interruption leaves behind.

``MEDAD_BENCH_TEST_KILL_AT=point[:n[:SIGNAL]]`` ends the process with ``os._exit(137)`` (what SIGKILL leaves)
the n-th time it passes ``point``, or sends it ``SIGNAL`` (``TERM``, ``INT``, ``KILL``, ``STOP``). Points:
``cell_started``, ``cell_computed``, ``local_recorded``, ``mlflow_logged``, ``cell_ended`` (the driver),
``job@<cell id>`` and ``fit_saved`` (a job, in whichever process runs it; the latter once its fit is stored).
Unset, a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_passed: Counter[str] = Counter()


def kill_point(name: str) -> None:
    """End or signal the process here when the test variable names this point (and this is its n-th passage)."""
    wanted = os.environ.get("MEDAD_BENCH_TEST_KILL_AT")
    if not wanted:
        return
    parts = wanted.split(":")
    nth, sig = int(parts[1]) if len(parts) > 1 else 1, parts[2] if len(parts) > 2 else ""
    if parts[0] == name:
        _passed[name] += 1
        if _passed[name] == nth:
            if sig:
                os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))
            else:
                os._exit(137)
